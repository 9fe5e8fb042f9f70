"""Record what happens inside a CLIP visual transformer: attention, hidden states, neurons.

>>> trace = record(bundle, images)                # all layers, attention + hidden states
>>> trace.cls_attention(11).shape                  # (B, H, N): class token -> each patch
>>> trace.outliers("som", 11).mask                 # (B, N) bool
>>> record(bundle, images, layers=[6], store=("mlp",)).mlp(6)   # (B, T, d_mlp) neurons

Layers are numbered 1..L: layer ``l`` is block ``l``. Recording is a set of observing hooks on
:mod:`sfp.core.forward`'s hook points, so the model's outputs with and without recording are
the same numbers; ``record(..., fwd_hooks=...)`` records under an intervention (the
recorders run after the given hooks, so they see the intervened values).

What ``store`` may hold, per recorded layer (B images, H heads, T tokens, C width, d_mlp MLP
neurons; float32 bytes for ViT-B/16 at 224 px, T = 197, per image and layer):

=============  ===========================  ===============  ==========================
store          hook point                   shape            bytes (ViT-B/16, 224 px)
=============  ===========================  ===============  ==========================
"attention"    ``attn.hook_pattern``        (B, H, T, T)     1.86 MB (heads="mean": 155 kB)
"hidden"       ``hook_resid_post``          (B, T, C)        605 kB
"mlp"          ``mlp.hook_post``            (B, T, d_mlp)    2.42 MB
"attn_out"     ``hook_attn_out``            (B, T, C)        605 kB
"mlp_out"      ``hook_mlp_out``             (B, T, C)        605 kB
"head_out"     ``attn.hook_z`` x out_proj   (B, H, T, C)     7.26 MB
=============  ===========================  ===============  ==========================

Token norms ``(B, T)`` (788 bytes) are kept for every recorded layer. For ViT-L/14 at 336 px
(T = 577, 16 heads, width 1024, d_mlp 4096) multiply attention by ~26, the others by ~4;
record only the layers and quantities you need (``layers=``, ``store=``, ``heads="mean"``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sfp.core import forward
from sfp.core.errors import SFPError
from sfp.core.hooks import HookFn, Hooks, block_hook

__all__ = ["HEAD_CHOICES", "STORE_CHOICES", "Recorder", "Trace", "TraceError", "record"]

#: Hook point each stored quantity is read at.
_POINTS = {
    "attention": "attn.hook_pattern",
    "hidden": "hook_resid_post",
    "mlp": "mlp.hook_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "head_out": "attn.hook_z",
}
STORE_CHOICES: tuple[str, ...] = tuple(_POINTS)
DEFAULT_STORE = ("attention", "hidden")
HEAD_CHOICES = ("all", "mean")
_FORMAT = "sfp.Trace/2"


class TraceError(SFPError, KeyError, ValueError):
    """A layer, quantity or file the trace does not hold, or an argument record cannot take."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def _check_layers(layers: Iterable[int] | int | None, num_layers: int) -> tuple[int, ...]:
    if layers is None:
        return tuple(range(1, num_layers + 1))
    if isinstance(layers, int):
        layers = [layers]
    out = sorted({int(layer) for layer in layers})
    bad = [layer for layer in out if not 1 <= layer <= num_layers]
    if bad:
        raise TraceError(
            f"layers must be block numbers 1..{num_layers} (layer l = output of block l); "
            f"got {bad}."
        )
    return tuple(out)


def _check_store(store: Iterable[str] | str) -> tuple[str, ...]:
    store = (store,) if isinstance(store, str) else tuple(store)
    unknown = [s for s in store if s not in STORE_CHOICES]
    if unknown:
        raise TraceError(f"store must be a subset of {STORE_CHOICES}, got {unknown}.")
    return store


