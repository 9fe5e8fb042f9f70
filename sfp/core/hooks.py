"""Named hook points of the visual forward, and the hook sets that run at them.

Names follow TransformerLens, with layers 1-indexed like the rest of sfp (layer ``l`` is
block ``l``)::

    hook_embed                      (B, T, C)      tokens after ln_pre
    blocks.{l}.hook_resid_pre       (B, T, C)      block input
    blocks.{l}.attn.hook_q|k|v      (B, H, T, d)   per-head queries, keys, values
    blocks.{l}.attn.hook_pattern    (B, H, T, T)   attention probabilities (float32)
    blocks.{l}.attn.hook_z          (B, H, T, d)   per-head attention output, before out_proj
    blocks.{l}.hook_attn_out        (B, T, C)      attention branch added to the residual
    blocks.{l}.hook_resid_mid       (B, T, C)      residual after attention
    blocks.{l}.mlp.hook_pre         (B, T, d_mlp)  MLP neurons before the nonlinearity
    blocks.{l}.mlp.hook_post        (B, T, d_mlp)  MLP neuron activations (after it)
    blocks.{l}.hook_mlp_out         (B, T, C)      MLP branch added to the residual
    blocks.{l}.hook_resid_post      (B, T, C)      block output h_l

A hook is ``fn(tensor, name) -> Tensor | None``: it may look (return None) or return a
replacement of the same shape (``hook_embed`` may also change the number of tokens, e.g. to
append registers). Hooks at one name run in the order given, each on the previous one's
result. A hook must not modify its input in place; return a new tensor instead.

The attention pattern is computed only when a hook asks for it; while no hook replaces it,
the block's output still comes from ``scaled_dot_product_attention``, so observing never
changes the numbers. Methods that replace block L (the baselines, SFP's SAE) fire block L's
hook points with their own tensors (their pattern, their residual), so probes and
interventions see every method through the same names.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor

from sfp.core.errors import HookError

__all__ = [
    "BLOCK_POINTS",
    "EMBED",
    "NO_HOOKS",
    "HookFn",
    "Hooks",
    "block_hook",
    "hook_names",
    "parse_hook_name",
]

HookFn = Callable[[Tensor, str], "Tensor | None"]

#: The hook point of the embedded tokens (after ln_pre).
EMBED = "hook_embed"
#: Hook points of every block, in the order the forward reaches them.
BLOCK_POINTS: tuple[str, ...] = (
    "hook_resid_pre",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_pattern",
    "attn.hook_z",
    "hook_attn_out",
    "hook_resid_mid",
    "mlp.hook_pre",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)
#: Points whose replacement may change the token count.
_RESHAPING = frozenset({EMBED})
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def block_hook(layer: int, point: str) -> str:
    """``"blocks.{layer}.{point}"``, e.g. ``block_hook(6, "mlp.hook_post")``."""
    return f"blocks.{int(layer)}.{point}"


def hook_names(num_layers: int) -> list[str]:
    """Every hook point of an ``num_layers``-block forward, in the order they are reached."""
    return [EMBED] + [block_hook(l, p) for l in range(1, num_layers + 1) for p in BLOCK_POINTS]


def parse_hook_name(name: str, num_layers: int | None = None) -> tuple[int | None, str]:
    """``(layer, point)`` of a hook name (layer None for ``hook_embed``).

    Raises HookError for a name that is not a hook point (with close matches) or a layer
    outside 1..num_layers.
    """
    if name == EMBED:
        return None, EMBED
    m = _BLOCK_RE.match(name) if isinstance(name, str) else None
    if m is None or m.group(2) not in BLOCK_POINTS:
        examples = [EMBED] + [block_hook(1, p) for p in BLOCK_POINTS]
        point = m.group(2) if m else str(name)
        close = difflib.get_close_matches(point, BLOCK_POINTS, n=2)
        hint = f" Did you mean blocks.{m.group(1)}.{close[0]}?" if m and close else ""
        raise HookError(
            f"{name!r} is not a hook point.{hint} Hook points are {EMBED!r} and "
            f"'blocks.{{l}}.<point>' with <point> one of {', '.join(BLOCK_POINTS)} "
            f"(e.g. {examples[-1]!r})."
        )
    layer = int(m.group(1))
    if num_layers is not None and not 1 <= layer <= num_layers:
        raise HookError(
            f"{name!r}: layer {layer} is outside 1..{num_layers} (layer l = block l, 1-indexed)."
        )
    return layer, m.group(2)


class Hooks:
    """An ordered, immutable set of forward hooks, keyed by hook-point name.

    Build one from ``[(name, fn), ...]`` (or a mapping name -> fn / list of fns); combine
    with ``+`` (the left operand's hooks run first at a shared name). ``hooks(name, x)``
    runs the hooks at ``name`` and returns the (possibly replaced) tensor.
    """

    __slots__ = ("_by_name", "_layers")

    def __init__(
        self,
        fwd_hooks: Iterable[tuple[str, HookFn]] | Mapping[str, HookFn | Sequence[HookFn]] = (),
        num_layers: int | None = None,
    ) -> None:
        by_name: dict[str, list[HookFn]] = {}
        items: Iterable[Any] = fwd_hooks.items() if isinstance(fwd_hooks, Mapping) else fwd_hooks
        for item in items:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise HookError(
                    f"fwd_hooks must be (name, fn) pairs, got {item!r}; e.g. "
                    "[('blocks.6.mlp.hook_post', fn)]."
                )
            name, fns = item
            parse_hook_name(name, num_layers)
            for fn in fns if isinstance(fns, (list, tuple)) else (fns,):
                if not callable(fn):
                    raise HookError(f"the hook at {name!r} is not callable: {fn!r}.")
                by_name.setdefault(name, []).append(fn)
        self._by_name = {k: tuple(v) for k, v in by_name.items()}
        self._layers = frozenset(parse_hook_name(k)[0] for k in self._by_name)

    @classmethod
    def of(cls, hooks: Hooks | Iterable[tuple[str, HookFn]] | None,
           num_layers: int | None = None) -> Hooks:
        """``hooks`` as a :class:`Hooks` (None -> no hooks); names checked against the depth."""
        if hooks is None:
            return NO_HOOKS
        if isinstance(hooks, Hooks):
            if num_layers is not None:
                for name in hooks._by_name:
                    parse_hook_name(name, num_layers)
            return hooks
        return cls(hooks, num_layers)

    def __bool__(self) -> bool:
        return bool(self._by_name)

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_name.values())

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    def has(self, name: str) -> bool:
        """Whether any hook runs at ``name``."""
        return name in self._by_name

    def touches(self, layer: int | None) -> bool:
        """Whether any hook runs in block ``layer`` (None: at ``hook_embed``)."""
        return layer in self._layers

    def __add__(self, other: Hooks) -> Hooks:
        if not other:
            return self
        if not self:
            return other
        merged = Hooks()
        by_name = {k: list(v) for k, v in self._by_name.items()}
        for k, v in other._by_name.items():
            by_name.setdefault(k, []).extend(v)
        merged._by_name = {k: tuple(v) for k, v in by_name.items()}
        merged._layers = self._layers | other._layers
        return merged

    def __call__(self, name: str, x: Tensor) -> Tensor:
        """Run the hooks at ``name`` on ``x``; returns the last replacement (or ``x``)."""
        fns = self._by_name.get(name)
        if not fns:
            return x
        for fn in fns:
            out = fn(x, name)
            if out is None or out is x:
                continue
            if not isinstance(out, Tensor):
                raise HookError(
                    f"the hook at {name!r} returned {type(out).__name__}; return a tensor "
                    "to replace the value, or None to keep it."
                )
            if out.shape != x.shape and not (
                name in _RESHAPING and out.ndim == x.ndim and out.shape[0] == x.shape[0]
                and out.shape[-1] == x.shape[-1]
            ):
                raise HookError(
                    f"the hook at {name!r} returned shape {tuple(out.shape)} for a tensor of "
                    f"shape {tuple(x.shape)}; a replacement must keep the shape."
                )
            x = out
        return x

    def __repr__(self) -> str:
        return f"Hooks({', '.join(f'{k} x{len(v)}' for k, v in self._by_name.items())})"


#: The empty hook set (the plain forward).
NO_HOOKS = Hooks()
