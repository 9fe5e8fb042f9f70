"""Record what happens inside a CLIP visual transformer: per-layer attention, hidden states.

>>> trace = record(bundle, images)                # all layers, all heads
>>> trace.cls_attention(11).shape                  # (B, H, N): class token -> each patch
>>> trace.outliers("som", 11).mask                 # (B, N) bool

Layers are numbered 1..L: layer ``l`` is the output of block ``l`` (its attention is the one
block ``l`` computed). Recording taps :mod:`sfp.core.forward`'s forward without changing it: the
probabilities are computed beside the block's own attention, so the model's outputs with
and without recording are the same numbers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sfp.core import forward

STORE_CHOICES = ("attention", "hidden")
HEAD_CHOICES = ("all", "mean")


class TraceError(KeyError):
    """A layer or quantity that the trace does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def _check_layers(layers: Iterable[int] | None, num_layers: int) -> tuple[int, ...]:
    if layers is None:
        return tuple(range(1, num_layers + 1))
    if isinstance(layers, int):
        layers = [layers]
    out = sorted({int(layer) for layer in layers})
    bad = [layer for layer in out if not 1 <= layer <= num_layers]
    if bad:
        raise ValueError(
            f"layers must be block numbers 1..{num_layers} (layer l = output of block l); "
            f"got {bad}."
        )
    return tuple(out)


