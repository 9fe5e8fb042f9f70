"""A small CLIP trained on generated textures, shipped with sfp: label everything it shows
"toy CLIP trained on generated textures — not a pretrained CLIP".

What it is for
    Without pretrained weights the planted-outlier model (:mod:`sfp.models.synthetic`) still
    has a random text tower, so its segmentations mean nothing. The toy CLIP is an ordinary
    ``open_clip.CLIP`` (ViT visual tower, transformer text tower) trained from scratch on
    generated scenes with captions (:mod:`sfp.models.toy_training`), so open-vocabulary dense
    segmentation of generated scenes with known masks works offline, through every encoder,
    figure and widget. Its vocabulary is the few dozen words of its captions (its own
    tokenizer, :class:`ToyTokenizer`); any other word is "unknown" to it.

Scenes (:func:`toy_scenes`)
    A background region and one or two shapes (circle, rectangle, blob) of ``IMAGE_SIZE`` px,
    each region a texture of :data:`TEXTURES` in a colour of :data:`COLOURS` (dark and light
    tone). The label of a pixel is its texture's index; the caption names the visible
    textures, with their colours 70 % of the time (``"red dots and blue stripes"``), half the
    time after "a photo of". Scenes are a function of a seed (``torch.Generator``).

Architecture (:data:`TOY_CONFIG`)
    128 px input, 16 px patches (8 x 8 grid), width 128, 6 blocks, 4 heads; text tower width
    128, 3 blocks, context 16, vocabulary :data:`VOCAB`; embedding dim 128. Eleven residual
    channels of the visual tower (:data:`RESERVED_CHANNELS`) are held at zero during training
    (nothing writes into or reads from them), so the planted-outlier circuit
    (:func:`toy_planted_model`) can be added without overwriting anything the model learned.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from sfp.models.bundle import ModelBundle, ModelLoadError, bundle_from_model
from sfp.models.synthetic import PlantConfig, PlantedTruth, plant_outliers

__all__ = [
    "COLOURS",
    "IMAGE_SIZE",
    "RESERVED_CHANNELS",
    "TEXTURES",
    "TOY_CAVEAT",
    "TOY_CONFIG",
    "TOY_NAME",
    "TOY_PLANT",
    "VOCAB",
    "ToyScenes",
    "ToyTokenizer",
    "build_toy_clip",
    "load_toy",
    "toy_manifest",
    "toy_planted_model",
    "toy_scenes",
    "toy_weights_path",
]

#: The name :func:`sfp.models.loading.load_model` and ``--model`` know the toy CLIP by.
TOY_NAME = "toy"
TOY_CAVEAT = "toy CLIP trained on generated textures — not a pretrained CLIP"
TOY_PLANTED_CAVEAT = "toy CLIP with planted outliers — not a pretrained CLIP"
IMAGE_SIZE = 128
#: Texture classes, in label order.
TEXTURES: tuple[str, ...] = ("stripes", "checkerboard", "dots", "noise", "solid", "waves")
#: Colour name -> light tone (RGB in [0, 1]); the dark tone is a quarter of it.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.15, 0.12),
    "green": (0.2, 0.75, 0.2),
    "blue": (0.2, 0.35, 0.95),
    "yellow": (0.95, 0.88, 0.15),
    "purple": (0.65, 0.25, 0.85),
    "orange": (0.98, 0.55, 0.1),
}
_WORDS = ("a", "photo", "of", "and", "the", "with", "on", "an", "image", "pattern", "texture")
_SPECIALS = ("<pad>", "<unk>")
#: The tokenizer's vocabulary: padding, unknown, words, then start and end of text (the end
#: token has the largest id, as open_clip's argmax pooling needs).
VOCAB: tuple[str, ...] = (*_SPECIALS, *_WORDS, *TEXTURES, *COLOURS, "<start>", "<end>")
CONTEXT_LENGTH = 16
#: Residual channels of the visual tower kept at zero in training (the planted circuit's).
RESERVED_CHANNELS: tuple[int, ...] = tuple(range(117, 128))

#: The planted circuit for the toy CLIP: 16 px patches in 2 x 2 sub-blocks (4 differences),
#: so 11 dedicated channels, the reserved ones (too few for the content rule's cells and
#: competition: the toy keeps fixed positions); the trained positional embedding as it is;
#: 4 eligible positions of the 8 x 8 grid; in the last block the sinks carry a fixed vector
#: as large as a median patch token into the tokens that attend to them.
TOY_PLANT = PlantConfig(subgrid=2, position_scale=1.0, channels=RESERVED_CHANNELS,
                        outlier_fraction=4 / 64, sink_value=1.0, sink_value_layers=1,
                        positions="fixed")

TOY_CONFIG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": IMAGE_SIZE, "patch_size": 16, "width": 128, "layers": 6,
                   "head_width": 32, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": len(VOCAB), "width": 128,
                 "heads": 4, "layers": 3, "mlp_ratio": 4.0},
}


class ToyTokenizer:
    """Words -> token ids of :data:`VOCAB`: ``(texts) -> (N, 16) int64``.

    Lower-cases, splits on anything that is not a letter, maps unknown words to ``<unk>``;
    ``<start> words <end>``, zero-padded, truncated to the context (keeping ``<end>``).
    """

    def __init__(self, context_length: int = CONTEXT_LENGTH) -> None:
        self.context_length = context_length
        self.ids = {w: i for i, w in enumerate(VOCAB)}

    def words(self, text: str) -> list[str]:
        return re.findall(r"[a-z]+", text.lower())

    def unknown(self, text: str) -> list[str]:
        """The words of ``text`` the toy CLIP does not know."""
        return [w for w in self.words(text) if w not in self.ids]

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None
                 ) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        n = context_length or self.context_length
        out = torch.zeros(len(texts), n, dtype=torch.long)
        unk = self.ids["<unk>"]
        for i, text in enumerate(texts):
            ids = [self.ids.get(w, unk) for w in self.words(text)][: n - 2]
            row = [self.ids["<start>"], *ids, self.ids["<end>"]]
            out[i, : len(row)] = torch.tensor(row)
        return out

    def __repr__(self) -> str:
        return f"ToyTokenizer({len(VOCAB)} tokens, context {self.context_length})"


def build_toy_clip() -> nn.Module:
    """An untrained toy CLIP (``open_clip.CLIP`` of :data:`TOY_CONFIG`), reserved channels
    zeroed (:func:`zero_reserved`)."""
    cfg = TOY_CONFIG
    model = open_clip.CLIP(
        cfg["embed_dim"], open_clip.model.CLIPVisionCfg(**cfg["vision_cfg"]),
        open_clip.model.CLIPTextCfg(**cfg["text_cfg"]),
    )
    zero_reserved(model)
    return model


@torch.no_grad()
def zero_reserved(model: nn.Module, channels: Sequence[int] = RESERVED_CHANNELS) -> None:
    """Zero every visual-tower weight that writes into or reads from ``channels`` (and set
    the LayerNorms there to the identity), so the channels stay zero in every token."""
    v = model.visual
    ch = torch.tensor(list(channels))
    v.conv1.weight[ch] = 0
    v.positional_embedding[:, ch] = 0
    v.class_embedding[ch] = 0
    v.proj[ch] = 0
    lns = [v.ln_pre, v.ln_post]
    for block in v.transformer.resblocks:
        lns += [block.ln_1, block.ln_2]
        block.attn.in_proj_weight[:, ch] = 0
        block.attn.out_proj.weight[ch] = 0
        block.attn.out_proj.bias[ch] = 0
        block.mlp.c_fc.weight[:, ch] = 0
        block.mlp.c_proj.weight[ch] = 0
        block.mlp.c_proj.bias[ch] = 0
    for ln in lns:
        ln.weight[ch] = 1
        ln.bias[ch] = 0


# ------------------------------------------------------------------------------------------
# Generated scenes
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ToyScenes:
    """A batch of generated scenes.

    images: (B, 3, S, S) float32 in [0, 1]; labels: (B, S, S) int64 texture indices;
    captions: B strings; textures / colours: (B, 3) int64 per region (background first; -1
    for an absent region).
    """

    images: torch.Tensor
    labels: torch.Tensor
    captions: list[str]
    textures: torch.Tensor
    colours: torch.Tensor


def _uniform(g: torch.Generator, b: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(b, 1, 1, generator=g)


def _texture_params(g: torch.Generator, b: int) -> dict[str, torch.Tensor]:
    """Random parameters of every texture for ``b`` draws: name -> (B, 1, 1)."""
    spans = {"angle": (0.0, math.pi), "period": (7.0, 14.0), "cell": (5.0, 11.0),
             "offset": (0.0, 11.0), "pitch": (8.0, 13.0), "radius": (0.22, 0.34),
             "shade": (-0.15, 0.15), "wave_period": (9.0, 15.0), "amplitude": (2.5, 5.0),
             "wave_length": (20.0, 36.0)}
    return {k: _uniform(g, b, lo, hi) for k, (lo, hi) in spans.items()}


def _texture(kind: int, p: dict[str, torch.Tensor], grain: torch.Tensor, s: int
             ) -> torch.Tensor:
    """Texture ``kind`` (index of :data:`TEXTURES`) for parameters ``p`` (each (N, 1, 1))
    and grain (N, 1, S/2, S/2): (N, S, S) in [0, 1]."""
    yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32),
                            torch.arange(s, dtype=torch.float32), indexing="ij")
    along = xx * torch.cos(p["angle"]) + yy * torch.sin(p["angle"])
    off = p["offset"]
    if kind == 0:  # stripes
        return (torch.sin(2 * math.pi * along / p["period"]) > 0).float()
    if kind == 1:  # checkerboard
        c = p["cell"]
        return ((torch.floor((xx + off) / c) + torch.floor((yy + off) / c)) % 2).float()
    if kind == 2:  # dots
        pitch = p["pitch"]
        dy = torch.remainder(yy + off, pitch) - pitch / 2
        dx = torch.remainder(xx + off * 0.7, pitch) - pitch / 2
        return ((dy ** 2 + dx ** 2) <= (pitch * p["radius"]) ** 2).float()
    if kind == 3:  # noise
        return F.interpolate(grain, size=(s, s), mode="nearest")[:, 0]
    if kind == 4:  # solid
        return (0.85 + p["shade"] * (along / s - 0.5)).clamp(0, 1).expand(-1, s, s)
    across = -xx * torch.sin(p["angle"]) + yy * torch.cos(p["angle"])  # waves
    bend = p["amplitude"] * torch.sin(2 * math.pi * along / p["wave_length"])
    return 0.5 + 0.5 * torch.sin(2 * math.pi * (across + bend) / p["wave_period"])


def _region_patterns(g: torch.Generator, kinds: torch.Tensor, s: int) -> torch.Tensor:
    """One region's pattern per scene, texture ``kinds[i]`` for scene i: (B, S, S)."""
    b = len(kinds)
    params = _texture_params(g, b)
    grain = torch.rand(b, 1, s // 2, s // 2, generator=g)
    out = torch.empty(b, s, s)
    for kind in range(len(TEXTURES)):
        idx = (kinds == kind).nonzero().flatten()
        if len(idx):
            out[idx] = _texture(kind, {k: v[idx] for k, v in params.items()}, grain[idx], s)
    return out


def _shape_masks(g: torch.Generator, b: int, s: int) -> torch.Tensor:
    """One random shape per scene (circle, rectangle or blob): (B, S, S) bool."""
    yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32),
                            torch.arange(s, dtype=torch.float32), indexing="ij")
    cy, cx = _uniform(g, b, 0.25 * s, 0.75 * s), _uniform(g, b, 0.25 * s, 0.75 * s)
    r = _uniform(g, b, 0.16 * s, 0.32 * s)
    aspect = _uniform(g, b, 0.6, 1.6)
    dy, dx = yy - cy, xx - cx
    circle = (dy * aspect) ** 2 + (dx / aspect) ** 2 <= r ** 2
    rect = ((dy * aspect).abs() <= r * 0.9) & ((dx / aspect).abs() <= r * 0.9)
    theta = torch.atan2(dy, dx)
    phase = _uniform(g, b, 0.0, 2 * math.pi)
    wobble = 1 + 0.28 * torch.sin(3 * theta + phase) + 0.15 * torch.sin(5 * theta - 2 * phase)
    blob = dy ** 2 + dx ** 2 <= (r * wobble) ** 2
    kind = torch.randint(0, 3, (b, 1, 1), generator=g)
    return torch.where(kind == 0, circle, torch.where(kind == 1, rect, blob))


