"""The released variants as presets, each against a loop-based reference written from its
description (docs/sfp_presets.md): the official preset at another depth (absolute layers),
the depth-scaled reading, ``release-2025-12``, ``sc-clip`` and the paper SAE's options.

All models are random-initialised; every reference runs the blocks through
``nn.MultiheadAttention`` itself and computes the tail per head with explicit softmaxes.
"""

from __future__ import annotations

import argparse

import pytest
import torch
from conftest import make_tiny_bundle
from torch import nn

from sfp.cli import common
from sfp.methods.config import PRESETS, ConfigError, SFPConfig
from sfp.methods.encoders import make_encoder
from sfp.methods.purify import SCCLIPEncoder, SFPEncoder, sae_paper
from sfp.models.loading import load_model
from sfp.models.text import TEMPLATES, resolve_templates

# --------------------------------------------------------------------------------------------
# shared by-hand pieces
# --------------------------------------------------------------------------------------------


def smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    """(n, 3, size, size) low-frequency random images plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, 4, 4, generator=g)
    x = nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return x + 0.1 * torch.randn(n, 3, size, size, generator=g)


def run_blocks(visual: nn.Module, image: torch.Tensor):
    """Embed one image at the pretraining size and run blocks 1..L-1 one by one.

    Returns ({l: h_l (T, C)}, {l: attention of block l (H, T, T)})."""
    blocks = visual.transformer.resblocks
    p = visual.conv1(image)
    x = torch.cat([visual.class_embedding[None], p.flatten(2)[0].T]) + visual.positional_embedding
    x = visual.ln_pre(x)[None]
    h, attn = {}, {}
    for layer in range(1, len(blocks)):
        blk = blocks[layer - 1]
        y = blk.ln_1(x)
        o, w = blk.attn(y, y, y, need_weights=True, average_attn_weights=False)
        x = x + o
        x = x + blk.mlp(blk.ln_2(x))
        h[layer], attn[layer] = x[0], w[0]
    return h, attn


def som_outliers(attn: torch.Tensor) -> set[int]:
    """1.5 A[cls, i] > A[i, i] on the head mean (cls row scaled first), top 10 by A[cls, i]."""
    scaled = attn.clone()
    scaled[:, 0, 1:] *= 1.5
    avg = sum(scaled[i] for i in range(scaled.shape[0])) / scaled.shape[0]
    n = avg.shape[0] - 1
    r = [float(avg[0, 1 + i]) for i in range(n)]
    cand = [i for i in range(n) if r[i] > float(avg[1 + i, 1 + i])]
    cand.sort(key=lambda i: (-r[i], i))
    return set(cand[:10])


def lof_outliers(hidden: torch.Tensor, k: int = 30, contamination: float = 0.05) -> set[int]:
    """SC-CLIP's LOF on the patch tokens, loops: squared distances, k nearest after self,
    reach distance max(d, kdist of the point), LRD = k / mean reach, LOF = mean LRD ratio."""
    patches = hidden[1:]
    n = patches.shape[0]
    dist = torch.stack([((patches - patches[i]) ** 2).sum(dim=-1) for i in range(n)])
    nbrs = [torch.argsort(dist[i], stable=True)[1 : k + 1] for i in range(n)]
    kdist = [dist[i, nbrs[i][-1]] for i in range(n)]
    lrd = torch.stack([k / torch.stack([max(dist[i, j], kdist[i]) for j in nbrs[i]]).mean()
                       for i in range(n)])
    lof = torch.stack([(lrd[nbrs[i]] / lrd[i]).mean() for i in range(n)])
    threshold = torch.quantile(lof.float(), 1 - contamination)
    return {i for i in range(n) if lof[i] > threshold}


def mitigate(feat: torch.Tensor, g: int, flagged: set[int]) -> torch.Tensor:
    """Flagged tokens -> mean of their in-grid unflagged 8-neighbours (loops; the window grows
    when there are none)."""
    out = feat.clone()
    for idx in flagged:
        r, c = divmod(idx, g)
        for radius in range(1, g):
            nb = [feat[(r + dr) * g + c + dc]
                  for dr in range(-radius, radius + 1) for dc in range(-radius, radius + 1)
                  if 0 <= r + dr < g and 0 <= c + dc < g
                  and (r + dr) * g + c + dc not in flagged]
            if nb:
                out[idx] = sum(nb) / len(nb)
                break
    return out


def cosine(feat: torch.Tensor) -> torch.Tensor:
    f = feat / feat.norm(dim=-1, keepdim=True)
    return f @ f.T


def thresholded(c: torch.Tensor) -> torch.Tensor:
    s = c.clone()
    s[s < 0.4] = 0.0
    return s


def rownorm(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (s / (s.sum(dim=-1, keepdim=True) + 1e-6)) @ x


def logits_m(s: torch.Tensor) -> torch.Tensor:
    m = (s - s.mean()) * 3.0
    m[m < 0] = float("-inf")
    return m


def per_head(blk: nn.Module, y: torch.Tensor):
    """[(q_h, k_h, v_h)] of block ``blk``'s in_proj on y (N, C)."""
    c = y.shape[-1]
    heads = blk.attn.num_heads
    d = c // heads
    wq, wk, wv = blk.attn.in_proj_weight.split(c)
    bq, bk, bv = blk.attn.in_proj_bias.split(c)
    q, k, v = y @ wq.T + bq, y @ wk.T + bk, y @ wv.T + bv
    return [(q[:, i * d:(i + 1) * d], k[:, i * d:(i + 1) * d], v[:, i * d:(i + 1) * d])
            for i in range(heads)]


