"""Training of the toy CLIP (:mod:`sfp.models.toy`): fixed seed, fixed step counts.

``train_toy(TrainConfig())`` is what produced the shipped weights (the command line is
``benchmarks/train_toy.py``). Each step draws a fresh batch of generated scenes from a
generator seeded by ``(seed, step)``, so the run is a function of the config alone and the
first steps can be replayed to check the shipped record (:func:`replay_losses`).

Two phases:

1. ``steps`` steps of CLIP's symmetric cross-entropy between the class-token embedding and the
   caption embedding, every pair of identical captions counted as positives (targets spread
   evenly over them). AdamW, linear warm-up then cosine decay, learnable logit scale (clamped
   at 100). The weights are then rounded to float16, as they are stored.
2. ``patch_steps`` more steps from those weights, with a fresh AdamW and schedule
   (``patch_lr``), adding two terms on the patch tokens (every patch token through ``ln_post``
   and ``proj``, as dense segmentation reads them):

   - the same loss between the *mean patch embedding* and the caption (``patch_weight``);
   - a *region-caption* term (``region_weight``): each patch token against the captions of
     the batch's regions ("red dots", "a photo of waves.", colour and prefix drawn per
     region), cross-entropy with the share of the patch's pixels in each region as target
     (patches less than half scored are skipped). This is grounded-caption supervision (the
     generator knows which region a caption describes), which plain CLIP training does not
     have.

   Phase 1 alone gives a good image-level CLIP (caption retrieval 95 % in a batch of 64)
   whose patch tokens are global: they name the image's textures but not their own (dense
   ``clip`` mIoU 0.22 on the toy benchmark; the mean-patch term alone reached 0.26). The
   region term makes the patch tokens local (more so than a real CLIP's, which never get
   such supervision), and the model stays an ordinary class-token CLIP.

After every step the reserved channels are zeroed again (:func:`sfp.models.toy.zero_reserved`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sfp.models.bundle import OPENAI_MEAN, OPENAI_STD
from sfp.models.toy import (
    COLOURS,
    TEXTURES,
    TOY_CONFIG,
    ToyScenes,
    ToyTokenizer,
    build_toy_clip,
    file_sha256,
    toy_scenes,
    zero_reserved,
)

__all__ = ["Batch", "TrainConfig", "batch_for_step", "replay_losses", "train_toy"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything the training run depends on."""

    seed: int = 0
    steps: int = 1500
    batch: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 60
    threads: int = 2
    patch_steps: int = 600
    patch_lr: float = 5e-4
    patch_weight: float = 1.0
    region_weight: float = 1.0


@dataclass(frozen=True, eq=False)
class Batch:
    """One training batch.

    images: (B, 3, S, S) normalised; tokens: (B, 16) caption tokens; captions: B strings;
    region_texts: R distinct region captions ("red dots", "a photo of waves.", ...);
    region_target: (B, N, R) float, per patch token the share of its pixels in each region
    caption's region (rows of patches mostly unscored are 0).
    """

    images: torch.Tensor
    tokens: torch.Tensor
    captions: list[str]
    region_texts: list[str]
    region_target: torch.Tensor


def _region_text(g: torch.Generator, texture: int, colour: int) -> str:
    words = TEXTURES[texture]
    if float(torch.rand(1, generator=g)) < 0.5:
        words = f"{list(COLOURS)[colour]} {words}"
    return f"a photo of {words}." if float(torch.rand(1, generator=g)) < 0.5 else words


def _region_targets(scenes: ToyScenes, g: torch.Generator, patch: int
                    ) -> tuple[list[str], torch.Tensor]:
    """Region captions of a batch and each patch's share of pixels in each: see :class:`Batch`."""
    n_tex = len(TEXTURES)
    onehot = torch.stack([(scenes.labels == t).float() for t in range(n_tex)], 1)
    share = F.avg_pool2d(onehot, patch).flatten(2).transpose(1, 2)  # (B, N, K)
    texts: dict[str, int] = {}
    index = torch.full((len(scenes.captions), n_tex), -1, dtype=torch.long)
    for i in range(len(scenes.captions)):
        for k in range(scenes.textures.shape[1]):
            t = int(scenes.textures[i, k])
            if t >= 0:
                text = _region_text(g, t, int(scenes.colours[i, k]))
                index[i, t] = texts.setdefault(text, len(texts))
    target = torch.zeros(share.shape[0], share.shape[1], len(texts))
    rows, cols = (index >= 0).nonzero(as_tuple=True)
    target[rows, :, index[rows, cols]] = share[rows, :, cols]
    total = target.sum(-1, keepdim=True)
    target = torch.where(total >= 0.5, target / total.clamp(min=1e-6), torch.zeros_like(target))
    return list(texts), target


def batch_for_step(cfg: TrainConfig, step: int) -> Batch:
    """The batch of step ``step`` (a function of ``cfg.seed`` and ``step`` alone)."""
    seed = 1_000_003 * cfg.seed + step
    scenes = toy_scenes(cfg.batch, torch.Generator().manual_seed(seed))
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    patch = int(TOY_CONFIG["vision_cfg"]["patch_size"])
    texts, target = _region_targets(scenes, torch.Generator().manual_seed(seed + 2**40), patch)
    return Batch((scenes.images - mean) / std, ToyTokenizer()(scenes.captions),
                 scenes.captions, texts, target)


def _contrastive(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                 target: torch.Tensor) -> torch.Tensor:
    logits = scale * F.normalize(img, dim=-1) @ txt.t()
    return 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                  + torch.sum(-target * F.log_softmax(logits.t(), 1), 1).mean())


