"""The SFP encoder (Jin et al., ICCV 2025): outlier mitigator, attention enhancer, integrator.

:class:`SFPEncoder` runs :mod:`sfp.core.forward` with SOM as hooks and replaces its tail. With
the official preset (:meth:`sfp.methods.config.SFPConfig.official`) it computes, for L blocks
(docs/design.md, "The SFP method"):

1. embed; blocks 1..L-1 unchanged (the positional embedding is interpolated to the exact
   patch grid, rows and columns apart, when the grid differs from the pretraining one);
2. SOM: the detector on block L-1 (attention for ``"som"``, hidden states for ``"l2"`` /
   ``"lof"``) -> outlier mask (B, N);
3. mitigation: outlier patch tokens of h_{L-1} -> mean of their unflagged 8-neighbours
   (rings widen when there are none; never NaN) -> X;
4. S_pre = thresholded cosine matrix of h_ref (mitigated at the same positions);
   X <- rownorm(S_pre) X;
5. SAE in place of block L: mean of softmax(qq^T), softmax(kk^T), softmax(M),
   M = 3 (S_pre - mean S_pre) with negatives -> -inf; X <- out_proj(attn v) + lambda cls;
6. S_post from h_post; X <- rownorm(S_post) X;
7. HAI: P = sum of h_l over the HAI range; Z = out_proj(softmax(M) v(ln_1 P)) + lambda cls_P,
   Z <- rownorm(S_post) Z; X <- X + Z;
8. features = ln_post(X) @ proj.

The other presets (``release-2025-12``, ``sc-clip``) switch the attention of steps 5 and 7
(``sae_terms``, ``hai_attention``), the source of M (``logits_from``) and steps 4 and 6;
:class:`SCCLIPEncoder` is SC-CLIP as a method. Batches are processed at once, each image with
its own outlier set; any depth works (layers come from ``config.resolve``: the release's
absolute 9 / 4 / 4..10 by default); similarity matrices and softmaxes are computed in float32,
or in fp16 / bf16 for such models as the release does (:func:`sfp.core.forward.work`). The
paper preset and the readings it needs are described in ``docs/sfp_presets.md``
and :class:`sfp.methods.config.SFPConfig`.

Switches (each removes exactly one stage):

- ``som=False``: no detection, no mitigation: X is the raw patch tokens of h_{L-1} and the
  reference h_ref is used unmitigated; masks are all False.
- ``sae=False``: block L runs as a standard ViT block on [cls of h_{L-1}, X] and its patch
  outputs replace SAE's (no lambda cls term).
- ``hai=False``: no HAI term: the final tokens are the post-similarity X (official), or
  F_vis = F_SAE (paper).
- ``pre_aggregate`` / ``post_aggregate``: the rownorm(S) X steps 4 and 6 (and 7's Z smoothing).

The pure functions below (:func:`similarity_matrix`, :func:`rownorm_apply`,
:func:`sae_official`, :func:`sae_paper`, :func:`hai_official`, :func:`hai_paper`) compute one
stage each on tensors, for figures and tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sfp.core import forward
from sfp.core.hooks import NO_HOOKS, Hooks, block_hook
from sfp.core.outliers import (
    Detector,
    FlagCounts,
    MitigationReport,
    get_detector,
    mitigate_with_report,
)
from sfp.core.probe import Recorder, model_meta
from sfp.methods.attention import correlative_probs, self_self_probs
from sfp.methods.base import Encoder, FwdHooks, register_encoder
from sfp.methods.config import PRESETS, ResolvedConfig, SFPConfig

__all__ = [
    "SCCLIPEncoder",
    "SFPEncoder",
    "SFPStages",
    "hai_official",
    "hai_paper",
    "hai_paper_matrix",
    "normalize_rows_cols",
    "rownorm_apply",
    "sae_official",
    "sae_paper",
    "cosine_matrix",
    "similarity_logits",
    "similarity_matrix",
    "threshold_similarity",
]

# Smallest norm a token is divided by when L2-normalised (a zero vector gives a zero row
# instead of NaN; every other vector is normalised exactly as x / ||x||).
_MIN_NORM = 1e-12


# --------------------------------------------------------------------------------------------
# Pure stage functions
# --------------------------------------------------------------------------------------------


def cosine_matrix(tokens: Tensor) -> Tensor:
    """Cosine-similarity matrix of patch tokens: (B, N, C) -> (B, N, N), in work precision
    (:func:`sfp.core.forward.work`: float32; fp16 for fp16 tokens)."""
    t = forward.work(tokens)
    t = t / t.norm(dim=-1, keepdim=True).clamp_min(_MIN_NORM)
    return t @ t.transpose(-1, -2)


def threshold_similarity(c: Tensor, threshold: float = 0.4) -> Tensor:
    """A cosine matrix (B, N, N) with entries below ``threshold`` set to 0."""
    return c.masked_fill(c < threshold, 0.0)


def similarity_matrix(tokens: Tensor, threshold: float = 0.4) -> Tensor:
    """Thresholded cosine-similarity matrix of patch tokens, in work precision.

    tokens: (B, N, C) -> S (B, N, N) with S[b, i, j] = cos(t_i, t_j), entries below
    ``threshold`` set to 0.
    """
    return threshold_similarity(cosine_matrix(tokens), threshold)


def rownorm_apply(s: Tensor, x: Tensor, eps: float = 1e-6) -> Tensor:
    """Similarity-weighted average: (S / (row sums of S + eps)) @ X.

    s: (B, N, N), x: (B, N, C) -> (B, N, C) in x's dtype (computed in work precision).
    """
    s = forward.work(s)
    w = s / (s.sum(dim=-1, keepdim=True) + eps)
    return (w.to(forward.work(x).dtype) @ forward.work(x)).to(x.dtype)


def similarity_logits(s: Tensor, temperature: float = 3.0) -> Tensor:
    """The SAE/HAI similarity logits M of the official preset, in work precision.

    s: thresholded S_pre (B, N, N) -> M = temperature * (S - mean(S)) with the mean taken
    per image over all N x N entries; entries < 0 become -inf. A diagonal entry that would be
    < 0 (only when a token's self-similarity is below the mean, e.g. a zero token) is set to
    0 instead, so no row is all -inf (softmax stays finite); otherwise M is unchanged.
    """
    s = forward.work(s)
    m = (s - s.mean(dim=(-2, -1), keepdim=True)) * temperature
    diag = torch.diagonal(m, dim1=-2, dim2=-1)
    diag.clamp_(min=0.0)
    return m.masked_fill(m < 0.0, float("-inf"))


def _official_attention(
    q: Tensor, k: Tensor, m: Tensor | None, terms: str | None
) -> Tensor:
    """(B, H, N, N) float32: the mean of the softmaxes ``terms`` names ("q+k+sim":
    softmax(qq^T s), softmax(kk^T s), softmax(M); "q+k"; "k+sim"), s = d_head^-0.5, or
    softmax(M) for every head when ``terms`` is None. m: (B, N, N) logits M (None only with
    "q+k")."""
    if terms == "q+k":
        return correlative_probs(q, k) / 2
    assert m is not None, "the similarity term needs the logits M"
    a_m = torch.softmax(m, dim=-1).unsqueeze(1)
    if terms is None:
        return a_m.expand(-1, q.shape[1], -1, -1)
    if terms == "k+sim":
        return (a_m + self_self_probs(k)) / 2
    if terms != "q+k+sim":
        raise ValueError(f"unknown SAE terms {terms!r}")
    return (correlative_probs(q, k) + a_m) / 3


def _attend(block: nn.Module, attn: Tensor, v: Tensor) -> Tensor:
    """out_proj(attn @ v): attn (B, H, N, N) float32, v (B, H, N, d) -> (B, N, C), v's dtype."""
    return forward.merge_heads(block, forward.attend(attn, v))


def _logits(sim: Tensor | None, cfg: SFPConfig) -> Tensor | None:
    return None if sim is None else similarity_logits(sim, cfg.sim_temperature)


def sae_official(block: nn.Module, x: Tensor, sim: Tensor | None, cls: Tensor | None = None,
                 config: SFPConfig | None = None, *, layer: int = 0,
                 hooks: Hooks = NO_HOOKS) -> Tensor:
    """The release's semantic-aware attention enhancer, in place of block L.

    x: (B, N, C) patch tokens; sim: (B, N, N) the matrix M is built from (the thresholded
    reference similarity S_pre; the unthresholded cosine matrix with ``logits_from="cosine"``;
    None when ``sae_terms`` has no similarity term); cls: (B, C) class token of h_{L-1} (None:
    no class-token term); config: its ``res_cls`` (lambda), ``sim_temperature`` and
    ``sae_terms`` are used (default official). With q, k, v = in_proj(ln_1(x)) per head:
    attn = the mean of the ``sae_terms`` softmaxes (official: (softmax(qq^T/sqrt(d)) +
    softmax(kk^T/sqrt(d)) + softmax(M)) / 3), M = :func:`similarity_logits`; returns
    out_proj(attn v) + lambda * cls: (B, N, C). No MLP, no residual. Block ``layer``'s
    attention hook points fire on the N patch tokens (q, k, v, pattern, z, attn_out).
    """
    cfg = SFPConfig.official() if config is None else config
    q, k, v = forward.attention_inputs(block, x, layer, hooks)
    m = _logits(sim, cfg)
    attn = forward.pattern_hook(_official_attention(q, k, m, cfg.sae_terms), layer, hooks)[0]
    out = forward.attention_output(block, forward.attend(attn, v), layer, hooks,
                                   layer_scale=False)
    if cls is not None:
        out = out + cfg.res_cls * cls.unsqueeze(1).to(out.dtype)
    return out


def hai_official(block: nn.Module, hidden_sum: Tensor, sim: Tensor | None,
                 s_post: Tensor | None = None, config: SFPConfig | None = None) -> Tensor:
    """The release's hierarchical attention integrator term Z.

    hidden_sum: P = sum of hidden states over the HAI layers (B, 1 + N, C), class token first;
    sim: (B, N, N) gives M (:func:`similarity_logits`; as in :func:`sae_official`, None when
    the attention has no similarity term); s_post: (B, N, N) or None; config: its
    ``res_cls``, ``sim_temperature``, ``hai_attention``, ``sae_terms`` and ``eps`` (default
    official). q, k, v = in_proj(ln_1(P patches)) of block L; attention "similarity":
    softmax(M) for every head, "sae": the SAE mixture (:func:`sae_official`) of P's q, k.
    Z = out_proj(attn v) + res_cls * cls(P), then Z <- rownorm(S_post) Z when s_post is given.
    Returns Z: (B, N, C).
    """
    cfg = SFPConfig.official() if config is None else config
    q, k, v = forward.qkv(block, block.ln_1(hidden_sum[:, 1:]))
    terms = cfg.sae_terms if cfg.hai_attention == "sae" else None
    z = _attend(block, _official_attention(q, k, _logits(sim, cfg), terms), v)
    z = z + cfg.res_cls * hidden_sum[:, :1].to(z.dtype)
    if s_post is not None:
        z = rownorm_apply(s_post, z, cfg.eps)
    return z


def sae_paper(
    block: nn.Module,
    x: Tensor,
    cls: Tensor | None = None,
    *,
    omega: float = 0.5,
    ln1: bool = True,
    value: str = "proj",
    form: str = "block",
    combine: str = "sum",
) -> Tensor:
    """The paper's SAE (eq. 6-7) with block L's weights.

    x: F_SOM (B, N, C); cls: (B, C) to let the class token take part (None: patches only).
    attn = softmax(omega (qq^T + kk^T) / sqrt(d)) per head (``combine="sum"``) or
    (softmax(omega qq^T / sqrt(d)) + softmax(omega kk^T / sqrt(d))) / 2 (``"mean"``), q, k from
    ln_1(x) (``ln1``) or x.
    value "proj": a = out_proj(attn v); "identity": a = mean_h(attn) @ x.
    form "block": X1 = x + a, F = X1 + mlp(ln_2(X1)) (a standard pre-norm block's residuals);
    "eq7": F = x + mlp(ln_2(a)). Returns F_SAE: (B, N, C) (patch tokens).
    """
    if value not in ("proj", "identity"):
        raise ValueError(f"value must be 'proj' or 'identity', got {value!r}")
    if form not in ("block", "eq7"):
        raise ValueError(f"form must be 'block' or 'eq7', got {form!r}")
    if combine not in ("sum", "mean"):
        raise ValueError(f"combine must be 'sum' or 'mean', got {combine!r}")
    tokens = x if cls is None else torch.cat([cls.unsqueeze(1).to(x.dtype), x], dim=1)
    q, k, v = forward.qkv(block, block.ln_1(tokens) if ln1 else tokens)
    qf, kf = forward.work(q), forward.work(k)
    scale = omega * q.shape[-1] ** -0.5
    if combine == "mean":
        attn = (self_self_probs(q, scale) + self_self_probs(k, scale)) / 2
    else:
        logits = (qf @ qf.transpose(-1, -2) + kf @ kf.transpose(-1, -2)) * scale
        attn = torch.softmax(logits, dim=-1)
    if value == "proj":
        a = block.ls_1(_attend(block, attn, v))
    else:
        a = (attn.mean(dim=1).to(forward.work(tokens).dtype) @ forward.work(tokens)
             ).to(tokens.dtype)
    if form == "block":
        h = tokens + a
        out = h + block.ls_2(block.mlp(block.ln_2(h)))
    else:
        out = tokens + block.ls_2(block.mlp(block.ln_2(a)))
    return out if cls is None else out[:, 1:]


def hai_layer_term(attention: Tensor, mask: Tensor | None = None) -> Tensor:
    """One layer's contribution to the paper's HAI (eq. 8), in work precision.

    attention: (B, H, T, T) per head (or (B, T, T) averaged), T = 1 + N; mask: (B, N) bool
    outliers S_l of that layer or None. Head-averaged patch-to-patch attention with the
    outlier columns set to 0: (B, N, N).
    """
    a = forward.work(attention)
    if a.ndim == 4:
        a = a.mean(dim=1)
    a = a[:, 1:, 1:]
    if mask is not None:
        a = a.masked_fill(mask.unsqueeze(1), 0.0)
    return a


def normalize_rows_cols(a: Tensor, iterations: int = 1, eps: float = 1e-6) -> Tensor:
    """Eq. 10: ``iterations`` passes of row normalisation then column normalisation.

    a: (B, N, N) -> (B, N, N) float32; each division adds ``eps`` to the sums.
    """
    a = forward.work(a)
    for _ in range(iterations):
        a = a / (a.sum(dim=-1, keepdim=True) + eps)
        a = a / (a.sum(dim=-2, keepdim=True) + eps)
    return a


def hai_paper_matrix(
    attentions: Sequence[Tensor],
    masks: Sequence[Tensor | None] | None = None,
    *,
    iterations: int = 1,
    eps: float = 1e-6,
) -> Tensor:
    """A_HAI of the paper (eq. 8-10) from the attentions of layers l0..L-1.

    attentions: per layer (B, H, T, T) or (B, T, T); masks: per layer (B, N) bool or None.
    Returns (B, N, N) float32: normc(normr(sum of :func:`hai_layer_term`)), iterated.
    """
    if not attentions:
        raise ValueError("hai_paper_matrix needs at least one layer's attention")
    masks = list(masks) if masks is not None else [None] * len(attentions)
    if len(masks) != len(attentions):
        raise ValueError(f"got {len(attentions)} attentions but {len(masks)} masks")
    total = hai_layer_term(attentions[0], masks[0])
    for a, m in zip(attentions[1:], masks[1:], strict=True):
        total = total + hai_layer_term(a, m)
    return normalize_rows_cols(total, iterations, eps)


def hai_paper(
    attentions: Sequence[Tensor],
    features: Tensor,
    masks: Sequence[Tensor | None] | None = None,
    *,
    iterations: int = 1,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Eq. 11: F_vis = A_HAI F_SAE. features: (B, N, C) -> (F_vis (B, N, C), A_HAI (B, N, N))."""
    a = hai_paper_matrix(attentions, masks, iterations=iterations, eps=eps)
    return (a.to(forward.work(features).dtype) @ forward.work(features)).to(features.dtype), a


# --------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------


@dataclass
class SFPStages:
    """Every intermediate result of one SFP forward of B images (N = gh * gw patches).

    Attributes:
        config: the resolved configuration used.
        grid: (gh, gw).
        mask: (B, N) bool, the final outlier set (detect layer); all False with som=False.
        masks, scores: {layer: (B, N)} for every layer SOM ran on.
        candidates: {layer: (B, N) bool} the patches that passed the detector's criterion
            there, before its top-k (= masks for a detector without a top-k).
        reports: {layer: MitigationReport} of those layers' mitigations.
        reference_report: MitigationReport of mitigating h_ref (None if not done).
        cls: (B, C) class token of h_{L-1}.
        x_raw: (B, N, C) patch tokens of h_{L-1} as block L-1 output them (before mitigation).
        x_som: X after mitigation (step 3).
        x_pre: X after the reference-similarity aggregation (step 4; = x_som when off).
        x_sae: X after SAE (step 5) or after the standard block L (sae=False).
        x_post: X after the post-similarity aggregation (step 6; = x_sae when off).
        z: (B, N, C) the official HAI term Z, or None.
        hai_matrix: (B, N, N) the paper's A_HAI, or None.
        x_final: (B, N, C) tokens before ln_post.
        features: (B, N, D) ln_post(x_final) @ proj, not normalised.
        s_pre, s_post: (B, N, N) float32 thresholded similarity matrices, or None.
        trace: a :class:`sfp.core.probe.Trace` of the blocks run (raw block outputs and attention),
            when asked for.
    """

    config: ResolvedConfig
    grid: forward.Grid
    mask: Tensor
    masks: dict[int, Tensor]
    scores: dict[int, Tensor]
    reports: dict[int, MitigationReport]
    reference_report: MitigationReport | None
    cls: Tensor
    x_raw: Tensor
    x_som: Tensor
    x_pre: Tensor
    x_sae: Tensor
    x_post: Tensor
    z: Tensor | None
    hai_matrix: Tensor | None
    x_final: Tensor
    features: Tensor
    s_pre: Tensor | None
    s_post: Tensor | None
    trace: Any | None = field(default=None, repr=False)
    candidates: dict[int, Tensor] = field(default_factory=dict, repr=False)

    def flag_counts(self, layer: int | None = None, index: int = 0) -> FlagCounts:
        """Passed vs kept at ``layer`` (default: the detect layer) for image ``index``."""
        layer = self.config.detect_layer if layer is None else layer
        if layer not in self.masks:
            raise KeyError(f"SOM did not run at layer {layer} (it ran at {sorted(self.masks)}).")
        kept = self.masks[layer][index]
        passed = self.candidates.get(layer, self.masks[layer])[index]
        return FlagCounts(passed=int(passed.sum()), kept=int(kept.sum()), total=int(kept.numel()))

    @property
    def indices(self) -> list[Tensor]:
        """Final outlier patch indices per image, ascending: B LongTensors."""
        return [torch.nonzero(row, as_tuple=False).flatten() for row in self.mask]

    @property
    def widened(self) -> Tensor:
        """(B,) long: mitigated tokens that had no unflagged 8-neighbour (ring widened), over
        all SOM layers and the reference mitigation."""
        total = torch.zeros(self.mask.shape[0], dtype=torch.long, device=self.mask.device)
        reports = list(self.reports.values())
        if self.reference_report is not None:
            reports.append(self.reference_report)
        for rep in reports:
            total = total + rep.widened.to(total.device)
        return total

    def to_grid(self, x: Tensor) -> Tensor:
        """(B, N, ...) per-patch values -> (B, gh, gw, ...)."""
        return x.reshape(x.shape[0], *self.grid, *x.shape[2:])


class _BlockRun:
    """What SFP's hooks collect while blocks 1..L-1 run (one forward).

    At every SOM layer the detector runs on the block's attention (observed at
    ``attn.hook_pattern``) or output, and the block's output patch tokens are replaced by
    their mitigated values at ``hook_resid_post``; after that the layers SFP reads later
    (reference / post similarity, HAI) are kept.
    """

    def __init__(self, cfg: SFPConfig, r: ResolvedConfig, detector: Detector,
                 detector_kwargs: dict[str, Any], grid: forward.Grid) -> None:
        self.cfg, self.r, self.grid = cfg, r, grid
        self.n = grid[0] * grid[1]
        self.detector, self.kwargs = detector, detector_kwargs
        self.official_hai = cfg.hai and cfg.hai_variant == "official"
        self.paper_hai = cfg.hai and cfg.hai_variant == "paper"
        sim_term = "sim" in cfg.sae_terms
        self.need_s_pre = cfg.pre_aggregate or (
            cfg.sae and cfg.sae_variant == "official" and sim_term) or (
            self.official_hai and (cfg.hai_attention == "similarity" or sim_term))
        self.keep = ({r.ref_layer} if self.need_s_pre else set()) | (
            {r.post_layer} if cfg.post_aggregate else set())
        self.patterns: dict[int, Tensor] = {}
        self.hidden: dict[int, Tensor] = {}
        self.masks: dict[int, Tensor] = {}
        self.candidates: dict[int, Tensor] = {}
        self.scores: dict[int, Tensor] = {}
        self.reports: dict[int, MitigationReport] = {}
        self.hai_attention: list[Tensor] = []
        self.hai_masks: list[Tensor | None] = []
        self.p_sum: Tensor | None = None
        self.x_raw: Tensor | None = None

    def hooks(self) -> Hooks:
        """The hooks that implement SOM and collect the later stages' inputs."""
        som = set(self.r.som_layers)
        pattern_layers = (som if self.detector.needs == "attention" else set()) | (
            set(self.r.hai_layers) if self.paper_hai else set())
        pairs = [(block_hook(l, "attn.hook_pattern"), self._observe_pattern)
                 for l in sorted(pattern_layers)]
        pairs += [(block_hook(l, "hook_resid_post"), self._mitigate) for l in sorted(som)]
        collect = self.keep | (set(self.r.hai_layers) if self.cfg.hai else set())
        pairs += [(block_hook(l, "hook_resid_post"), self._collect) for l in sorted(collect)]
        return Hooks(pairs)

    def _observe_pattern(self, probs: Tensor, name: str) -> None:
        self.patterns[int(name.split(".")[1])] = probs

    def _mitigate(self, h: Tensor, name: str) -> Tensor:
        layer = int(name.split(".")[1])
        patches = h[:, 1 : 1 + self.n]
        source = self.patterns[layer] if self.detector.needs == "attention" else h
        if not (self.paper_hai and layer in self.r.hai_layers):
            self.patterns.pop(layer, None)
        result = self.detector(source, **self.kwargs)
        self.masks[layer], self.scores[layer] = result.mask, result.scores
        self.candidates[layer] = result.mask if result.candidates is None else result.candidates
        if layer == self.r.last_layer:
            self.x_raw = patches
        if self.official_hai and layer in self.r.hai_layers:
            # P sums the block outputs as the blocks produced them (before mitigation).
            self._add_to_p(h[:, : 1 + self.n])
        mitigated, self.reports[layer] = mitigate_with_report(patches, self.grid, result.mask)
        return torch.cat([h[:, :1], mitigated, h[:, 1 + self.n :]], dim=1)

    def _add_to_p(self, h: Tensor) -> None:
        self.p_sum = h if self.p_sum is None else self.p_sum + h

    def _collect(self, h: Tensor, name: str) -> None:
        layer = int(name.split(".")[1])
        h = h[:, : 1 + self.n]
        if layer in self.keep:
            self.hidden[layer] = h
        if self.official_hai and layer in self.r.hai_layers and layer not in self.r.som_layers:
            self._add_to_p(h)
        if self.paper_hai and layer in self.r.hai_layers:
            self.hai_attention.append(forward.work(self.patterns.pop(layer)).mean(dim=1))
            self.hai_masks.append(self.masks.get(layer))


class SFPEncoder(Encoder):
    """SFP dense encoder: ``images (B, 3, H, W) -> patch features (B, N, D)``.

    Args:
        bundle: a :class:`sfp.models.loading.ModelBundle` (any open_clip ViT depth).
        config: an :class:`SFPConfig` or a preset name (None: ``SFPConfig.official()``). Its
            layers are resolved for the bundle's depth at construction (ConfigError if they
            do not fit).
    """

    name = "sfp"

    def __init__(self, bundle: Any, config: SFPConfig | str | None = None) -> None:
        super().__init__(bundle)
        config = SFPConfig.official() if config is None else config
        if isinstance(config, str):
            config = SFPConfig.preset(config)
        if not isinstance(config, SFPConfig):
            raise TypeError(f"config must be an SFPConfig or a preset name "
                            f"({', '.join(PRESETS.names())}), got {type(config).__name__}")
        self._config = config
        self.resolved = config.resolve(self.num_layers)
        self._detector = get_detector(config.detector)
        self._detector_kwargs = config.detector_kwargs()

    def encode_patches(self, images: Tensor, fwd_hooks: FwdHooks = None) -> Tensor:
        """Patch features after ln_post and proj, not normalised: (B, 3, H, W) -> (B, N, D)."""
        return self._forward(images, trace=False, fwd_hooks=fwd_hooks).features

    @torch.no_grad()
    def stages(self, images: Tensor, trace: bool = False, fwd_hooks: FwdHooks = None
               ) -> SFPStages:
        """Run SFP once and return every intermediate result (:class:`SFPStages`).

        images: (B, 3, H, W) normalised. trace=True also records every block's raw output and
        attention in a :class:`sfp.core.probe.Trace` (memory: ~L x B x H x T^2 floats).
        fwd_hooks: interventions, run before SFP's own hooks at a shared hook point.
        """
        return self._forward(images, trace=trace, fwd_hooks=fwd_hooks)

    # ------------------------------------------------------------------------------------
    def _forward(self, images: Tensor, trace: bool, fwd_hooks: FwdHooks) -> SFPStages:
        cfg, r = self._config, self.resolved
        hooks = self.hooks(fwd_hooks)
        x, grid = forward.embed(self.visual, images, hooks)
        recorder = None
        if trace:
            recorder = Recorder(range(1, r.num_layers + (0 if cfg.sae else 1)))
            hooks = hooks + recorder.hooks(self.visual)
        run = _BlockRun(cfg, r, self._detector, self._detector_kwargs, grid)
        x = forward.run_blocks(self.visual, x, 1, r.last_layer, hooks + run.hooks())
        st = self._tail(x[:, : 1 + run.n], run, hooks)
        st.trace = None if recorder is None else recorder.to_trace(
            grid, r.num_layers, **model_meta(self.bundle, images), recorded_by="SFPEncoder.stages",
            sfp_config=cfg.to_code(),
        )
        return st

    def _tail(self, x: Tensor, run: _BlockRun, hooks: Hooks) -> SFPStages:
        """Steps 4-8 on h_{L-1} (B, 1 + N, C) (mitigated) and what the blocks left in ``run``."""
        cfg, r, grid = self._config, self.resolved, run.grid
        cls, xs = x[:, 0], x[:, 1:]
        mask = run.masks.get(r.detect_layer)
        if mask is None:
            mask = torch.zeros(x.shape[0], run.n, dtype=torch.bool, device=x.device)
        s_pre, cosine, ref_report = self._reference(run, mask)
        x_pre = rownorm_apply(s_pre, xs, cfg.eps) if cfg.pre_aggregate and s_pre is not None \
            else xs
        sim = cosine if cfg.logits_from == "cosine" else s_pre  # the source of M
        x_sae = self._sae(cls, x_pre, sim, hooks)
        s_post = x_post = None
        if cfg.post_aggregate:
            s_post = similarity_matrix(run.hidden[r.post_layer][:, 1:], cfg.sim_threshold)
            x_post = rownorm_apply(s_post, x_sae, cfg.eps)
        x_post = x_sae if x_post is None else x_post
        z, hai_matrix, x_final = self._hai(run, x_post, sim, s_post)
        return SFPStages(
            config=r, grid=grid, mask=mask, masks=run.masks, scores=run.scores,
            candidates=run.candidates,
            reports=run.reports, reference_report=ref_report, cls=cls,
            x_raw=xs if run.x_raw is None else run.x_raw, x_som=xs, x_pre=x_pre, x_sae=x_sae,
            x_post=x_post, z=z, hai_matrix=hai_matrix, x_final=x_final,
            features=forward.project_patches(self.visual, x_final), s_pre=s_pre, s_post=s_post,
        )

    def _reference(self, run: _BlockRun, mask: Tensor
                   ) -> tuple[Tensor | None, Tensor | None, MitigationReport | None]:
        """Step 4: (S_pre, its unthresholded cosine matrix, the mitigation report) from h_ref,
        mitigated at the final outlier positions."""
        if not run.need_s_pre:
            return None, None, None
        ref, report = run.hidden[self.resolved.ref_layer][:, 1:], None
        if self._config.som:
            ref, report = mitigate_with_report(ref, run.grid, mask)
        cosine = cosine_matrix(ref)
        return threshold_similarity(cosine, self._config.sim_threshold), cosine, report

    def _sae(self, cls: Tensor, x_pre: Tensor, sim: Tensor | None, hooks: Hooks) -> Tensor:
        """Step 5, in place of block L: SAE (official / paper), or the standard block."""
        cfg, last = self._config, self.resolved.num_layers
        block = forward.blocks_of(self.visual)[last - 1]
        if not cfg.sae:
            tokens = torch.cat([cls.unsqueeze(1), x_pre], dim=1)
            return forward.block_forward(block, tokens, last, hooks)[:, 1:]
        if cfg.sae_variant == "official":
            return sae_official(block, x_pre, sim, cls, cfg, layer=last, hooks=hooks)
        return sae_paper(block, x_pre, cls if cfg.paper_sae_cls else None, omega=cfg.omega,
                         ln1=cfg.paper_sae_ln1, value=cfg.paper_sae_value,
                         form=cfg.paper_sae_form, combine=cfg.paper_sae_combine)

    def _hai(self, run: _BlockRun, x_post: Tensor, sim: Tensor | None,
             s_post: Tensor | None) -> tuple[Tensor | None, Tensor | None, Tensor]:
        """Step 7: (Z, A_HAI, final tokens X) of the official or the paper HAI (or neither)."""
        cfg = self._config
        if run.official_hai:
            assert run.p_sum is not None
            block = forward.blocks_of(self.visual)[self.resolved.num_layers - 1]
            z = hai_official(block, run.p_sum, sim, s_post, cfg)
            return z, None, x_post + z
        if run.paper_hai:
            x_final, a = hai_paper(run.hai_attention, x_post, run.hai_masks,
                                   iterations=cfg.hai_iterations, eps=cfg.eps)
            return None, a, x_final
        return None, None, x_post

    def __repr__(self) -> str:
        return (
            f"SFPEncoder(model={getattr(self.bundle, 'label', '?')!r}, "
            f"config={self._config!r})"
        )


class SCCLIPEncoder(SFPEncoder):
    """SC-CLIP (Bai et al., the sibling release of SFP) on SFP's engine: an
    :class:`SFPEncoder` whose default configuration is ``SFPConfig.preset("sc-clip")``.

    Differs from SC-CLIP's own mitigation in one case: a flagged patch with no unflagged
    8-neighbour keeps its value in SC-CLIP; here the window widens (5 x 5, 7 x 7, ...) until
    it holds an unflagged token (counted in ``stages(...).widened``).
    """

    name = "sc-clip"

    def __init__(self, bundle: Any, config: SFPConfig | str | None = None) -> None:
        super().__init__(bundle, SFPConfig.preset("sc-clip") if config is None else config)


register_encoder("sfp", SFPEncoder, display="SFP", config_type=SFPConfig,
                 citation="Jin et al., ICCV 2025",
                 doc="outlier mitigation (SOM), attention enhancer (SAE), integrator (HAI)")
register_encoder("sc-clip", SCCLIPEncoder, display="SC-CLIP", config_type=SFPConfig,
                 citation="Bai et al., SC-CLIP",
                 doc="SC-CLIP: LOF outliers, similarity-and-key attention, multi-level "
                     "integration (SFPConfig.preset('sc-clip'))")
