"""Train the toy CLIP shipped with sfp (sfp/data/toy/toy_clip.safetensors + .json).

    .venv/bin/python benchmarks/train_toy.py            # the shipped run (fixed seed, steps)
    .venv/bin/python benchmarks/train_toy.py --steps 50 --out /tmp/toy.safetensors

The run is a function of its config (sfp.models.toy_training.TrainConfig): phase 1 (1500
steps, class-token loss), then phase 2 (600 steps, plus a mean-patch and a region-caption loss
on the patch tokens); on an idle 2-core CPU about 30 + 14 minutes. --phase1 FILE runs phase 2
alone from a phase-1 result. The record written next to the weights holds the config, the
first losses (which the test suite replays), the loss curves and the checksum.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from sfp.models.toy import toy_weights_path
from sfp.models.toy_training import TrainConfig, train_toy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    d = TrainConfig()
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--patch-steps", type=int, default=d.patch_steps)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--phase1", default=None, help="start phase 2 from this phase-1 weights "
                   "file of the same config (with its .json record)")
    p.add_argument("--out", default=str(toy_weights_path()),
                   help="weights file (.safetensors); the record goes next to it (.json)")
    a = p.parse_args()
    cfg = replace(d, steps=a.steps, batch=a.batch, seed=a.seed, threads=a.threads,
                  patch_steps=a.patch_steps)
    _, rec = train_toy(cfg, a.out, phase1=a.phase1)
    print(f"wrote {a.out} ({rec['bytes'] / 1e6:.2f} MB, sha256 {rec['sha256'][:12]}); "
          f"{cfg.steps} + {cfg.patch_steps} steps in {rec['train_seconds']:.0f} s, loss (last "
          f"50) {rec['phase1']['loss_last_50']:.3f} / {rec['phase2']['loss_last_50']:.3f}")


if __name__ == "__main__":
    main()