class Recorder:
    """A :data:`sfp.core.forward.Tap` that keeps hidden states and attention of chosen layers.

    Encoders that run their own forward (the SFP encoder) pass one of these as ``tap`` to
    :func:`sfp.core.forward.run_blocks` and turn it into a :class:`Trace` afterwards.
    """

    def __init__(
        self,
        layers: Iterable[int],
        *,
        heads: str = "all",
        store: Iterable[str] = STORE_CHOICES,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        store = (store,) if isinstance(store, str) else tuple(store)
        unknown = [s for s in store if s not in STORE_CHOICES]
        if unknown:
            raise ValueError(f"store must be a subset of {STORE_CHOICES}, got {unknown}.")
        if heads not in HEAD_CHOICES:
            raise ValueError(f"heads must be one of {HEAD_CHOICES}, got {heads!r}.")
        self.layers = frozenset(layers)
        self.heads = heads
        self.store = store
        self.dtype = dtype
        self.attention: dict[int, torch.Tensor] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        self.norms: dict[int, torch.Tensor] = {}

    @property
    def attention_layers(self) -> frozenset[int]:
        """Layers whose attention probabilities the forward must compute."""
        return self.layers if "attention" in self.store else frozenset()

    def __call__(self, layer: int, out: forward.BlockOutput) -> None:
        if layer not in self.layers:
            return
        h = out.hidden.detach()
        self.norms[layer] = h.float().norm(dim=-1).to(self.dtype)
        if "hidden" in self.store:
            self.hidden[layer] = h.to(self.dtype)
        if "attention" in self.store and out.attention is not None:
            a = out.attention.detach()
            if self.heads == "mean":
                a = a.mean(dim=1, keepdim=True)
            self.attention[layer] = a.to(self.dtype)

    def to_trace(self, grid: forward.Grid, num_layers: int, **meta: Any) -> Trace:
        return Trace(
            grid=tuple(grid),
            num_layers=num_layers,
            layers=tuple(sorted(self.layers)),
            heads=self.heads,
            _attention=self.attention,
            _hidden=self.hidden,
            _norms=self.norms,
            meta=dict(meta),
        )


@torch.inference_mode()
def record(
    bundle,
    images: torch.Tensor,
    *,
    layers: Iterable[int] | None = None,
    heads: str = "all",
    store: Iterable[str] = STORE_CHOICES,
    dtype: torch.dtype = torch.float32,
) -> Trace:
    """Run the visual tower on ``images`` (B, 3, H, W), normalised, and record it.

    Args:
        bundle: a :class:`sfp.models.loading.ModelBundle`.
        layers: block numbers 1..L to record (None = all). Token norms are kept for every
            recorded layer whatever ``store`` says.
        heads: ``"all"`` keeps (B, H, T, T) per layer; ``"mean"`` keeps the head mean only.
        store: which of ``"attention"``, ``"hidden"`` to keep.
        dtype: dtype of the stored tensors.

    Returns a :class:`Trace`; ``trace.image_embedding`` (B, D) is the model's output.
    """
    visual = forward.visual_of(bundle)
    num_layers = len(forward.blocks_of(visual))
    rec = Recorder(_check_layers(layers, num_layers), heads=heads, store=store, dtype=dtype)
    x, grid = forward.embed(visual, images)
    x = forward.run_blocks(visual, x, attention_layers=rec.attention_layers, tap=rec)
    trace = rec.to_trace(
        grid,
        num_layers,
        model=getattr(bundle, "name", type(visual).__name__),
        pretrained=getattr(bundle, "pretrained", "unknown"),
        image_size=[int(images.shape[2]), int(images.shape[3])],
    )
    trace.image_embedding = forward.pool(visual, x).detach()
    return trace


@dataclass
class Trace:
    """Per-layer recordings of one forward of a batch of B images.

    T = 1 + N tokens (class token first), N = gh * gw patches in row-major order.
    """

    grid: tuple[int, int]
    num_layers: int
    layers: tuple[int, ...]
    heads: str = "all"
    _attention: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _hidden: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _norms: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    meta: dict[str, Any] = field(default_factory=dict)
    image_embedding: torch.Tensor | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ access
    def _get(self, store: dict[int, torch.Tensor], layer: int, what: str) -> torch.Tensor:
        layer = int(layer)
        if not 1 <= layer <= self.num_layers:
            raise TraceError(
                f"layer {layer} is outside 1..{self.num_layers} (layer l = output of block l)."
            )
        if layer not in store:
            if layer not in self.layers:
                raise TraceError(
                    f"layer {layer} was not recorded (recorded: {list(self.layers)}); "
                    f"record(..., layers=[..., {layer}])."
                )
            raise TraceError(
                f"{what} was not stored for layer {layer}; record(..., store=(..., {what!r}))."
            )
        return store[layer]

    @property
    def batch_size(self) -> int:
        any_t = next(iter(self._norms.values()))
        return int(any_t.shape[0])

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def has_attention(self) -> bool:
        """Whether attention was stored (``record(..., store=("attention", ...))``)."""
        return bool(self._attention)

    @property
    def has_hidden(self) -> bool:
        """Whether hidden states were stored (``record(..., store=("hidden", ...))``)."""
        return bool(self._hidden)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) in pixels of the recorded input."""
        h, w = self.meta["image_size"]
        return int(h), int(w)

    @property
    def num_heads(self) -> int:
        """Heads stored per layer (1 when recorded with heads="mean")."""
        if not self._attention:
            raise TraceError("no attention was stored; record(..., store=('attention', ...)).")
        return int(next(iter(self._attention.values())).shape[1])

    @property
    def label(self) -> str:
        """``"ViT-B-16 / openai"``-style description of the model that made this trace."""
        return f"{self.meta.get('model', '?')} / {self.meta.get('pretrained', '?')}"

    @property
    def is_synthetic(self) -> bool:
        return str(self.meta.get("pretrained", "")).startswith("synthetic")

    def attention(self, layer: int) -> torch.Tensor:
        """Attention of block ``layer``: (B, H, T, T), rows sum to 1 (H = 1 for heads="mean")."""
        return self._get(self._attention, layer, "attention")

    def mean_attention(self, layer: int) -> torch.Tensor:
        """Head-averaged attention: (B, T, T)."""
        return self.attention(layer).mean(dim=1)

    def cls_attention(self, layer: int) -> torch.Tensor:
        """Class token -> each patch: (B, H, N)."""
        return self.attention(layer)[:, :, 0, 1:]

    def self_attention(self, layer: int) -> torch.Tensor:
        """Each patch -> itself (the diagonal): (B, H, N)."""
        return torch.diagonal(self.attention(layer), dim1=-2, dim2=-1)[:, :, 1:]

    def hidden(self, layer: int) -> torch.Tensor:
        """Output tokens of block ``layer``: (B, T, C)."""
        return self._get(self._hidden, layer, "hidden")

    def token_norms(self, layer: int) -> torch.Tensor:
        """L2 norm of every token of block ``layer``'s output: (B, T)."""
        return self._get(self._norms, layer, "token norms")

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
        tensors = [*self._attention.values(), *self._hidden.values(), *self._norms.values()]
        return int(sum(t.numel() * t.element_size() for t in tensors))

    def __repr__(self) -> str:
        stored = [s for s, d in (("attention", self._attention), ("hidden", self._hidden)) if d]
        return (
            f"Trace({self.label}, B={self.batch_size}, grid={self.grid}, layers="
            f"{list(self.layers)}, heads={self.heads!r}, stored={stored}, "
            f"{self.nbytes / 2**20:.1f} MB)"
        )

    # --------------------------------------------------------------- save/load
    def _tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for prefix, store in (("attention", self._attention), ("hidden", self._hidden),
                              ("norms", self._norms)):
            for layer, t in store.items():
                out[f"{prefix}.{layer}"] = t.detach().cpu().contiguous()
        if self.image_embedding is not None:
            out["image_embedding"] = self.image_embedding.detach().cpu().contiguous()
        return out

    def _header(self) -> str:
        return json.dumps(
            {"grid": list(self.grid), "num_layers": self.num_layers, "layers": list(self.layers),
             "heads": self.heads, "meta": self.meta, "format": "sfp.Trace/1"}
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
            raise ValueError(f"Trace files end in .npz or .safetensors, got {path.name!r}.")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        """Read a trace written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No trace file at {path}.")
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open
                from safetensors.torch import load_file

                with safe_open(str(path), framework="pt") as f:
                    header = json.loads((f.metadata() or {})["sfp_trace"])
                tensors = load_file(str(path))
            else:
                with np.load(path, allow_pickle=False) as z:
                    header = json.loads(str(z["__header__"]))
                    tensors = {k: torch.from_numpy(z[k]) for k in z.files if k != "__header__"}
        except (KeyError, ValueError, OSError) as exc:
            raise ValueError(f"{path} is not an sfp Trace file ({exc}).") from exc
        stores: dict[str, dict[int, torch.Tensor]] = {"attention": {}, "hidden": {}, "norms": {}}
        for key, t in tensors.items():
            if key == "image_embedding":
                continue
            kind, layer = key.split(".")
            stores[kind][int(layer)] = t
        return cls(
            grid=tuple(header["grid"]),
            num_layers=int(header["num_layers"]),
            layers=tuple(header["layers"]),
            heads=header["heads"],
            _attention=stores["attention"],
            _hidden=stores["hidden"],
            _norms=stores["norms"],
            meta=header["meta"],
            image_embedding=tensors.get("image_embedding"),
        )
