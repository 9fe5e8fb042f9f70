"""Detector accuracy against planted ground truth (synthetic model, planted outliers).

For 20 images (scikit-image photos with crops and flips, and generated scenes) this records a
:func:`sfp.models.synthetic.planted_model` (a random CLIP with *planted* outliers, not pretrained
weights) and scores every registered detector of :mod:`sfp.core.outliers` at every layer against
``PlantedTruth.mask``: precision and recall, pooled over the images (micro-averaged). It also
applies :func:`sfp.core.outliers.mitigate` at the SOM detections of layer L-1 and reports the
largest patch norm over the median patch norm before and after.

    python analysis/detector_accuracy.py [--model ViT-B-16] [--seed 0]
        [--out analysis_output/detector_accuracy.csv]

Targets at default settings (checked and printed): SOM at layer L-1 recall >= 0.9 and
precision >= 0.8; norm_z at every layer >= onset precision and recall >= 0.9; after
mitigation max/median patch norm < 2.
"""

from __future__ import annotations

import argparse
import csv
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from sfp.core import io, probe
from sfp.core.outliers import available_detectors, detect, mitigate, som
from sfp.models.loading import ModelBundle
from sfp.models.synthetic import PlantedTruth, planted_model, synthetic_scene

N_IMAGES = 20
CROP = 224
RESIZE = 240  # short side before cropping, so the corner crop differs from the centre
SOM_PARAMS = {"top_k": 10, "cls_scale": 1.5}


@dataclass(frozen=True)
class Score:
    """Pooled detection counts of one detector at one layer."""

    detector: str
    layer: int
    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else math.nan

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else math.nan


def analysis_images(bundle: ModelBundle, n: int = N_IMAGES) -> tuple[list[str], torch.Tensor]:
    """``n`` normalised 224 x 224 images: photos (centre, flip, corner crop) then scenes.

    Returns names and (n, 3, 224, 224).
    """
    names: list[str] = []
    views: list[torch.Tensor] = []
    for name, arr in io.sample_images().items():
        img = io.resize_short_side(io.load_image(arr), RESIZE)
        centre = io.center_crop(img, CROP)
        views += [centre, centre.flip(-1), img[..., :CROP, :CROP]]
        names += [f"{name}", f"{name}/flip", f"{name}/corner"]
    seed = 0
    while len(views) < n:
        views.append(synthetic_scene(seed, CROP, CROP))
        names.append(f"scene{seed}")
        seed += 1
    return names[:n], io.normalize(torch.stack(views[:n]), bundle)


def score_layers(trace: probe.Trace, truth_mask: torch.Tensor) -> list[Score]:
    """Every registered detector (default parameters) at every layer vs truth (B, N) bool."""
    scores = []
    for det in available_detectors():
        for layer in range(1, trace.num_layers + 1):
            found = detect(det, trace, layer).mask
            tp = int((found & truth_mask).sum())
            scores.append(
                Score(
                    det,
                    layer,
                    tp,
                    int((found & ~truth_mask).sum()),
                    int((~found & truth_mask).sum()),
                )
            )
    return scores


def mitigation_ratios(trace: probe.Trace, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """max / median patch norm per image at ``layer``, before and after mitigating at the SOM
    detections of that layer: (B,), (B,)."""
    patches = trace.hidden(layer)[:, 1:]
    flagged = som(trace.attention(layer), **SOM_PARAMS).mask
    after = mitigate(patches, trace.grid, flagged)

    def ratio(x: torch.Tensor) -> torch.Tensor:
        n = x.norm(dim=-1)
        return n.amax(dim=-1) / n.median(dim=-1).values

    return ratio(patches), ratio(after)


def check_targets(scores: list[Score], truth: PlantedTruth, after: torch.Tensor) -> list[str]:
    """Failed targets, as sentences (empty when all hold)."""
    failed = []
    last = truth.num_layers - 1
    by = {(s.detector, s.layer): s for s in scores}
    s = by[("som", last)]
    if not (s.recall >= 0.9 and s.precision >= 0.8):
        failed.append(f"som at layer {last}: P={s.precision:.3f} R={s.recall:.3f}")
    for layer in range(truth.onset_layer, truth.num_layers + 1):
        s = by[("norm_z", layer)]
        if not (s.recall >= 0.9 and s.precision >= 0.9):
            failed.append(f"norm_z at layer {layer}: P={s.precision:.3f} R={s.recall:.3f}")
    if not bool((after < 2).all()):
        failed.append(f"after mitigation max/median = {float(after.max()):.2f} >= 2")
    return failed


def position_overlap(mask: torch.Tensor) -> float:
    """Mean Jaccard index of the planted position sets over all pairs of images: (B, N) bool."""
    m = mask.float()
    inter = m @ m.T
    union = m.sum(1)[:, None] + m.sum(1)[None, :] - inter
    iu = torch.triu_indices(len(m), len(m), offset=1)
    jac = inter[iu[0], iu[1]] / union[iu[0], iu[1]].clamp(min=1)
    return float(jac.mean()) if jac.numel() else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="analysis_output/detector_accuracy.csv")
    args = ap.parse_args(argv)

    bundle, truth = planted_model(args.model, seed=args.seed)
    names, images = analysis_images(bundle)
    truth_mask = truth.mask(images).flatten(1)
    trace = probe.record(bundle, images, heads="mean")
    scores = score_layers(trace, truth_mask)
    before, after = mitigation_ratios(trace, truth.num_layers - 1)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                "model",
                "weights",
                "seed",
                "detector",
                "layer",
                "tp",
                "fp",
                "fn",
                "precision",
                "recall",
                "n_images",
                "n_planted",
            ]
        )
        for s in scores:
            w.writerow(
                [
                    bundle.name,
                    bundle.pretrained,
                    args.seed,
                    s.detector,
                    s.layer,
                    s.tp,
                    s.fp,
                    s.fn,
                    f"{s.precision:.4f}",
                    f"{s.recall:.4f}",
                    len(names),
                    int(truth_mask.sum()),
                ]
            )

    dets = available_detectors()
    print(f"{bundle.label}: {truth.description}")
    print(
        f"{len(names)} images, {int(truth_mask.sum())} planted tokens "
        f"(per image {truth_mask.sum(1).tolist()})"
    )
    print(
        f"planted positions: {int(truth_mask.any(0).sum())} distinct over the images, mean "
        f"pairwise Jaccard {position_overlap(truth_mask):.3f} (1: the same positions in every "
        "image)"
    )
    print("precision / recall per layer (pooled over images; SYNTHETIC model, planted outliers)")
    print("layer  " + "  ".join(f"{d:>13}" for d in dets))
    by = {(s.detector, s.layer): s for s in scores}
    for layer in range(1, trace.num_layers + 1):
        mark = "*" if layer == truth.onset_layer else " "
        cells = [f"{by[(d, layer)].precision:5.2f} / {by[(d, layer)].recall:4.2f}" for d in dets]
        print(f"{layer:>4}{mark}  " + "  ".join(f"{c:>13}" for c in cells))
    print(f"(* onset layer {truth.onset_layer})")
    print(
        f"layer {truth.num_layers - 1} max/median patch norm: before mitigation "
        f"{float(before.min()):.2f}..{float(before.max()):.2f}, after mitigating the SOM "
        f"detections {float(after.min()):.3f}..{float(after.max()):.3f}"
    )
    failed = check_targets(scores, truth, after)
    print("targets: " + ("all met" if not failed else "FAILED: " + "; ".join(failed)))
    print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
