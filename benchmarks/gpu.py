"""Images per second on one CUDA GPU: SFP official vs CLIP vs a release-style window loop.

    python benchmarks/gpu.py [--model ViT-B-16] [--size 560 1120] [--seconds 3]
                             [--batches 1 8 32] [--precisions fp32 fp16 bf16]

Needs a CUDA GPU (without one it stops with one sentence); CI does not run it. Prepared to
finish in well under 5 minutes on one GPU (21 measurements of ``--seconds`` each, plus the
warm-ups and the model load).

Workload: one random ``--size`` image (default 560 x 1120, Cityscapes at its inference size:
4 x 9 = 36 windows of 224 x 224, stride 112, so window batches up to 32 are meaningful),
segmented with the cityscapes class list and one template (the text queries are embedded
once in the warm-up and not timed). Random weights (``pretrained=None``): speed does not
depend on them, and nothing is downloaded. Rows, for each precision
(:func:`sfp.models.loading.set_precision`: fp16/bf16 weights with float32 LayerNorms, the
release's convention):

- ``sfp`` and ``clip`` at each window batch: ``Segmenter.predict_labels`` (resize, windows,
  encoder calls of that many windows, stitching, upsampling, post-processing);
- ``release loop``: what the release's ``forward_slide`` does, written here with sfp's pieces:
  one ``encode_patches`` call per window (batch 1), its logits upsampled and added into
  full-size sum and count maps, then the same upsampling and arg-max.

Timing: ``torch.cuda.synchronize()`` around each image; two warm-up images per row, then
images until ``--seconds`` have passed (at least 3). Reported: images/s (median over those
images of 1 / seconds per image) and windows/s.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(ROOT))

from sfp.models.loading import bundle_from_model, load_model, set_precision  # noqa: E402
from sfp.seg.pipeline import Segmenter, Stitcher, window_logits  # noqa: E402

NO_CUDA = ("benchmarks/gpu.py needs a CUDA GPU and torch sees none "
           "(torch.cuda.is_available() is False); run it on a machine with one.")


def _release_loop(seg: Segmenter, image: torch.Tensor) -> torch.Tensor:
    """One window per encoder call, summed into full-size maps (the release's forward_slide)."""
    prep = seg.prepare(image)
    q = seg.queries.embeddings.to(seg.bundle.device, torch.float32)
    st = Stitcher(q.shape[0], prep.size, device=seg.bundle.device)
    for y0, x0, y1, x1 in prep.windows:
        crop = prep.pixels[:, y0:y1, x0:x1][None]
        feats = seg.encoder.encode_patches(crop)
        st.add(window_logits(feats.float(), q, prep.grid, (y1 - y0, x1 - x0)), [(y0, x0, y1, x1)])
    logits = F.interpolate(st.result()[None], size=image.shape[-2:], mode="bilinear")[0]
    q2c = seg.queries.query_to_class.to(logits.device)
    return q2c[logits.argmax(dim=0)]  # the class of the best query (no thresholds)


def _measure(fn, seconds: float) -> list[float]:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--size", type=int, nargs=2, default=[560, 1120], metavar=("H", "W"))
    ap.add_argument("--seconds", type=float, default=3.0, help="timed seconds per row")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "fp16", "bf16"])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    logging.disable(logging.WARNING)  # "weights are RANDOM" is intended here
    torch.manual_seed(0)
    base = load_model(args.model, pretrained=None, device="cuda")
    logging.disable(logging.NOTSET)
    h, w = args.size
    rgb = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    image = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255).cuda()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.model} "
          f"(random weights), image {h} x {w}, TF32 matmul "
          f"{torch.backends.cuda.matmul.allow_tf32}, cuDNN TF32 "
          f"{torch.backends.cudnn.allow_tf32}")
    header = f"{'precision':<10} {'method':<14} {'window batch':>12} {'images/s':>10} " \
             f"{'windows/s':>10}"
    print(header)
    print("-" * len(header))
    for prec in args.precisions:
        model = set_precision(copy.deepcopy(base.model), prec).eval()
        bundle = bundle_from_model(model, name=base.name, pretrained="random")
        rows = [(m, b) for m in ("sfp", "clip") for b in args.batches] + [("release loop", 1)]
        for method, batch in rows:
            seg = Segmenter.for_benchmark(
                bundle, "cityscapes", method="sfp" if method == "release loop" else method,
                config="official" if method != "clip" else None, templates="simple",
                batch_size=batch, short_side=None, text_cache=False)
            n_win = len(seg.prepare(image).windows)
            with torch.inference_mode():
                fn = ((lambda s=seg: _release_loop(s, image)) if method == "release loop"
                      else (lambda s=seg: s.predict_labels(image)))
                times = _measure(fn, args.seconds)
            ips = 1.0 / statistics.median(times)
            print(f"{prec:<10} {method:<14} {batch:>12} {ips:>10.2f} {ips * n_win:>10.1f}")
        del model, bundle
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
