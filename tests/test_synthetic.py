"""Tests for sfp.models.synthetic: a real-architecture CLIP with planted outliers and known truth.

The properties are the literature's (Darcet et al. 2024; Sun et al. 2024; Jiang et al. 2025)
and SFP's criterion, measured through the public probe on natural photos (scikit-image) and
generated scenes. Models are built once per module.
"""

from __future__ import annotations

import math

import open_clip
import pytest
import torch

from sfp.core import forward, io, probe
from sfp.core.outliers import mitigate, norm_z, som
from sfp.models.synthetic import (
    SYNTHETIC_LABEL,
    PlantConfig,
    PlantedTruth,
    default_onset,
    planted_model,
    synthetic_scene,
)

N_PHOTOS = 4  # astronaut, coffee, chelsea, rocket
N_SCENES = 4


@pytest.fixture(scope="module")
def b16():
    return planted_model("ViT-B-16", seed=0)


S16_KW = {"seed": 1, "onset_layer": 4, "n_outliers": 8, "strength": 15.0}


@pytest.fixture(scope="module")
def s16():
    """A smaller ViT with non-default onset, count and strength."""
    return planted_model("ViT-S-16", **S16_KW)


@pytest.fixture(scope="module")
def images(b16):
    bundle, _ = b16
    photos = [io.prepare(arr, bundle) for arr in io.sample_images().values()]
    scenes = [io.normalize(synthetic_scene(s), bundle)[None] for s in range(N_SCENES)]
    return torch.cat(photos + scenes)


@pytest.fixture(scope="module")
def trace(b16, images):
    return probe.record(b16[0], images, heads="mean")


@pytest.fixture(scope="module")
def planted(b16, images):
    """Truth as (B, N) bool."""
    return b16[1].mask(images).flatten(1)


def _norm_ratio(trace: probe.Trace, layer: int) -> torch.Tensor:
    """Patch norms / median patch norm per image: (B, N)."""
    n = trace.token_norms(layer)[:, 1:]
    return n / n.median(dim=1, keepdim=True).values


def test_labels_and_truth_fields(b16, trace):
    bundle, truth = b16
    assert bundle.pretrained == SYNTHETIC_LABEL == "synthetic (planted outliers)"
    assert bundle.is_synthetic and not bundle.is_random
    assert "synthetic (planted outliers)" in bundle.label
    assert trace.is_synthetic and SYNTHETIC_LABEL in trace.label
    assert isinstance(truth, PlantedTruth)
    assert truth.onset_layer == 6 and truth.num_layers == 12
    assert len(truth.channels) == 2 and all(0 <= c < bundle.width for c in truth.channels)
    assert truth.n_outliers == 10 and truth.base_grid == (14, 14)
    assert SYNTHETIC_LABEL in repr(truth) and "onset_layer=6" in repr(truth)
    assert truth.description.startswith("Synthetic ViT-B-16 (planted outliers")
    assert truth.sink_layers == tuple(range(7, 13))
    assert truth.positions == "content" and "positions='content'" in repr(truth)


def _cell_members(truth) -> list[list[tuple[int, int]]]:
    cells = truth.cells
    return [[tuple(p) for p in (cells == r).nonzero().tolist()] for r in range(truth.n_outliers)]


def test_cells_partition_the_grid_without_touching(b16, s16):
    for truth in (b16[1], s16[1]):
        cells, prio = truth.cells, truth.priority
        assert cells.shape == prio.shape == truth.base_grid
        assert int(cells.min()) == -1 and int(cells.max()) == truth.n_outliers - 1
        assert torch.equal(truth.eligible, cells >= 0)
        members = _cell_members(truth)
        n = cells.numel()
        # cells of similar size, covering most of the grid
        assert min(map(len, members)) >= 0.4 * n / truth.n_outliers
        assert sum(map(len, members)) >= 0.6 * n
        for r, pts in enumerate(members):
            # a tie-breaking rank within the cell: a permutation of 0 .. size - 1
            assert sorted(int(prio[p]) for p in pts) == list(range(len(pts)))
            for a, b in pts:  # no position of another cell among the 8 neighbours
                around = cells[max(a - 1, 0) : a + 2, max(b - 1, 0) : b + 2]
                assert ((around == r) | (around == -1)).all(), (r, a, b)


def _rule_by_hand(truth, image: torch.Tensor) -> set[tuple[int, int]]:
    """The planting rule on the base grid, one cell at a time: the flat patch with the fewest
    (difference, level) exceedances, ties to the highest priority, if it is the cell's best."""
    d = truth.differences(image[None])[0]  # (gh, gw, D)
    out = set()
    for pts in _cell_members(truth):
        def key(p: tuple[int, int]) -> tuple[int, int]:
            score = sum(int((d[p] > t).sum()) for t in truth.score_thresholds)
            return score, -int(truth.priority[p])
        best = min(pts, key=key)
        if float(d[best].max()) <= truth.flat_threshold:
            out.add(best)
    return out