def attend(blk: nn.Module, y: torch.Tensor, probs) -> torch.Tensor:
    """out_proj(concat over heads of probs(q_h, k_h) v_h)."""
    outs = [probs(qh, kh) @ vh for qh, kh, vh in per_head(blk, y)]
    return blk.attn.out_proj(torch.cat(outs, dim=-1))


def sm(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, dim=-1)


def grid_of(h: dict[int, torch.Tensor]) -> int:
    return int(round((h[1].shape[0] - 1) ** 0.5))


# --------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------


def reference_official(visual, h, attn, *, ref: int, post: int, hai: range) -> torch.Tensor:
    """The official steps 2-8 with the given layer numbers, SOM on block L-1."""
    blocks = visual.transformer.resblocks
    last = len(blocks) - 1
    g = grid_of(h)
    flagged = som_outliers(attn[last])
    x = mitigate(h[last][1:], g, flagged)
    s_pre = thresholded(cosine(mitigate(h[ref][1:], g, flagged)))
    x = rownorm(s_pre, x)
    blk = blocks[last]
    m = logits_m(s_pre)
    d = x.shape[-1] // blk.attn.num_heads
    x = attend(blk, blk.ln_1(x), lambda q, k: (sm(k @ k.T * d**-0.5) + sm(q @ q.T * d**-0.5)
                                               + sm(m)) / 3) + 0.3 * h[last][0]
    s_post = thresholded(cosine(h[post][1:]))
    x = rownorm(s_post, x)
    p = sum(h[layer] for layer in hai)
    z = attend(blk, blk.ln_1(p[1:]), lambda q, k: sm(m)) + 0.3 * p[0]
    x = x + rownorm(s_post, z)
    return visual.ln_post(x) @ visual.proj


