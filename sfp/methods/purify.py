"""The SFP encoder (Jin et al., ICCV 2025): outlier mitigator, attention enhancer, integrator.

:class:`SFPEncoder` replaces the tail of :mod:`sfp.core.forward`'s forward path. With the official
preset (:meth:`sfp.methods.config.SFPConfig.official`) it computes, for L blocks (DESIGN.md §4):

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

Batches are processed at once, each image with its own outlier set; any depth works (layers
come from ``config.resolve``); similarity matrices and softmaxes are computed in float32 and
cast back to the model's dtype. The paper preset and the readings it needs are described in
``docs/sfp_presets.md`` and :class:`sfp.methods.config.SFPConfig`.

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
from sfp.core.outliers import MitigationReport, get_detector, mitigate_with_report
from sfp.methods.baselines import attend, correlative_probs
from sfp.methods.config import ResolvedConfig, SFPConfig
from sfp.methods.encoders import Encoder

__all__ = [
    "SFPEncoder",
    "SFPStages",
    "hai_official",
    "hai_paper",
    "hai_paper_matrix",
    "normalize_rows_cols",
    "rownorm_apply",
    "sae_official",
    "sae_paper",
    "similarity_logits",
    "similarity_matrix",
]

# Smallest norm a token is divided by when L2-normalised (a zero vector gives a zero row
# instead of NaN; every other vector is normalised exactly as x / ||x||).
_MIN_NORM = 1e-12


# --------------------------------------------------------------------------------------------
# Pure stage functions
# --------------------------------------------------------------------------------------------


def similarity_matrix(tokens: Tensor, threshold: float = 0.4) -> Tensor:
    """Thresholded cosine-similarity matrix of patch tokens, in float32.

    tokens: (B, N, C) -> S (B, N, N) with S[b, i, j] = cos(t_i, t_j), entries below
    ``threshold`` set to 0.
    """
    t = tokens.float()
    t = t / t.norm(dim=-1, keepdim=True).clamp_min(_MIN_NORM)
    s = t @ t.transpose(-1, -2)
    return s.masked_fill(s < threshold, 0.0)


def rownorm_apply(s: Tensor, x: Tensor, eps: float = 1e-6) -> Tensor:
    """Similarity-weighted average: (S / (row sums of S + eps)) @ X.

    s: (B, N, N), x: (B, N, C) -> (B, N, C) in x's dtype (computed in float32).
    """
    s = s.float()
    w = s / (s.sum(dim=-1, keepdim=True) + eps)
    return (w @ x.float()).to(x.dtype)


def similarity_logits(s: Tensor, temperature: float = 3.0) -> Tensor:
    """The SAE/HAI similarity logits M of the official preset, in float32.

    s: thresholded S_pre (B, N, N) -> M = temperature * (S - mean(S)) with the mean taken
    per image over all N x N entries; entries < 0 become -inf. A diagonal entry that would be
    < 0 (only when a token's self-similarity is below the mean, e.g. a zero token) is set to
    0 instead, so no row is all -inf (softmax stays finite); otherwise M is unchanged.
    """
    s = s.float()
    m = (s - s.mean(dim=(-2, -1), keepdim=True)) * temperature
    diag = torch.diagonal(m, dim1=-2, dim2=-1)
    diag.clamp_(min=0.0)
    return m.masked_fill(m < 0.0, float("-inf"))


def _official_attention(
    q: Tensor, k: Tensor, m: Tensor, mixture: bool
) -> Tensor:
    """(B, H, N, N) float32: mean of softmax(qq^T s), softmax(kk^T s), softmax(M) (mixture),
    or softmax(M) for every head."""
    a_m = torch.softmax(m, dim=-1).unsqueeze(1)
    if not mixture:
        return a_m.expand(-1, q.shape[1], -1, -1)
    return (correlative_probs(q, k) + a_m) / 3


def _attend(block: nn.Module, attn: Tensor, v: Tensor) -> Tensor:
    """out_proj(attn @ v): attn (B, H, N, N) float32, v (B, H, N, d) -> (B, N, C), v's dtype."""
    return forward.merge_heads(block, attend(attn, v))


def sae_official(
    block: nn.Module,
    x: Tensor,
    s_pre: Tensor,
    cls: Tensor | None = None,
    *,
    res_cls: float = 0.3,
    temperature: float = 3.0,
) -> Tensor:
    """The release's semantic-aware attention enhancer, in place of block L.

    x: (B, N, C) patch tokens, s_pre: (B, N, N) thresholded reference similarity, cls: (B, C)
    class token of h_{L-1} (None: no class-token term). With q, k, v = in_proj(ln_1(x)) per
    head: attn = (softmax(qq^T/sqrt(d)) + softmax(kk^T/sqrt(d)) + softmax(M)) / 3, M =
    :func:`similarity_logits`; returns out_proj(attn v) + res_cls * cls: (B, N, C). No MLP, no
    residual.
    """
    q, k, v = forward.qkv(block, block.ln_1(x))
    m = similarity_logits(s_pre, temperature)
    out = _attend(block, _official_attention(q, k, m, mixture=True), v)
    if cls is not None:
        out = out + res_cls * cls.unsqueeze(1).to(out.dtype)
    return out


def hai_official(
    block: nn.Module,
    hidden_sum: Tensor,
    s_pre: Tensor,
    s_post: Tensor | None = None,
    *,
    res_cls: float = 0.3,
    temperature: float = 3.0,
    attention: str = "similarity",
    eps: float = 1e-6,
) -> Tensor:
    """The release's hierarchical attention integrator term Z.

    hidden_sum: P = sum of hidden states over the HAI layers (B, 1 + N, C), class token first;
    s_pre: (B, N, N) gives M (:func:`similarity_logits`); s_post: (B, N, N) or None.
    v = in_proj_v(ln_1(P patches)) of block L; attention "similarity": softmax(M) for every
    head, "sae": the SAE mixture (:func:`sae_official`). Z = out_proj(attn v) + res_cls *
    cls(P), then Z <- rownorm(S_post) Z when s_post is given. Returns Z: (B, N, C).
    """
    if attention not in ("similarity", "sae"):
        raise ValueError(f"attention must be 'similarity' or 'sae', got {attention!r}")
    q, k, v = forward.qkv(block, block.ln_1(hidden_sum[:, 1:]))
    m = similarity_logits(s_pre, temperature)
    z = _attend(block, _official_attention(q, k, m, mixture=attention == "sae"), v)
    z = z + res_cls * hidden_sum[:, :1].to(z.dtype)
    if s_post is not None:
        z = rownorm_apply(s_post, z, eps)
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
) -> Tensor:
    """The paper's SAE (eq. 6-7) with block L's weights.

    x: F_SOM (B, N, C); cls: (B, C) to let the class token take part (None: patches only).
    attn = softmax(omega (qq^T + kk^T) / sqrt(d)) per head, q, k from ln_1(x) (``ln1``) or x.
    value "proj": a = out_proj(attn v); "identity": a = mean_h(attn) @ x.
    form "block": X1 = x + a, F = X1 + mlp(ln_2(X1)) (a standard pre-norm block's residuals);
    "eq7": F = x + mlp(ln_2(a)). Returns F_SAE: (B, N, C) (patch tokens).
    """
    if value not in ("proj", "identity"):
        raise ValueError(f"value must be 'proj' or 'identity', got {value!r}")
    if form not in ("block", "eq7"):
        raise ValueError(f"form must be 'block' or 'eq7', got {form!r}")
    tokens = x if cls is None else torch.cat([cls.unsqueeze(1).to(x.dtype), x], dim=1)
    q, k, v = forward.qkv(block, block.ln_1(tokens) if ln1 else tokens)
    qf, kf = q.float(), k.float()
    logits = (qf @ qf.transpose(-1, -2) + kf @ kf.transpose(-1, -2)) * (
        omega * q.shape[-1] ** -0.5
    )
    attn = torch.softmax(logits, dim=-1)
    if value == "proj":
        a = block.ls_1(_attend(block, attn, v))
    else:
        a = (attn.mean(dim=1) @ tokens.float()).to(tokens.dtype)
    if form == "block":
        h = tokens + a
        out = h + block.ls_2(block.mlp(block.ln_2(h)))
    else:
        out = tokens + block.ls_2(block.mlp(block.ln_2(a)))
    return out if cls is None else out[:, 1:]