class Recorder:
    """Observing hooks that keep chosen quantities of chosen layers (see the module doc).

    ``recorder.hooks(visual)`` gives the :class:`~sfp.core.hooks.Hooks` to run the forward
    with; afterwards ``recorder.to_trace(...)`` packs what they saw into a :class:`Trace`.
    Encoders that run their own forward (the SFP encoder) use it the same way.
    """

    def __init__(
        self,
        layers: Iterable[int],
        *,
        heads: str = "all",
        store: Iterable[str] | str = DEFAULT_STORE,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if heads not in HEAD_CHOICES:
            raise TraceError(f"heads must be one of {HEAD_CHOICES}, got {heads!r}.")
        self.layers = tuple(sorted(set(layers)))
        self.heads = heads
        self.store = _check_store(store)
        self.dtype = dtype
        self.data: dict[str, dict[int, torch.Tensor]] = {
            kind: {} for kind in ("norms", *self.store)
        }

    def _keep(self, kind: str, layer: int, x: torch.Tensor) -> None:
        self.data[kind][layer] = x.detach().to(self.dtype)

    def _observer(self, kind: str, layer: int, block: torch.nn.Module) -> HookFn:
        def look(x: torch.Tensor, name: str) -> None:
            if kind == "hidden":
                self.data["norms"][layer] = x.detach().float().norm(dim=-1).to(self.dtype)
                if "hidden" in self.store:
                    self._keep("hidden", layer, x)
            elif kind == "attention":
                self._keep(kind, layer, x.mean(dim=1, keepdim=True) if self.heads == "mean"
                           else x)
            elif kind == "head_out":
                self._keep(kind, layer, head_contributions(block, x))
            else:
                self._keep(kind, layer, x)
            return None

        return look

    def hooks(self, visual: torch.nn.Module) -> Hooks:
        """The observing hooks for ``visual``'s blocks (norms always, via hook_resid_post)."""
        blocks = forward.blocks_of(visual)
        pairs: list[tuple[str, Callable[..., None]]] = []
        kinds = dict.fromkeys(["hidden", *self.store])
        for layer in self.layers:
            for kind in kinds:
                pairs.append((block_hook(layer, _POINTS[kind]),
                              self._observer(kind, layer, blocks[layer - 1])))
        return Hooks(pairs, len(blocks))

    def to_trace(self, grid: forward.Grid, num_layers: int, **meta: Any) -> Trace:
        return Trace(grid=tuple(grid), num_layers=num_layers, layers=self.layers,
                     heads=self.heads, data=self.data, meta=dict(meta))


def head_contributions(block: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Each head's share of the attention branch: z (B, H, T, d) -> (B, H, T, C).

    ``ls_1(z_h @ W_O[:, h]^T)`` per head h; summed over heads, plus ``ls_1(out_proj.bias)``,
    it is the block's ``hook_attn_out``.
    """
    h, d = z.shape[1], z.shape[-1]
    w = block.attn.out_proj.weight.view(-1, h, d)  # (C, H, d)
    return block.ls_1(torch.einsum("bhtd,chd->bhtc", z, w.to(z.dtype)))


def model_meta(bundle: Any, images: torch.Tensor) -> dict[str, Any]:
    return {
        "model": getattr(bundle, "name", "?"),
        "pretrained": getattr(bundle, "pretrained", "unknown"),
        "provenance": getattr(bundle, "provenance", "unknown"),
        "caveat": getattr(bundle, "caveat", None),
        "image_size": [int(images.shape[2]), int(images.shape[3])],
    }


def record(
    bundle: Any,
    images: torch.Tensor,
    *,
    layers: Iterable[int] | int | None = None,
    heads: str = "all",
    store: Iterable[str] | str = DEFAULT_STORE,
    dtype: torch.dtype = torch.float32,
    fwd_hooks: Hooks | Iterable[tuple[str, HookFn]] | None = None,
) -> Trace:
    """Run the visual tower on ``images`` (B, 3, H, W), normalised, and record it.

    Args:
        bundle: a :class:`sfp.models.loading.ModelBundle`.
        layers: block numbers 1..L to record (None = all). Token norms are kept for every
            recorded layer whatever ``store`` says.
        heads: ``"all"`` keeps (B, H, T, T) attention per layer; ``"mean"`` the head mean.
        store: which of :data:`STORE_CHOICES` to keep (see the module docstring).
        dtype: dtype of the stored tensors.
        fwd_hooks: interventions to record under (``[(hook name, fn), ...]``).

    Returns a :class:`Trace` of ordinary tensors (recorded under ``torch.no_grad``);
    ``trace.image_embedding`` (B, D) is the model's output.
    """
    visual = forward.visual_of(bundle)
    num_layers = len(forward.blocks_of(visual))
    rec = Recorder(_check_layers(layers, num_layers), heads=heads, store=store, dtype=dtype)
    hooks = Hooks.of(fwd_hooks, num_layers) + rec.hooks(visual)
    with torch.no_grad():
        x, grid = forward.run(visual, images, hooks)
        trace = rec.to_trace(grid, num_layers, **model_meta(bundle, images))
        trace.image_embedding = forward.pool(visual, x)
    return trace


@dataclass
class Trace:
    """Per-layer recordings of one forward of a batch of B images.

    T = 1 + N tokens (class token first), N = gh * gw patches in row-major order. ``data``
    maps a quantity (``"norms"`` and the :data:`STORE_CHOICES`) to ``{layer: tensor}``.
    """

    grid: tuple[int, int]
    num_layers: int
    layers: tuple[int, ...]
    heads: str = "all"
    data: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict, repr=False)
    meta: dict[str, Any] = field(default_factory=dict)
    image_embedding: torch.Tensor | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ access
    def _get(self, kind: str, layer: int) -> torch.Tensor:
        layer = int(layer)
        if not 1 <= layer <= self.num_layers:
            raise TraceError(
                f"layer {layer} is outside 1..{self.num_layers} (layer l = output of block l)."
            )
        store = self.data.get(kind, {})
        if layer not in store:
            if layer not in self.layers:
                raise TraceError(
                    f"layer {layer} was not recorded (recorded: {list(self.layers)}); "
                    f"record(..., layers=[..., {layer}])."
                )
            what = "token norms" if kind == "norms" else kind
            raise TraceError(
                f"{what} was not stored for layer {layer}; record(..., store=(..., {kind!r}))."
            )
        return store[layer]

    def has(self, kind: str) -> bool:
        """Whether quantity ``kind`` (e.g. ``"mlp"``) was stored."""
        return bool(self.data.get(kind))

    @property
    def batch_size(self) -> int:
        return int(next(iter(self.data["norms"].values())).shape[0])

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def has_attention(self) -> bool:
        """Whether attention was stored (``record(..., store=("attention", ...))``)."""
        return self.has("attention")

    @property
    def has_hidden(self) -> bool:
        """Whether hidden states were stored (``record(..., store=("hidden", ...))``)."""
        return self.has("hidden")

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) in pixels of the recorded input."""
        h, w = self.meta["image_size"]
        return int(h), int(w)

    @property
    def num_heads(self) -> int:
        """Heads stored per layer (1 when recorded with heads="mean")."""
        if not self.has_attention:
            raise TraceError("no attention was stored; record(..., store=('attention', ...)).")
        return int(next(iter(self.data["attention"].values())).shape[1])

    @property
    def label(self) -> str:
        """``"ViT-B-16 / openai"``-style description of the model that made this trace."""
        return f"{self.meta.get('model', '?')} / {self.meta.get('pretrained', '?')}"

    @property
    def provenance(self) -> str:
        """Where the model's weights came from: pretrained, file, random, synthetic, ..."""
        return str(self.meta.get("provenance", "unknown"))

    @property
    def is_synthetic(self) -> bool:
        return self.provenance == "synthetic"

    @property
    def caveat(self) -> str | None:
        """What every view of this trace must say about the model (None for real weights)."""
        return self.meta.get("caveat")

    def attention(self, layer: int) -> torch.Tensor:
        """Attention of block ``layer``: (B, H, T, T), rows sum to 1 (H = 1 for heads="mean")."""
        return self._get("attention", layer)

    def mean_attention(self, layer: int) -> torch.Tensor:
        """Head-averaged attention: (B, T, T)."""
        return self.attention(layer).mean(dim=1)

    def cls_attention(self, layer: int) -> torch.Tensor:
        """Class token -> each patch: (B, H, N)."""
        return self.attention(layer)[:, :, 0, 1 : 1 + self.num_patches]

    def self_attention(self, layer: int) -> torch.Tensor:
        """Each patch -> itself (the diagonal): (B, H, N)."""
        diag = torch.diagonal(self.attention(layer), dim1=-2, dim2=-1)
        return diag[:, :, 1 : 1 + self.num_patches]

    def hidden(self, layer: int) -> torch.Tensor:
        """Output tokens of block ``layer`` (``hook_resid_post``): (B, T, C)."""
        return self._get("hidden", layer)

    def token_norms(self, layer: int) -> torch.Tensor:
        """L2 norm of every token of block ``layer``'s output: (B, T)."""
        return self._get("norms", layer)

    def mlp(self, layer: int) -> torch.Tensor:
        """MLP neuron activations after the nonlinearity (``mlp.hook_post``): (B, T, d_mlp)."""
        return self._get("mlp", layer)

    def attn_out(self, layer: int) -> torch.Tensor:
        """The attention branch block ``layer`` adds to the residual: (B, T, C)."""
        return self._get("attn_out", layer)

    def mlp_out(self, layer: int) -> torch.Tensor:
        """The MLP branch block ``layer`` adds to the residual: (B, T, C)."""
        return self._get("mlp_out", layer)

    def head_out(self, layer: int) -> torch.Tensor:
        """Each head's share of the attention branch: (B, H, T, C) (see
        :func:`head_contributions`)."""
        return self._get("head_out", layer)

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """Per-patch values (..., N) -> (..., gh, gw); a leading cls entry (T = N+1) is dropped."""
        n = x.shape[-1]
        if n == self.num_patches + 1:
            x = x[..., 1:]
        elif n != self.num_patches:
            raise ValueError(
                f"last dimension must be N={self.num_patches} patches (or T=N+1 tokens); got {n}."
            )
        return x.reshape(*x.shape[:-1], *self.grid)

    def outliers(self, method: str, layer: int, **params: Any):
        """Run a registered detector (see :mod:`sfp.core.outliers`) on this trace at ``layer``."""
        from sfp.core.outliers import detect

        return detect(method, self, layer, **params)

    @property
    def nbytes(self) -> int:
        """Bytes held by the recorded tensors."""
        return int(sum(t.numel() * t.element_size() for d in self.data.values()
                       for t in d.values()))

    def __repr__(self) -> str:
        stored = [k for k, d in self.data.items() if d and k != "norms"]
        return (
            f"Trace({self.label}, B={self.batch_size}, grid={self.grid}, layers="
            f"{list(self.layers)}, heads={self.heads!r}, stored={stored}, "
            f"{self.nbytes / 2**20:.1f} MB)"
        )

    # --------------------------------------------------------------- save/load
    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {f"{kind}.{layer}": t.detach().cpu().contiguous()
               for kind, store in self.data.items() for layer, t in store.items()}
        if self.image_embedding is not None:
            out["image_embedding"] = self.image_embedding.detach().cpu().contiguous()
        return out

    def _header(self) -> str:
        return json.dumps(
            {"grid": list(self.grid), "num_layers": self.num_layers, "layers": list(self.layers),
             "heads": self.heads, "meta": self.meta, "format": _FORMAT}
        )

    def save(self, path: str | Path) -> Path:
        """Write to ``.npz`` or ``.safetensors`` (chosen by suffix; no pickle either way).

        bf16 tensors are widened to float32 in ``.npz`` files (numpy has no bf16).
        """
        path = Path(path)
        tensors = self._tensors()
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(path), metadata={"sfp_trace": self._header()})
        elif path.suffix == ".npz":
            arrays = {
                k: (v.float() if v.dtype == torch.bfloat16 else v).numpy()
                for k, v in tensors.items()
            }
            np.savez(path, __header__=np.array(self._header()), **arrays)
        else:
            raise TraceError(f"Trace files end in .npz or .safetensors, got {path.name!r}.")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        """Read a trace written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No trace file at {path}.")
        try:
            header, tensors = _read(path)
        except (KeyError, ValueError, OSError) as exc:
            raise TraceError(f"{path} is not an sfp Trace file ({exc}).") from exc
        data: dict[str, dict[int, torch.Tensor]] = {}
        for key, t in tensors.items():
            if key != "image_embedding":
                kind, layer = key.split(".")
                data.setdefault(kind, {})[int(layer)] = t
        meta = dict(header["meta"])
        if header.get("format") == "sfp.Trace/1":  # written before provenance was recorded
            synthetic = str(meta.get("pretrained", "")).startswith("synthetic")
            meta.setdefault("provenance", "synthetic" if synthetic else "unknown")
            meta.setdefault("caveat", "synthetic (planted outliers)" if synthetic else None)
        return cls(grid=tuple(header["grid"]), num_layers=int(header["num_layers"]),
                   layers=tuple(header["layers"]), heads=header["heads"], data=data, meta=meta,
                   image_embedding=tensors.get("image_embedding"))


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(header, tensors) of a trace file; old ``attention``/``hidden``/``norms`` keys kept."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {})["sfp_trace"])
        return header, load_file(str(path))
    with np.load(path, allow_pickle=False) as z:
        header = json.loads(str(z["__header__"]))
        return header, {k: torch.from_numpy(z[k]) for k in z.files if k != "__header__"}