def reference_release_2025_12(visual, h, attn, mitigated_p: bool = False
                              ) -> tuple[torch.Tensor, set[int]]:
    """The run log's code, steps 1-4: SOM on block 11, mitigate h_11; SAE = mean of the q-q
    and k-k softmaxes + 0.3 cls(h_11); P = h_4 + ... + h_11 (unmitigated) through the same
    attention + 0.3 cls(P); X + Z; ln_post, proj."""
    blocks = visual.transformer.resblocks
    assert len(blocks) == 12
    g = grid_of(h)
    flagged = som_outliers(attn[11])
    x = mitigate(h[11][1:], g, flagged)
    blk = blocks[11]
    d = x.shape[-1] // blk.attn.num_heads

    def two(q, k):
        return (sm(q @ q.T * d**-0.5) + sm(k @ k.T * d**-0.5)) / 2

    h11 = torch.cat([h[11][:1], x]) if mitigated_p else h[11]
    x = attend(blk, blk.ln_1(x), two) + 0.3 * h[11][0]
    p = h[4] + h[5] + h[6] + h[7] + h[8] + h[9] + h[10] + h11
    z = attend(blk, blk.ln_1(p[1:]), two) + 0.3 * p[0]
    return visual.ln_post(x + z) @ visual.proj, flagged


def reference_sc_clip(visual, h) -> tuple[torch.Tensor, set[int]]:
    """SC-CLIP steps 1-4: LOF on h_11, mitigate; C = cosine of mitigated h_9, S_pre = C
    thresholded, X <- rownorm(S_pre) X; SAE = mean of softmax(M) (M from C unthresholded) and
    the k-k softmax + 0.3 cls(h_11); S_post from h_4; P = h_4..h_10 through the same attention
    + 0.3 cls(P), rownorm(S_post); X + Z; ln_post, proj."""
    blocks = visual.transformer.resblocks
    assert len(blocks) == 12
    g = grid_of(h)
    flagged = lof_outliers(h[11])
    x = mitigate(h[11][1:], g, flagged)
    c = cosine(mitigate(h[9][1:], g, flagged))
    x = rownorm(thresholded(c), x)
    blk = blocks[11]
    d = x.shape[-1] // blk.attn.num_heads
    m = logits_m(c)

    def two(q, k):
        return (sm(m) + sm(k @ k.T * d**-0.5)) / 2

    x = attend(blk, blk.ln_1(x), two) + 0.3 * h[11][0]
    s_post = thresholded(cosine(h[4][1:]))
    x = rownorm(s_post, x)
    p = sum(h[layer] for layer in range(4, 11))
    z = rownorm(s_post, attend(blk, blk.ln_1(p[1:]), two) + 0.3 * p[0])
    return visual.ln_post(x + z) @ visual.proj, flagged


# --------------------------------------------------------------------------------------------
# depth: the official preset keeps the release's absolute layers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deep():
    """A 16-block random ViT (width 64, 4 heads) at 128 px: an 8 x 8 grid."""
    return make_tiny_bundle(layers=16, image_size=128, seed=3)


@pytest.fixture(scope="module")
def deep_run(deep):
    image = smooth_images(1, 128, seed=4)
    with torch.no_grad():
        h, attn = run_blocks(deep.visual, image)
    return image, h, attn


def test_official_uses_absolute_layers_at_16_blocks(deep, deep_run) -> None:
    image, h, attn = deep_run
    r = SFPConfig.official().resolve(16)
    assert (r.detect_layer, r.ref_layer, r.post_layer) == (15, 9, 4)
    assert r.hai_layers == tuple(range(4, 11))
    with torch.no_grad():
        expected = reference_official(deep.visual, h, attn, ref=9, post=4, hai=range(4, 11))
    st = SFPEncoder(deep).stages(image)
    assert len(st.indices[0]) >= 1
    err = (st.features[0] - expected).abs().max().item()
    assert err < 1e-4, err


def test_depth_scaled_reading_is_an_option(deep, deep_run) -> None:
    image, h, attn = deep_run
    # 16 blocks: 9 * 16 / 12 = 12, 4 * 16 / 12 = 5.33 -> 5, 10 * 16 / 12 = 13.33 -> 13
    r = SFPConfig.official(layer_rule="scaled").resolve(16)
    assert (r.ref_layer, r.post_layer, r.hai_layers) == (12, 5, tuple(range(5, 14)))
    with torch.no_grad():
        expected = reference_official(deep.visual, h, attn, ref=12, post=5, hai=range(5, 14))
        absolute = reference_official(deep.visual, h, attn, ref=9, post=4, hai=range(4, 11))
    got = SFPEncoder(deep, SFPConfig.official(layer_rule="scaled")).encode_patches(image)[0]
    assert (got - expected).abs().max().item() < 1e-4
    assert (got - absolute).abs().max().item() > 1e-2  # the two readings differ