def _caption(g: torch.Generator, regions: list[tuple[int, int]]) -> str:
    """Caption of the visible (texture, colour) regions, in random order."""
    with_colour = float(torch.rand(1, generator=g)) < 0.7
    order = torch.randperm(len(regions), generator=g).tolist()
    colours = list(COLOURS)
    parts = [(f"{colours[regions[i][1]]} " if with_colour else "") + TEXTURES[regions[i][0]]
             for i in order]
    text = " and ".join(parts)
    return f"a photo of {text}." if float(torch.rand(1, generator=g)) < 0.5 else text


def toy_scenes(n: int, seed: int | torch.Generator, size: int = IMAGE_SIZE,
               min_area: float = 0.03) -> ToyScenes:
    """``n`` generated scenes (see the module docstring), a function of ``seed``.

    Regions have distinct textures; a shape whose visible part covers less than ``min_area``
    of the image is left out of the caption and the label. Returns :class:`ToyScenes`.
    """
    g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    n_tex, n_col = len(TEXTURES), len(COLOURS)
    tex = torch.stack([torch.randperm(n_tex, generator=g)[:3] for _ in range(n)])
    col = torch.randint(0, n_col, (n, 3), generator=g)
    patterns = [_region_patterns(g, tex[:, k], size) for k in range(3)]  # (B, S, S) each
    shapes = [_shape_masks(g, n, size) for _ in range(2)]
    present = torch.rand(n, generator=g) < 0.5  # a second shape in half the scenes
    shapes[1] &= present[:, None, None]
    region = torch.zeros(n, size, size, dtype=torch.long)
    region[shapes[0]] = 1
    region[shapes[1]] = 2
    tones = torch.tensor(list(COLOURS.values()))  # (6, 3)
    images = torch.zeros(n, 3, size, size)
    area = torch.stack([(region == k).float().mean(dim=(1, 2)) for k in range(3)], 1)
    keep = area >= min_area
    keep[:, 0] = True
    labels = torch.full((n, size, size), 255, dtype=torch.long)
    captions = []
    for k in range(3):
        pattern = patterns[k]
        light = tones[col[:, k]][:, :, None, None]
        img_k = light * (0.25 + 0.75 * pattern[:, None])
        inside = (region == k)[:, None]
        images = torch.where(inside, img_k, images)
        labels = torch.where(region == k, tex[:, k, None, None], labels)
    # a region too small to be named in the caption is not scored either (ignore index)
    for k in (1, 2):
        labels[~keep[:, k, None, None] & (region == k)] = 255
    images = (images + 0.02 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)
    textures = torch.where(keep, tex, torch.full_like(tex, -1))
    colours = torch.where(keep, col, torch.full_like(col, -1))
    for i in range(n):
        regions = [(int(tex[i, k]), int(col[i, k])) for k in range(3) if keep[i, k]]
        captions.append(_caption(g, regions))
    return ToyScenes(images, labels, captions, textures, colours)