def hai_layer_term(attention: Tensor, mask: Tensor | None = None) -> Tensor:
    """One layer's contribution to the paper's HAI (eq. 8), in float32.

    attention: (B, H, T, T) per head (or (B, T, T) averaged), T = 1 + N; mask: (B, N) bool
    outliers S_l of that layer or None. Head-averaged patch-to-patch attention with the
    outlier columns set to 0: (B, N, N).
    """
    a = attention.float()
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
    a = a.float()
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
    return (a @ features.float()).to(features.dtype), a


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


class SFPEncoder(Encoder):
    """SFP dense encoder: ``images (B, 3, H, W) -> patch features (B, N, D)``.

    Args:
        bundle: a :class:`sfp.models.loading.ModelBundle` (any open_clip ViT depth).
        config: an :class:`SFPConfig` (None: ``SFPConfig.official()``). Its layers are
            resolved for the bundle's depth at construction (ConfigError if they do not fit).
    """

    name = "sfp"

    def __init__(self, bundle: Any, config: SFPConfig | None = None) -> None:
        super().__init__(bundle)
        config = SFPConfig.official() if config is None else config
        if not isinstance(config, SFPConfig):
            raise TypeError(f"config must be an SFPConfig, got {type(config).__name__}")
        self._config = config
        self._visual = forward.visual_of(bundle)
        self.resolved = config.resolve(len(forward.blocks_of(self._visual)))
        self._detector = get_detector(config.detector)
        self._detector_kwargs = config.detector_kwargs()

    @property
    def visual(self) -> nn.Module:
        return self._visual

    def encode_patches(self, images: Tensor) -> Tensor:
        """Patch features after ln_post and proj, not normalised: (B, 3, H, W) -> (B, N, D)."""
        return self._forward(images, trace=False).features

    @torch.no_grad()
    def stages(self, images: Tensor, trace: bool = False) -> SFPStages:
        """Run SFP once and return every intermediate result (:class:`SFPStages`).

        images: (B, 3, H, W) normalised. trace=True also records every block's raw output and
        attention in a :class:`sfp.core.probe.Trace` (memory: ~L x B x H x T^2 floats).
        """
        return self._forward(images, trace=trace)

    # ------------------------------------------------------------------------------------
    def _forward(self, images: Tensor, trace: bool) -> SFPStages:
        cfg, r = self._config, self.resolved
        visual = self._visual
        blocks = forward.blocks_of(visual)
        last = r.last_layer
        det = self._detector
        som_layers = set(r.som_layers)

        x, grid = forward.embed(visual, images)
        b = x.shape[0]

        official_sae = cfg.sae and cfg.sae_variant == "official"
        official_hai = cfg.hai and cfg.hai_variant == "official"
        paper_hai = cfg.hai and cfg.hai_variant == "paper"
        need_s_pre = cfg.pre_aggregate or official_sae or official_hai
        keep: set[int] = set()
        if need_s_pre:
            keep.add(r.ref_layer)
        if cfg.post_aggregate:
            keep.add(r.post_layer)
        attn_layers: set[int] = set()
        if det.needs == "attention":
            attn_layers |= som_layers
        if paper_hai:
            attn_layers |= set(r.hai_layers)

        recorder = None
        if trace:
            from sfp.core.probe import Recorder

            run = range(1, r.num_layers + 1) if not cfg.sae else range(1, last + 1)
            recorder = Recorder(run)
            attn_layers |= set(run)

        hidden: dict[int, Tensor] = {}
        masks: dict[int, Tensor] = {}
        scores: dict[int, Tensor] = {}
        reports: dict[int, MitigationReport] = {}
        p_sum: Tensor | None = None
        a_sum: Tensor | None = None
        x_raw: Tensor | None = None

        for layer in range(1, last + 1):
            out = forward.block_forward(blocks[layer - 1], x, need_attention=layer in attn_layers)
            if recorder is not None:
                recorder(layer, out)
            h = out.hidden
            if layer in som_layers:
                source = out.attention if det.needs == "attention" else h
                result = det(source, **self._detector_kwargs)
                masks[layer], scores[layer] = result.mask, result.scores
                if layer == last:
                    x_raw = h[:, 1:]
                patches, reports[layer] = mitigate_with_report(h[:, 1:], grid, result.mask)
                h = torch.cat([h[:, :1], patches], dim=1)
            if layer in keep:
                hidden[layer] = h
            if official_hai and layer in r.hai_layers:
                p_sum = h if p_sum is None else p_sum + h
            if paper_hai and layer in r.hai_layers:
                assert out.attention is not None
                term = hai_layer_term(out.attention, masks.get(layer))
                a_sum = term if a_sum is None else a_sum + term
            x = h

        cls, xs = x[:, 0], x[:, 1:]
        if x_raw is None:
            x_raw = xs
        mask = masks.get(r.detect_layer)
        if mask is None:
            mask = torch.zeros(b, grid[0] * grid[1], dtype=torch.bool, device=x.device)

        # Step 4: reference similarity (h_ref mitigated at the final outlier positions).
        s_pre = None
        ref_report = None
        if need_s_pre:
            ref = hidden[r.ref_layer][:, 1:]
            if cfg.som:
                ref, ref_report = mitigate_with_report(ref, grid, mask)
            s_pre = similarity_matrix(ref, cfg.sim_threshold)
        x_som = xs
        x_pre = rownorm_apply(s_pre, xs, cfg.eps) if cfg.pre_aggregate and s_pre is not None else xs

        # Step 5: SAE in place of block L.
        block_l = blocks[r.num_layers - 1]
        if not cfg.sae:
            std = forward.block_forward(
                block_l, torch.cat([x[:, :1], x_pre], dim=1), need_attention=recorder is not None
            )
            if recorder is not None:
                recorder(r.num_layers, std)
            x_sae = std.hidden[:, 1:]
        elif cfg.sae_variant == "official":
            assert s_pre is not None
            x_sae = sae_official(
                block_l, x_pre, s_pre, cls, res_cls=cfg.res_cls, temperature=cfg.sim_temperature
            )
        else:
            x_sae = sae_paper(
                block_l,
                x_pre,
                cls if cfg.paper_sae_cls else None,
                omega=cfg.omega,
                ln1=cfg.paper_sae_ln1,
                value=cfg.paper_sae_value,
                form=cfg.paper_sae_form,
            )

        # Step 6: post similarity.
        s_post = None
        x_post = x_sae
        if cfg.post_aggregate:
            s_post = similarity_matrix(hidden[r.post_layer][:, 1:], cfg.sim_threshold)
            x_post = rownorm_apply(s_post, x_sae, cfg.eps)

        # Step 7: HAI.
        z = None
        hai_matrix = None
        x_final = x_post
        if official_hai:
            assert p_sum is not None and s_pre is not None
            z = hai_official(
                block_l,
                p_sum,
                s_pre,
                s_post,
                res_cls=cfg.res_cls,
                temperature=cfg.sim_temperature,
                attention=cfg.hai_attention,
                eps=cfg.eps,
            )
            x_final = x_post + z
        elif paper_hai:
            assert a_sum is not None
            hai_matrix = normalize_rows_cols(a_sum, cfg.hai_iterations, cfg.eps)
            x_final = (hai_matrix @ x_post.float()).to(x_post.dtype)

        features = forward.project_patches(visual, x_final)
        tr = None
        if recorder is not None:
            tr = recorder.to_trace(
                grid,
                len(blocks),
                model=getattr(self.bundle, "name", type(visual).__name__),
                pretrained=getattr(self.bundle, "pretrained", "unknown"),
                image_size=[int(images.shape[2]), int(images.shape[3])],
                recorded_by="SFPEncoder.stages",
                sfp_config=cfg.to_code(),
            )
        return SFPStages(
            config=r,
            grid=grid,
            mask=mask,
            masks=masks,
            scores=scores,
            reports=reports,
            reference_report=ref_report,
            cls=cls,
            x_raw=x_raw,
            x_som=x_som,
            x_pre=x_pre,
            x_sae=x_sae,
            x_post=x_post,
            z=z,
            hai_matrix=hai_matrix,
            x_final=x_final,
            features=features,
            s_pre=s_pre,
            s_post=s_post,
            trace=tr,
        )

    def __repr__(self) -> str:
        return (
            f"SFPEncoder(model={getattr(self.bundle, 'label', '?')!r}, "
            f"config={self._config!r})"
        )