@pytest.mark.parametrize(
    "depth, release, scaled",
    [
        (12, (9, 4, 4, 10), (9, 4, 4, 10)),
        (24, (9, 4, 4, 10), (18, 8, 8, 20)),
        (32, (9, 4, 4, 10), (24, 11, 11, 27)),
        (6, (5, 4, 4, 5), (5, 2, 2, 5)),
        (2, (1, 1, 1, 1), (1, 1, 1, 1)),
    ],
)
def test_layer_rules_by_depth(depth: int, release: tuple, scaled: tuple) -> None:
    for rule, expected in (("release", release), ("scaled", scaled)):
        r = SFPConfig.official(layer_rule=rule).resolve(depth)
        got = (r.ref_layer, r.post_layer, r.hai_layers[0], r.hai_layers[-1])
        assert got == expected, rule
        assert r.detect_layer == depth - 1
    assert SFPConfig.official().layer_rule == "release"
    with pytest.raises(ConfigError, match="layer_rule"):
        SFPConfig.official(layer_rule="relative")


# --------------------------------------------------------------------------------------------
# presets by name
# --------------------------------------------------------------------------------------------


def test_preset_is_the_one_lookup() -> None:
    assert set(PRESETS.names()) >= {"official", "paper", "release-2025-12", "sc-clip"}
    for name in ("official", "paper", "release-2025-12", "sc-clip"):
        cfg = SFPConfig.preset(name)
        assert cfg.preset_name == name
        assert SFPConfig.from_dict(cfg.to_dict()) == cfg
        assert eval(repr(cfg), {"SFPConfig": SFPConfig}) == cfg  # noqa: S307
    assert SFPConfig.preset("official") == SFPConfig.official()
    assert SFPConfig.preset("paper") == SFPConfig.paper()
    cfg = SFPConfig.preset("release-2025-12", top_k=5)
    assert cfg.top_k == 5 and repr(cfg) == "SFPConfig.preset('release-2025-12', top_k=5)"


def test_release_2025_12_settings() -> None:
    cfg = SFPConfig.preset("release-2025-12")
    assert (cfg.detector, cfg.top_k, cfg.cls_scale) == ("som", 10, 1.5)
    assert not cfg.pre_aggregate and not cfg.post_aggregate
    r = cfg.resolve(12)
    assert r.som_layers == (11,) and r.hai_layers == tuple(range(4, 12))
    assert SFPConfig.preset("release-2025-12", res_cls=0.2).cls_scale == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="hai_stop=11 is out of range for a 6-block model"):
        cfg.resolve(6)


def test_sfp15_templates() -> None:
    t = resolve_templates("sfp15")
    assert len(t) == 15 and len(set(t)) == 15
    assert t[0].format("cat") == "a clean origami cat."
    assert t[9].format("cat") == "There is a large cat in the scene."
    assert t[14].format("cat") == "a photo of a large cat."
    assert all(s.count("{}") == 1 for s in t)
    assert "sfp15" in TEMPLATES