def test_mask_is_the_flattest_patch_of_each_cell(b16, images):
    _, truth = b16
    mask = truth.mask(images)
    for b in range(len(images)):
        assert set(map(tuple, mask[b].nonzero().tolist())) == _rule_by_hand(truth, images[b])


def test_positions_follow_image_content(b16, planted):
    # different photos and scenes get different planted positions: no fixed grid positions
    sets = {tuple(row.nonzero().flatten().tolist()) for row in planted}
    assert len(sets) == len(planted)
    union = planted.any(0)
    assert int(union.sum()) >= 3 * planted.sum(1).max()


def test_outlier_moves_when_its_patch_gets_texture(b16):
    """On a uniform image every patch ties, so each cell plants its highest-priority patch;
    texture painted on that patch moves the model's outlier to the next one."""
    bundle, truth = b16
    p = bundle.patch_size
    grey = io.normalize(torch.full((1, 3, 224, 224), 0.5), bundle)
    cell = _cell_members(truth)[0]
    order = sorted(cell, key=lambda q: -int(truth.priority[q]))
    first, second = order[0], order[1]
    textured = grey.clone()
    r, c = first
    textured[0, :, r * p : (r + 1) * p, c * p : c * p + p // 2] += 0.5  # small: stays flat
    x = torch.cat([grey, textured])
    mask = truth.mask(x)
    assert mask[0][first] and not mask[0][second]
    assert mask[1][second] and not mask[1][first]
    assert int(mask[0].sum()) == int(mask[1].sum()) == truth.n_outliers
    tr = probe.record(bundle, x, layers=[truth.num_layers], heads="mean")
    high = _norm_ratio(tr, truth.num_layers) > math.sqrt(truth.strength)
    assert torch.equal(high, mask.flatten(1))


def test_default_onset():
    assert [default_onset(n) for n in (3, 6, 12, 24, 32)] == [2, 3, 6, 12, 16]


def test_norms_ordinary_before_onset_massive_after(b16, trace, planted):
    # property 1
    onset, num_layers = b16[1].onset_layer, b16[1].num_layers
    for layer in range(1, onset):
        assert _norm_ratio(trace, layer)[planted].max() < 2.0, layer
    for layer in range(onset, num_layers + 1):
        r = _norm_ratio(trace, layer)
        assert r[planted].min() >= 10.0, layer
        assert r[~planted].max() < 2.0, layer


def test_massive_activations_on_few_channels(b16, trace, planted):
    _, truth = b16
    h = trace.hidden(truth.num_layers)[:, 1:]  # (B, N, C)
    top2 = h[planted].abs().topk(2, dim=-1).indices.sort(dim=-1).values
    assert (top2 == torch.tensor(sorted(truth.channels))).all()
    share = h[planted][:, list(truth.channels)].norm(dim=-1) / h[planted].norm(dim=-1)
    assert share.min() > 0.99


def test_class_token_attends_planted_and_som_criterion(b16, trace, planted):
    # property 2
    _, truth = b16
    assert truth.onset_layer + 1 == truth.sink_layers[0]
    for layer in truth.sink_layers:
        a = trace.mean_attention(layer)  # (B, T, T)
        r = a[:, 0, 1:]
        s = torch.diagonal(a, dim1=-2, dim2=-1)[:, 1:]
        for b in range(a.shape[0]):
            m = planted[b]
            assert r[b][m].mean() >= 5 * r[b][~m].mean(), (layer, b)
        assert (1.5 * r[planted] > s[planted]).all(), layer
        assert (1.0 * r[planted] > s[planted]).all(), layer
        found = som(trace.attention(layer), top_k=None, cls_scale=1.0).mask
        assert found[planted].all(), layer
    # before the sinks, the class token does not single them out
    a = trace.mean_attention(truth.onset_layer)[:, 0, 1:]
    assert a[planted].mean() < 2 * a[~planted].mean()


def test_patches_attend_planted_sinks(b16, trace, planted):
    # property 3
    _, truth = b16
    for layer in truth.sink_layers:
        pp = trace.mean_attention(layer)[:, 1:, 1:]
        for b in range(pp.shape[0]):
            m = planted[b]
            to_planted = pp[b][~m][:, m].mean()
            to_ordinary = pp[b][~m][:, ~m].mean()
            assert to_planted >= 3 * to_ordinary, (layer, b)


def test_planted_fraction_and_positions(b16, trace, planted):
    # property 4
    _, truth = b16
    n = planted.shape[1]
    frac = planted.float().mean(dim=1)
    assert ((frac >= 0.02) & (frac <= 0.06)).all(), planted.sum(1).tolist()
    for layer in range(truth.onset_layer, truth.num_layers + 1):
        high = _norm_ratio(trace, layer) > math.sqrt(truth.strength)
        assert torch.equal(high, planted), layer
    assert n == 196


def test_photos_are_away_from_the_thresholds(b16, images):
    # the checks above are exact only outside the thin threshold bands
    _, truth = b16
    assert not truth.ambiguous(images).any()
    flat_margin, cell_margin = truth.margins(images)
    assert cell_margin.min() == 1.0  # the base grid's cell codes are exactly 0 or 1
    assert flat_margin.min() > 0


def test_ambiguous_flags_the_winners_at_the_flat_threshold(b16):
    """Every patch the same, its left half brighter by just over flat_threshold: all tie, no
    patch is flat, and each cell's highest-priority patch is one 1e-5 away from planting."""
    bundle, truth = b16
    p = bundle.patch_size
    x = io.normalize(torch.full((1, 3, 224, 224), 0.5), bundle)
    left = (torch.arange(224) % p) < p // 2
    x[..., left] += truth.flat_threshold + 1e-5
    assert (truth.flatness(x) - truth.flat_threshold).abs().max() < 1e-4
    assert not truth.mask(x).any()
    winners = torch.zeros(truth.base_grid, dtype=torch.bool)
    for cell in _cell_members(truth):
        winners[max(cell, key=lambda q: int(truth.priority[q]))] = True
    assert torch.equal(truth.ambiguous(x)[0], winners)
    assert not truth.ambiguous(x, band=0.0).any()


def test_embedding_finite_and_deterministic(s16):
    # property 5 (and the caller's global RNG is left alone)
    bundle, truth = s16
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again, truth2 = planted_model("ViT-S-16", **S16_KW)
    assert torch.equal(torch.rand(3), expected)
    sd1, sd2 = bundle.model.state_dict(), again.model.state_dict()
    assert sd1.keys() == sd2.keys()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert torch.equal(truth.eligible, truth2.eligible) and truth.channels == truth2.channels
    assert truth.massive_norm == truth2.massive_norm
    x = torch.cat([io.normalize(synthetic_scene(s)[None], bundle) for s in (3, 4)])
    with torch.no_grad():
        e1, e2 = bundle.model.encode_image(x), again.model.encode_image(x)
    assert torch.isfinite(e1).all() and torch.equal(e1, e2)


def test_ordinary_open_clip_model(s16):
    """The state dict loads into a fresh open_clip model, whose own forward plants outliers."""
    bundle, truth = s16
    fresh = open_clip.create_model("ViT-S-16", pretrained=None).eval()
    fresh.load_state_dict(bundle.model.state_dict(), strict=True)
    assert not bundle.model.visual._forward_hooks and not bundle.model.visual._forward_pre_hooks
    x = torch.cat([io.normalize(synthetic_scene(s)[None], bundle) for s in (5, 6)])
    outs: list[torch.Tensor] = []
    last = fresh.visual.transformer.resblocks[-1]
    handle = last.register_forward_hook(lambda mod, inp, out: outs.append(out))
    try:
        with torch.no_grad():
            e_fresh = fresh.encode_image(x)
            e_sfp = forward.encode_image(bundle.model.visual, x)
    finally:
        handle.remove()
    torch.testing.assert_close(e_fresh, e_sfp, rtol=1e-4, atol=1e-4)
    tokens = outs[0] if outs[0].shape[0] == 2 else outs[0].transpose(0, 1)  # (B, T, C)
    norms = tokens[:, 1:].norm(dim=-1)
    high = norms > math.sqrt(truth.strength) * norms.median(dim=1, keepdim=True).values
    assert torch.equal(high, truth.mask(x).flatten(1))


def test_small_model_non_square_images(s16):
    bundle, truth = s16
    photos = []
    for arr in list(io.sample_images().values())[:2]:
        img = io.resize_short_side(io.load_image(arr), 224)
        h, w = img.shape[-2:]
        left = (w - 320) // 2
        photos.append(img[..., :, left : left + 320] if w >= 320 else None)
    views = [p for p in photos if p is not None] + [synthetic_scene(7, 224, 320)]
    x = io.normalize(torch.stack(views), bundle)
    tr = probe.record(bundle, x, heads="mean")
    assert tr.grid == (14, 20)
    mask = truth.mask(x)
    assert mask.shape == (len(views), 14, 20)
    planted = mask.flatten(1)
    assert (planted.sum(1) > 0).all()
    for layer in range(1, truth.num_layers + 1):
        r = _norm_ratio(tr, layer)
        if layer < truth.onset_layer:
            assert r[planted].max() < 2.0
        else:
            assert torch.equal(r > math.sqrt(truth.strength), planted), layer
    a = tr.mean_attention(truth.num_layers)[:, 0, 1:]
    s = torch.diagonal(tr.mean_attention(truth.num_layers), dim1=-2, dim2=-1)[:, 1:]
    assert (a[planted] > s[planted]).all()


def test_mask_drops_partial_patches(b16):
    bundle, truth = b16
    x = io.normalize(synthetic_scene(1, 230, 250)[None], bundle)
    assert truth.mask(x).shape == (1, 14, 15)
    assert truth.flatness(x).shape == (1, 14, 15)
    with pytest.raises(ValueError, match="B, 3, H, W"):
        truth.mask(x[0])


def test_onset_layer_option(s16):
    bundle, truth = s16
    assert truth.onset_layer == 4 and truth.n_outliers == 8 and truth.strength == 15
    assert int(truth.cells.max()) == 7
    x = torch.cat([io.normalize(synthetic_scene(s)[None], bundle) for s in (0, 1)])
    planted = truth.mask(x).flatten(1)
    assert (planted.sum(1) >= 4).all()
    tr = probe.record(bundle, x, layers=[3, 4, 5, 12], heads="mean")
    assert _norm_ratio(tr, 3)[planted].max() < 2
    for layer in (4, 5, 12):
        r = _norm_ratio(tr, layer)
        assert torch.equal(r > math.sqrt(15), planted), layer
        assert 10 < r[planted].min() and r[planted].max() < 25, layer
    assert not som(tr.attention(4), top_k=None, cls_scale=1.0).mask[planted].all()
    assert som(tr.attention(5), top_k=None, cls_scale=1.0).mask[planted].all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"onset_layer": 1}, "onset_layer"),
        ({"onset_layer": 12}, "onset_layer"),
        ({"strength": 0}, "strength"),
        ({"n_outliers": 0}, "n_outliers"),
        ({"name": "ViT-Nope-16"}, "unknown open_clip model"),
        ({"name": "RN50"}, "ViT"),
    ],
)
def test_invalid_arguments(kwargs, match):
    kwargs = {"name": "ViT-S-16", **kwargs}
    with pytest.raises(ValueError, match=match):
        planted_model(**kwargs)