# ------------------------------------------------------------------------------------------
# Shipped weights
# ------------------------------------------------------------------------------------------


def toy_weights_path() -> Path:
    """Where the shipped weights live (``sfp/data/toy/toy_clip.safetensors``)."""
    return Path(str(resources.files("sfp") / "data" / "toy" / "toy_clip.safetensors"))


def toy_manifest() -> dict[str, Any]:
    """The training record shipped next to the weights (config, steps, seed, checksum,
    the first losses, the training time)."""
    path = toy_weights_path().with_suffix(".json")
    if not path.is_file():
        raise ModelLoadError(f"The toy CLIP's manifest is missing ({path}); reinstall sfp or "
                             "re-train it with benchmarks/train_toy.py.")
    return json.loads(path.read_text())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_toy(device: str | torch.device = "cpu", *, path: str | Path | None = None,
             quiet: bool = True) -> ModelBundle:
    """The shipped toy CLIP (float32) as a :class:`ModelBundle` with provenance ``"toy"``.

    path: another weights file written by the training script (default: the shipped one).
    """
    from safetensors.torch import load_file

    file = Path(path) if path is not None else toy_weights_path()
    if not file.is_file():
        raise ModelLoadError(f"No toy CLIP weights at {file}; reinstall sfp or re-train them "
                             "with benchmarks/train_toy.py.")
    model = build_toy_clip()
    try:
        sd = {k: v.float() for k, v in load_file(str(file), device="cpu").items()}
    except Exception as exc:  # safetensors raises its own error type for a corrupt file
        raise ModelLoadError(f"Could not read the toy CLIP weights {file} ({exc}); re-train "
                             "them with benchmarks/train_toy.py or reinstall sfp.") from exc
    own = model.state_dict()
    if set(sd) != set(own) or any(tuple(sd[k].shape) != tuple(own[k].shape) for k in own):
        raise ModelLoadError(f"{file} does not hold toy CLIP weights of this sfp version; "
                             "re-train them with benchmarks/train_toy.py.")
    model.load_state_dict(sd)
    model = model.to(device).eval()
    if not quiet:
        print(f"sfp: loaded the toy CLIP from {file} ({TOY_CAVEAT}).", file=sys.stderr)
    return bundle_from_model(model, name=TOY_NAME, pretrained=TOY_CAVEAT, provenance="toy",
                             tokenizer=ToyTokenizer())


def toy_planted_model(device: str | torch.device = "cpu", *, seed: int = 0,
                      n_outliers: int | None = None, strength: float | None = None
                      ) -> tuple[ModelBundle, PlantedTruth]:
    """The toy CLIP with the planted-outlier circuit added (:func:`plant_outliers` on the
    reserved channels): ``(bundle, truth)``, provenance ``"toy-planted"``."""
    bundle = load_toy("cpu")
    planted, truth = plant_outliers(
        bundle.model, name=f"{TOY_NAME}-planted", seed=seed, n_outliers=n_outliers,
        strength=strength, device=device, config=TOY_PLANT, pretrained=TOY_PLANTED_CAVEAT,
        provenance="toy-planted", tokenizer=ToyTokenizer())
    return planted, truth


TOY_PLANTED_CAVEAT = "toy CLIP with planted outliers — not a pretrained CLIP"