def _segmenter_args(**kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    common.add_segmenter_arguments(p)
    return p.parse_args([x for k, v in kw.items() for x in (f"--{k}", v)])


def test_preset_templates_default_in_segmenter_and_cli(vit_s16) -> None:
    """release-2025-12 was released with sfp15: the Segmenter (direct or for a benchmark) uses
    it unless templates are given; presets without their own set keep the default."""
    from sfp.seg.pipeline import Segmenter

    assert Segmenter(vit_s16, ["cat", "dog"], config="release-2025-12").templates == "sfp15"
    assert Segmenter(vit_s16, ["cat"], config=SFPConfig.preset("release-2025-12",
                                                                 res_cls=0.2)).templates == "sfp15"
    assert Segmenter(vit_s16, ["cat"], config="release-2025-12",
                     templates="openai80").templates == "openai80"
    assert Segmenter(vit_s16, ["cat"], config="official").templates is None
    assert Segmenter(vit_s16, ["cat"], method="sc-clip").templates is None
    seg = Segmenter.for_benchmark(vit_s16, "voc21", config="release-2025-12")
    assert seg.templates == "sfp15"
    assert Segmenter.for_benchmark(vit_s16, "voc21").templates == "openai80"
    out = common.segmenter_overrides(_segmenter_args(preset="release-2025-12",
                                                     templates="openai80"))
    assert out["templates"] == "openai80"
    out = common.segmenter_overrides(_segmenter_args(preset="release-2025-12"))
    assert out["config"] == "release-2025-12" and "templates" not in out


# --------------------------------------------------------------------------------------------
# release-2025-12 and sc-clip on a random ViT-B/16
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vitb():
    torch.manual_seed(5)
    return load_model("ViT-B-16", pretrained=None, device="cpu")


@pytest.fixture(scope="module")
def vitb_run(vitb):
    image = smooth_images(1, 224, seed=6)
    with torch.no_grad():
        h, attn = run_blocks(vitb.visual, image)
    return image, h, attn


def test_release_2025_12_matches_its_reference(vitb, vitb_run) -> None:
    image, h, attn = vitb_run
    with torch.no_grad():
        expected, flagged = reference_release_2025_12(vitb.visual, h, attn)
    st = SFPEncoder(vitb, "release-2025-12").stages(image)
    assert set(st.indices[0].tolist()) == flagged and len(flagged) == 10
    assert st.s_pre is None and st.s_post is None
    err = (st.features[0] - expected).abs().max().item()
    assert err < 1e-4, err
    # P sums h_11 as block 11 produced it; with the mitigated h_11 the result differs
    with torch.no_grad():
        other, _ = reference_release_2025_12(vitb.visual, h, attn, mitigated_p=True)
    assert (st.features[0] - other).abs().max().item() > 1e-3


def test_sc_clip_matches_its_reference(vitb, vitb_run) -> None:
    image, h, _ = vitb_run
    with torch.no_grad():
        expected, flagged = reference_sc_clip(vitb.visual, h)
    enc = make_encoder(vitb, "sc-clip")
    assert isinstance(enc, SCCLIPEncoder) and enc.display == "SC-CLIP"
    assert enc.config == SFPConfig.preset("sc-clip")
    st = enc.stages(image)
    assert set(st.indices[0].tolist()) == flagged and len(flagged) >= 5
    # no flagged patch without an unflagged neighbour: SC-CLIP's rule and ours coincide here
    assert int(st.widened[0]) == 0
    err = (st.features[0] - expected).abs().max().item()
    assert err < 1e-4, err
    same = SFPEncoder(vitb, SFPConfig.preset("sc-clip")).encode_patches(image)
    assert torch.equal(same, enc.encode_patches(image))


# --------------------------------------------------------------------------------------------
# the paper SAE's readings
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["block", "eq7"])
def test_paper_sae_mean_of_two_softmaxes_by_hand(deep, form: str) -> None:
    blk = deep.visual.transformer.resblocks[-1]
    x = torch.randn(1, 20, 64, generator=torch.Generator().manual_seed(7))
    got = sae_paper(blk, x, combine="mean", form=form)[0]
    d = 64 // blk.attn.num_heads
    with torch.no_grad():
        y = blk.ln_1(x[0])
        a = attend(blk, y, lambda q, k: (sm(0.5 * q @ q.T * d**-0.5)
                                         + sm(0.5 * k @ k.T * d**-0.5)) / 2)
        if form == "block":
            x1 = x[0] + a
            expected = x1 + blk.mlp(blk.ln_2(x1))
        else:
            expected = x[0] + blk.mlp(blk.ln_2(a))
        one_softmax = sae_paper(blk, x, combine="sum", form=form)[0]
    assert (got - expected).abs().max().item() < 1e-5
    assert (got - one_softmax).abs().max().item() > 1e-4
    assert SFPConfig.paper().paper_sae_combine == "sum"
    assert SFPConfig.paper().paper_sae_form == "block"
    with pytest.raises(ConfigError, match="paper_sae_combine"):
        SFPConfig.paper(paper_sae_combine="max")