def test_detector_targets(b16, trace, planted):
    """The targets analysis/detector_accuracy.py checks on 20 images, here on 8."""
    _, truth = b16
    last = truth.num_layers - 1
    found = som(trace.attention(last), top_k=10, cls_scale=1.5).mask
    tp = int((found & planted).sum())
    assert tp / int(found.sum()) >= 0.8 and tp / int(planted.sum()) >= 0.9
    for layer in range(truth.onset_layer, truth.num_layers + 1):
        z = norm_z(trace.hidden(layer)).mask
        tp = int((z & planted).sum())
        assert tp / int(z.sum()) >= 0.9 and tp / int(planted.sum()) >= 0.9, layer
    patches = trace.hidden(last)[:, 1:]
    after = mitigate(patches, trace.grid, found).norm(dim=-1)
    ratio = after.amax(dim=1) / after.median(dim=1).values
    assert (ratio < 2).all()


def test_fixed_positions_option():
    """PlantConfig(positions="fixed"): flat patches at n_outliers seeded positions (the rule the
    toy CLIP keeps, for its 11 reserved channels)."""
    bundle, truth = planted_model("ViT-S-16", seed=2, n_outliers=6,
                                  config=PlantConfig(positions="fixed"))
    assert truth.positions == "fixed" and truth.cells is None and truth.n_outliers == 6
    pos = truth.eligible.nonzero().tolist()
    assert len(pos) == 6 and all(0 < r < 13 and 0 < c < 13 for r, c in pos)
    assert all(max(abs(a - c), abs(b - d)) >= 2 for a, b in pos for c, d in pos if (a, b) != (c, d))
    x = torch.cat([io.normalize(synthetic_scene(s)[None], bundle) for s in (0, 1)])
    mask = truth.mask(x)
    assert torch.equal(mask, (truth.flatness(x) <= truth.flat_threshold) & truth.eligible)
    tr = probe.record(bundle, x, layers=[truth.num_layers], heads="mean")
    assert torch.equal(_norm_ratio(tr, truth.num_layers) > math.sqrt(truth.strength),
                       mask.flatten(1))
    with pytest.raises(ValueError, match="positions"):
        planted_model("ViT-S-16", config=PlantConfig(positions="random"))