def _region_loss(patches: torch.Tensor, texts: torch.Tensor, target: torch.Tensor,
                 scale: torch.Tensor) -> torch.Tensor:
    """Cross-entropy between each patch token and the region captions of the batch.

    patches: (B, N, D); texts: (R, D) normalised; target: (B, N, R) (rows of 0: skipped)."""
    logp = F.log_softmax(scale * F.normalize(patches, dim=-1) @ texts.t(), dim=-1)
    scored = target.sum(-1) > 0
    return -(target * logp).sum(-1)[scored].mean()


def _loss(model: nn.Module, batch: Batch, patch_weight: float = 0.0,
          region_weight: float = 0.0) -> torch.Tensor:
    txt = F.normalize(model.encode_text(batch.tokens), dim=-1)
    scale = model.logit_scale.exp().clamp(max=100.0)
    caps = batch.captions
    same = torch.tensor([[a == b for b in caps] for a in caps], dtype=torch.float32)
    target = same / same.sum(dim=1, keepdim=True)
    if not (patch_weight or region_weight):
        return _contrastive(model.encode_image(batch.images), txt, scale, target)
    visual = model.visual
    visual.output_tokens = True
    try:
        pooled, tokens_out = visual(batch.images)  # (B, D), (B, N, C) after ln_post
    finally:
        visual.output_tokens = False
    patches = tokens_out @ visual.proj  # (B, N, D)
    loss = _contrastive(pooled, txt, scale, target)
    if patch_weight:
        loss = loss + patch_weight * _contrastive(patches.mean(dim=1), txt, scale, target)
    if region_weight:
        regions = F.normalize(model.encode_text(ToyTokenizer()(batch.region_texts)), dim=-1)
        loss = loss + region_weight * _region_loss(patches, regions, batch.region_target, scale)
    return loss


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr)


def _lr(peak: float, warmup: int, total: int, step: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * t))


def _round_fp16(model: nn.Module) -> None:
    """Round every weight to float16 and back, as the shipped file stores them."""
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.is_floating_point():
                v.copy_(v.half().float())


def _run(cfg: TrainConfig, steps: int, progress: bool, phase: int = 1,
         model: nn.Module | None = None) -> tuple[nn.Module, list[float], float]:
    """Phase ``phase`` for ``steps`` steps (phase 2 continues ``model``)."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + (phase - 1) * 7919)
    if model is None:
        model = build_toy_clip()
    model.train()
    opt = _optimizer(model, cfg)
    peak, total = (cfg.lr, cfg.steps) if phase == 1 else (cfg.patch_lr, cfg.patch_steps)
    offset = 0 if phase == 1 else cfg.steps  # phase 2 draws batches after phase 1's
    losses: list[float] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"train toy CLIP, phase {phase}", unit="step")
    t0 = time.perf_counter()
    for step in range(steps):
        batch = batch_for_step(cfg, offset + step)
        for group in opt.param_groups:
            group["lr"] = _lr(peak, cfg.warmup if phase == 1 else 30, total, step)
        if phase == 1:
            loss = _loss(model, batch)
        else:
            loss = _loss(model, batch, cfg.patch_weight, cfg.region_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        zero_reserved(model)
        losses.append(loss.detach().item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if bar is not None:
        bar.close()
    return model.eval(), losses, time.perf_counter() - t0


def _summary(losses: list[float], seconds: float) -> dict[str, Any]:
    return {
        "losses_first": losses[:5],
        "loss_last_50": sum(losses[-50:]) / len(losses[-50:]),
        "loss_curve": [round(sum(losses[i:i + 50]) / len(losses[i:i + 50]), 4)
                       for i in range(0, len(losses), 50)],
        "train_seconds": round(seconds, 1),
    }


def load_phase1(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The phase-1 weights and record written by an earlier ``train_toy`` (to run phase 2
    alone: ``train_toy(cfg, out, phase1=...)``)."""
    from safetensors.torch import load_file

    model = build_toy_clip()
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    record = json.loads(Path(path).with_suffix(".json").read_text())
    keys = ("losses_first", "loss_last_50", "loss_curve", "train_seconds")
    return model, record.get("phase1") or {k: record[k] for k in keys}


def train_toy(cfg: TrainConfig, out: str | Path | None = None, progress: bool = True,
              phase1: str | Path | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Train the toy CLIP; with ``out`` (a ``.safetensors`` path) write the weights (fp16)
    and the record (``.json`` next to it). Returns ``(model, record)``.

    phase1: a weights file of this config's phase 1 (with its ``.json`` record) to start
    phase 2 from instead of training phase 1 again (the result is the same)."""
    if phase1 is None:
        model, losses, seconds = _run(cfg, cfg.steps, progress)
        _round_fp16(model)
        first = _summary(losses, seconds)
    else:
        model, first = load_phase1(phase1)
    model, losses, seconds = _run(cfg, cfg.patch_steps, progress, phase=2, model=model)
    second = _summary(losses, seconds)
    record: dict[str, Any] = {
        "config": asdict(cfg),
        "architecture": TOY_CONFIG,
        "phase1": first,
        "phase2": second,
        "losses_first": first["losses_first"],
        "train_seconds": round(first["train_seconds"] + second["train_seconds"], 1),
        "torch": torch.__version__,
    }
    if out is not None:
        from safetensors.torch import save_file

        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
        save_file(sd, str(out))
        record["sha256"] = file_sha256(out)
        record["bytes"] = out.stat().st_size
        out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    return model, record


def replay_losses(cfg: TrainConfig, steps: int, phase: int = 1,
                  model: nn.Module | None = None) -> list[float]:
    """The losses of the first ``steps`` steps of phase ``phase`` of the run ``cfg`` describes
    (phase 2 from ``model``, the phase-1 weights; no file written)."""
    return _run(cfg, steps, progress=False, phase=phase, model=model)[1]