# --------------------------------------------------------------------------------------------
# the paper criterion without the factor: about half the tokens of early layers
# --------------------------------------------------------------------------------------------


def test_paper_criterion_flags_about_half_of_early_layers_on_the_planted_model() -> None:
    from sfp.core.io import normalize
    from sfp.core.outliers import detect
    from sfp.core.probe import record
    from sfp.models.synthetic import planted_model, synthetic_scene

    bundle, truth = planted_model("ViT-B-16", seed=0)
    x = normalize(synthetic_scene(0)[None], bundle)
    tr = record(bundle, x, heads="mean")
    n = tr.grid[0] * tr.grid[1]
    # before the planted circuit's attention (block onset holds its competition head)
    for layer in range(1, truth.onset_layer):
        flagged = int(detect("som", tr, layer, cls_scale=1.0, top_k=None).mask.sum())
        assert 0.35 * n <= flagged <= 0.65 * n, (layer, flagged)
    planted = truth.mask(x).reshape(1, -1)
    for layer in range(truth.onset_layer + 1, bundle.num_layers):
        mask = detect("som", tr, layer, cls_scale=1.0, top_k=None).mask
        assert torch.equal(mask, planted), layer


def test_figures_say_so_where_they_show_the_paper_criterion(tiny_vit) -> None:
    from sfp.viz.figures import layerwise as lw

    image = smooth_images(1, 64, seed=9)[0].clamp(0, 1)
    paper = lw.layerwise_data(tiny_vit, image)
    assert paper.criterion_note == lw.PAPER_CRITERION_NOTE
    assert "about half the tokens of early layers" in lw.PAPER_CRITERION_NOTE
    fig = lw.layerwise_purification(paper)
    assert lw.PAPER_CRITERION_NOTE[:40] in fig._suptitle.get_text().replace("\n", " ")
    official = lw.layerwise_data(tiny_vit, image, config=SFPConfig.official(som_start=1))
    assert official.criterion_note == ""
    assert lw.paper_criterion_note(1.0, None) and not lw.paper_criterion_note(1.5, None)
    assert not lw.paper_criterion_note(1.0, 10)


# --------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, preset, templates, preset_name", [
    ("sfp", "release-2025-12", "sfp15", "release-2025-12"),
    ("sc-clip", "official", "openai80", "sc-clip"),
])
def test_eval_cli_runs_the_presets(tmp_path, capsys, method, preset, templates,
                                   preset_name) -> None:
    import json

    from fakedata import make_fake_dataset

    import sfp.cli.app as cli

    root = make_fake_dataset("voc20", tmp_path / "data", n=1, size=(24, 32))
    out = tmp_path / "res.json"
    extra = [] if templates == "sfp15" else ["--templates", "simple"]
    # 96 px windows: 36 patches of ViT-S-16, enough for LOF's 30 neighbours (sc-clip)
    rc = cli.main(["eval", "--benchmark", "voc20", "--data-root", str(root), "--out", str(out),
                   "--synthetic", "--model", "ViT-S-16", "--method", method, "--preset", preset,
                   "--short-side", "96", "--crop", "96", "--stride", "96", "--no-progress",
                   *extra])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    assert res["config"]["encoder"]["preset_name"] == preset_name
    assert res["config"]["segmenter"]["templates"] == ("sfp15" if templates == "sfp15"
                                                      else "simple")
