"""Tests for sfp.core.neurons and the "ttr" method: register neurons, massive channels and
interventions, against the planted model's ground truth, by-hand reductions of a recorded
trace, and hand-made tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sfp
from sfp.core import io, probe
from sfp.core import neurons as nr
from sfp.core.errors import InputError
from sfp.methods.encoders import make_encoder
from sfp.methods.registers import TTRConfig
from sfp.models.synthetic import planted_model, synthetic_scene
from sfp.seg.pipeline import Segmenter


@pytest.fixture(scope="module")
def b16():
    return planted_model("ViT-B-16", seed=0)


@pytest.fixture(scope="module")
def images(b16):
    bundle, _ = b16
    photos = [io.prepare(arr, bundle) for arr in list(io.sample_images().values())[:2]]
    scenes = [io.normalize(synthetic_scene(s), bundle)[None] for s in range(2)]
    return torch.cat(photos + scenes)


@pytest.fixture(scope="module")
def sources(b16, images):
    return nr.outlier_sources(b16[0], images)


def _planted_pairs(truth) -> set[tuple[int, int]]:
    return {(layer, n) for layer, ns in truth.neurons.items() for n in ns}


def _max_over_median(norms: torch.Tensor) -> torch.Tensor:
    """(B, N) patch norms -> (B,) max / median."""
    return norms.amax(1) / norms.median(1).values


def test_truth_neurons_are_the_register_neurons(b16):
    _, truth = b16
    assert truth.neurons == {truth.onset_layer: list(truth.register_neurons)}
    assert len(truth.register_neurons) == 2


def test_register_neurons_recover_the_planted_ones(b16, images, sources):
    bundle, truth = b16
    planted = _planted_pairs(truth)
    found = nr.register_neurons(bundle, images, top=len(planted))
    top = {(layer, n) for layer, n, _ in found}
    precision = len(top & planted) / len(top)
    recall = len(top & planted) / len(planted)
    assert precision >= 0.9 and recall >= 0.9
    ranking = sources.register_neurons(top=None)
    first_unplanted = next(i for i, (l, n, _) in enumerate(ranking) if (l, n) not in planted)
    assert first_unplanted == len(planted)  # no unplanted neuron above a planted one
    assert ranking[len(planted) - 1][2] > 100 * ranking[len(planted)][2]


def test_defaults_from_the_norm_statistics(b16, sources):
    _, truth = b16
    assert truth.onset_layer <= sources.outlier_layer <= truth.num_layers
    assert sources.max_layer == truth.onset_layer
    onset = sources.onset
    assert (onset[: truth.onset_layer - 1] == 0).all()
    assert (onset[truth.onset_layer - 1 :] == 1).all()
    assert (sources.norm_ratio[truth.onset_layer - 1 :] > 10).all()
    assert (sources.norm_ratio[: truth.onset_layer - 1] < 2).all()
    assert sources.n_used == sources.n_images == 4


def test_neuron_scores_equal_a_reduction_of_the_recorded_trace(b16, images, sources):
    bundle, truth = b16
    layer = truth.onset_layer
    tr = probe.record(bundle, images, layers=range(1, truth.num_layers + 1),
                      store=("mlp", "hidden"))
    mask = nr.outlier_mask(tr.token_norms(sources.outlier_layer)[:, 1:])
    act = tr.mlp(layer)[:, 1:].abs()
    per_image = torch.stack([act[b][mask[b]].mean(0) for b in range(act.shape[0])])
    expected = per_image.mean(0)
    got = sources.neuron_scores[layer - 1]
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)
    h = tr.hidden(sources.outlier_layer)[:, 1:].abs()
    chan = torch.stack([h[b][mask[b]].mean(0) for b in range(h.shape[0])]).mean(0)
    assert torch.allclose(sources.channel_scores[sources.outlier_layer - 1], chan, rtol=1e-4,
                          atol=1e-3)
    full = tr.hidden(3).abs().flatten(1)
    top3 = full.topk(3, dim=1).values.mean(0)
    assert torch.allclose(sources.top_magnitudes[2], top3, rtol=1e-5)


def test_massive_channels_are_the_planted_channels(b16, images, sources):
    bundle, truth = b16
    found = nr.massive_channels(bundle, images, top=2)
    assert {c for _, c, _ in found} == set(truth.channels)
    assert {c for _, c, _ in sources.massive_channels(top=2)} == set(truth.channels)
    pers = sources.persistence()
    assert (pers[: truth.onset_layer - 1] < 2).all()
    assert (pers[truth.onset_layer - 1 :] > 100).all()


def test_outlier_mask_rules():
    norms = torch.tensor([[1.0, 1.1, 0.9, 1.0, 5.0], [2.0, 2.0, 2.0, 2.0, 3.9]])
    # median 1.0, MAD 0.0: threshold max(1.0, 0) + 1.0 = 2.0; row 2: 2 + 2 = 4
    assert nr.outlier_mask(norms).tolist() == [[False] * 4 + [True], [False] * 5]
    assert nr.outlier_mask(norms, 3.0).tolist() == [[False] * 4 + [True], [False] * 4 + [True]]


@pytest.mark.parametrize("fill", ["zero", "mean"])
def test_ablating_the_found_neurons_removes_the_outliers(b16, images, sources, fill):
    bundle, truth = b16
    layer = truth.num_layers - 1
    before = probe.record(bundle, images, layers=[layer], store=())
    assert (_max_over_median(before.token_norms(layer)[:, 1:]) > 15).all()
    hooks = nr.ablate_neurons(sources.register_neurons(top=2), fill=fill)
    after = probe.record(bundle, images, layers=[layer], store=(), fwd_hooks=hooks)
    assert (_max_over_median(after.token_norms(layer)[:, 1:]) < 2).all()


def test_ablating_only_flagged_tokens(b16, images):
    bundle, truth = b16
    layer = truth.num_layers - 1
    planted = truth.mask(images).flatten(1)
    for tokens in (planted, "active"):
        hooks = nr.ablate_neurons(truth.neurons, tokens=tokens)
        after = probe.record(bundle, images, layers=[layer], store=(), fwd_hooks=hooks)
        assert (_max_over_median(after.token_norms(layer)[:, 1:]) < 2).all()
    # flagging the wrong tokens leaves the outliers where they are
    hooks = nr.ablate_neurons(truth.neurons, tokens=~planted)
    after = probe.record(bundle, images, layers=[layer], store=(), fwd_hooks=hooks)
    assert (_max_over_median(after.token_norms(layer)[:, 1:]) > 15).all()


def test_ablation_hook_by_hand():
    act = torch.tensor([[[9.0, 1.0], [1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])  # (1, T=4, 2)
    (_, hook), = nr.ablate_neurons({2: [1]}, fill="mean")
    out = hook(act, "blocks.2.mlp.hook_post")
    assert out[..., 0].tolist() == act[..., 0].tolist()
    assert out[0, :, 1].tolist() == [4.0, 4.0, 4.0, 4.0]  # mean of patches 2, 4, 6
    (_, hook), = nr.ablate_neurons({2: [1]}, tokens="active")
    # patches 2, 4, 6: mean 4, std 2 -> only 6 is above 6? no: 6 > 6 is false
    assert hook(act, "x")[0, :, 1].tolist() == [1.0, 2.0, 4.0, 6.0]
    act[0, 3, 1] = 20.0  # patches 2, 4, 20: mean 8.67, std 9.87 -> 20 flagged
    assert hook(act, "x")[0, :, 1].tolist() == [1.0, 2.0, 4.0, 0.0]
    assert act[0, 3, 1] == 20.0  # the input is not modified


def test_ttr_hook_by_hand(b16):
    bundle, _ = b16
    hooks = dict(nr.ttr_hooks(bundle, [(3, 0, 1.0), (3, 2, 0.5)], num_registers=2))
    act = torch.tensor([[[0.5, 1.0, -1.0], [2.0, 3.0, -7.0], [-4.0, 5.0, 1.0],
                         [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])  # cls, 2 patches, 2 registers
    out = hooks["blocks.3.mlp.hook_post"](act, "blocks.3.mlp.hook_post")
    assert out[0, :, 1].tolist() == act[0, :, 1].tolist()
    assert out[0, :, 0].tolist() == [0.5, 0.0, 0.0, -4.0, -4.0]  # sign max of (.5, 2, -4, 1, 0)
    assert out[0, :, 2].tolist() == [-1.0, 0.0, 0.0, -7.0, -7.0]
    x = torch.randn(2, 197, 768)
    y = hooks["hook_embed"](x, "hook_embed")
    assert y.shape == (2, 199, 768) and torch.equal(y[:, :197], x)
    zero = bundle.model.visual.ln_pre(torch.zeros(768))
    assert torch.allclose(y[1, 198], zero)
    mean = dict(nr.ttr_hooks(bundle, {3: [2]}, normal="mean"))["blocks.3.mlp.hook_post"]
    assert mean(act[:, :4], "x")[0, :, 2].tolist() == [-1.0, -3.0, -3.0, -7.0]


@pytest.mark.parametrize("normal", ["zero", "mean"])
def test_ttr_moves_the_outliers_onto_the_register(b16, images, normal):
    bundle, truth = b16
    layer = truth.num_layers - 1
    hooks = nr.ttr_hooks(bundle, truth.neurons, normal=normal)
    tr = probe.record(bundle, images, layers=[layer], store=("hidden",), fwd_hooks=hooks)
    norms = tr.hidden(layer).norm(dim=-1)
    assert norms.shape[1] == 1 + 196 + 1
    patches = norms[:, 1:197]
    med = patches.median(1).values
    assert (_max_over_median(patches) < 2).all()
    assert (norms[:, -1] / med > 10).all()


def test_ttr_encoder_and_segmenter(b16, images):
    bundle, truth = b16
    cfg = TTRConfig(neurons=truth.neurons)
    assert cfg.neurons == tuple((truth.onset_layer, n) for n in truth.register_neurons)
    enc = make_encoder(bundle, "ttr", cfg)
    feats = enc(images[:2])
    plain = make_encoder(bundle, "clip")(images[:2])
    assert feats.shape == plain.shape == (2, 196, bundle.embed_dim)
    # away from the planted tokens (and their attention sinks) features barely change,
    # at the planted tokens they do
    planted = truth.mask(images[:2]).flatten(1)
    cos = torch.nn.functional.cosine_similarity(feats, plain, dim=-1)
    assert cos[planted].max() < cos[~planted].median()
    auto = make_encoder(bundle, "ttr", TTRConfig(top=2))  # neurons found on the batch
    assert _planted_pairs(truth) == {(l, n) for l, ns in auto.neurons(images[:2]).items()
                                     for n in ns}
    assert torch.allclose(auto(images[:2]), feats, atol=1e-5)
    img = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    seg = Segmenter(bundle, "cat; dog", method="ttr", config=cfg, templates=("a {}.",),
                    short_side=64, crop=64, stride=32)
    out = seg.predict(img)
    assert out.labels.shape == (64, 96) and torch.isfinite(out.probs).all()


def test_bad_input():
    with pytest.raises(InputError, match="fill"):
        nr.ablate_neurons({1: [0]}, fill="max")
    with pytest.raises(InputError, match="tokens"):
        nr.ablate_neurons({1: [0]}, tokens="some")
    with pytest.raises(InputError, match="layer, neuron"):
        nr.neuron_map([(1,)])
    with pytest.raises(ValueError, match="normal"):
        TTRConfig(normal="max")
    with pytest.raises(ValueError, match="base"):
        TTRConfig(base="naclip")


def test_bad_layers(b16, images):
    bundle, _ = b16
    with pytest.raises(InputError, match="outlier_layer"):
        nr.register_neurons(bundle, images[:1], outlier_layer=13)
    with pytest.raises(sfp.SFPError, match="outside 1..12"):
        nr.ttr_hooks(bundle, {13: [0]})


def test_lazy_export():
    assert sfp.neurons.register_neurons is nr.register_neurons
