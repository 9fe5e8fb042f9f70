"""Clean vs planted outliers on the toy CLIP: what outliers do to segmentation, and how much of
it each method recovers.

    .venv/bin/python benchmarks/toy_outliers.py [--n 100] [--seed 0] [--json FILE]

Models: the shipped toy CLIP (sfp.models.toy.load_toy) and the same weights with the planted
circuit (toy_planted_model: register neurons write a massive activation into flat patches at
seeded positions from block 3 on; blocks 4-6 attend to them, and in block 6 they carry one
fixed vector, as large as a median patch token, into every token that attends to them). Data:
the first N scenes of the generated toy benchmark (val split). Every encoder and SFP with
every preset, one after the other in one process.

The last rows are SFP's stages (the official preset with HAI off: "+SOM+SAE"; with SAE, HAI
and the similarity aggregation off too: "+SOM"), as the stage-ablation figure shows them.

Columns: mIoU (%) on the clean model; with the planted circuit's weight edits but no outliers
("circuit": the same model planted with strength 1e-6, so the outlier norm is ~0: what the
edits of 18 MLP neurons and of one query/key direction per head cost by themselves); on the
planted model; the drop (clean minus planted), and "recovered": the method's planted mIoU minus
clip's planted mIoU, over what clip lost (clean clip minus planted clip). Above it: how many
planted tokens the scenes have, and the recall of SOM / L2 at layer L - 1.
Rankings on toy data say nothing about real CLIP.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=100, help="toy scenes (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the planted circuit")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the rows here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    from sfp.methods.encoders import method_variants
    from sfp.methods.stages import stage_ladder
    from sfp.models.toy import load_toy, toy_planted_model
    from sfp.seg.toy import clean_vs_planted, planted_recall

    t0 = time.perf_counter()
    clean = load_toy()
    planted, truth = toy_planted_model(seed=a.seed)
    circuit, _ = toy_planted_model(seed=a.seed, strength=1e-6)
    recall = {d: planted_recall(planted, truth, d, n=a.n) for d in ("som", "l2")}
    n_planted = recall["som"][1]
    # SFP's stages one by one (the stage ladder of the figures and widgets): which one helps
    stages = [("sfp", cfg, f"sfp/official {name}")
              for name, _, cfg in stage_ladder("official") if name.startswith("+")]
    rows = clean_vs_planted(clean, planted, [*method_variants(), *stages], n=a.n,
                            circuit=circuit)
    clip = next(r for r in rows if r.label == "clip")
    lost = (clip.clean or 0) - (clip.planted or 0)

    print(f"toy benchmark, {a.n} scenes; planted circuit seed {a.seed}: {n_planted} planted "
          f"tokens ({n_planted / a.n:.2f} per scene), onset layer {truth.onset_layer}")
    print("recall at layer L-1 (default top_k): "
          + ", ".join(f"{d.upper()} {r:.3f}" for d, (r, _) in recall.items()))
    print()
    print(f"| {'method':<22} | clean | circuit | planted |  drop | recovered |")
    print(f"|{'-' * 24}|------:|--------:|--------:|------:|----------:|")
    out = []
    for r in rows:
        if r.clean is None:
            print(f"| {r.label:<22} | n/a: {r.skipped[:60]} | | | | |")
            out.append({"method": r.label, "skipped": r.skipped})
            continue
        rec = (r.planted - clip.planted) / lost if lost > 0 else None
        rec_text = f"{rec * 100:8.0f}%" if rec is not None else "  – (clip lost nothing)"
        print(f"| {r.label:<22} | {r.clean * 100:5.1f} | {r.circuit * 100:7.1f} | "
              f"{r.planted * 100:7.1f} | {r.drop * 100:5.1f} | {rec_text} |")
        out.append({"method": r.label, "clean": r.clean, "circuit": r.circuit,
                     "planted": r.planted, "recovered": rec})
    print(f"\n({time.perf_counter() - t0:.0f} s; toy data: rankings here say nothing about "
          "real CLIP)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"n": a.n, "seed": a.seed, "planted_tokens": n_planted,
                       "recall": {d: r for d, (r, _) in recall.items()}, "rows": out}, f,
                      indent=1)


if __name__ == "__main__":
    main()
