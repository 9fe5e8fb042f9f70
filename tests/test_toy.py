"""The toy CLIP shipped with sfp: its tokenizer and scenes, the shipped weights (checksum,
replayed training steps), its benchmark (mIoU well above chance through ``sfp eval``) and the
planted toy model (outliers found by SOM / L2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sfp.models import toy
from sfp.models.loading import load_model
from sfp.seg.datasets import ToyDataset, load_dataset

CHANCE = 1 / len(toy.TEXTURES)


@pytest.fixture(scope="module")
def clean():
    return toy.load_toy()


@pytest.fixture(scope="module")
def planted():
    return toy.toy_planted_model(seed=0)


# -- tokenizer and scenes ------------------------------------------------------------------


def test_tokenizer_ids_by_hand():
    tok = toy.ToyTokenizer()
    ids = {w: i for i, w in enumerate(toy.VOCAB)}
    t = tok(["A photo of Red dots.", "zebra stripes"])
    assert t.shape == (2, toy.CONTEXT_LENGTH) and t.dtype == torch.long
    assert t[0, :7].tolist() == [ids["<start>"], ids["a"], ids["photo"], ids["of"], ids["red"],
                                 ids["dots"], ids["<end>"]]
    assert t[0, 7:].eq(0).all()
    assert t[1, :4].tolist() == [ids["<start>"], ids["<unk>"], ids["stripes"], ids["<end>"]]
    # open_clip pools the text tower at the largest id: it must be the end token
    assert int(t[0].argmax()) == 6 and ids["<end>"] == len(toy.VOCAB) - 1
    long = tok(" ".join(["dots"] * 40))
    assert long[0, -1] == ids["<end>"] and long[0, 0] == ids["<start>"]
    assert tok.unknown("a zebra and a cat") == ["zebra", "cat"]


def test_scenes_are_deterministic_and_captions_name_the_labels():
    a, b = toy.toy_scenes(24, 7), toy.toy_scenes(24, 7)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.captions == b.captions
    assert not torch.equal(a.images, toy.toy_scenes(24, 8).images)
    assert a.images.shape == (24, 3, toy.IMAGE_SIZE, toy.IMAGE_SIZE)
    assert 0 <= float(a.images.min()) and float(a.images.max()) <= 1
    for i in range(24):
        named = {w for w in toy.ToyTokenizer().words(a.captions[i]) if w in toy.TEXTURES}
        scored = {toy.TEXTURES[int(v)] for v in a.labels[i].unique() if int(v) != 255}
        assert named == scored, (a.captions[i], scored)
        kept = [int(t) for t in a.textures[i] if int(t) >= 0]
        assert len(kept) == len(set(kept))  # regions have distinct textures
        assert 2 <= len(kept) <= 3


def test_toy_dataset_reads_like_a_benchmark():
    ds = load_dataset("toy")
    assert isinstance(ds, ToyDataset) and len(ds) == 100 and ds.num_classes == 6
    s = ds[3]
    assert s.image.shape == (128, 128, 3) and s.image.dtype == np.uint8
    assert s.label.shape == (128, 128) and s.label.dtype == np.int64
    assert ds.class_names == list(toy.TEXTURES)
    # scene i does not depend on how many scenes are asked for (--limit takes a prefix)
    assert np.array_equal(ToyDataset("val", n=5)[3].image, s.image)
    assert not np.array_equal(ToyDataset("test")[3].image, s.image)


# -- shipped weights -----------------------------------------------------------------------


def test_shipped_weights_match_their_record():
    path = toy.toy_weights_path()
    rec = toy.toy_manifest()
    assert path.stat().st_size <= 8_000_000
    assert toy.file_sha256(path) == rec["sha256"]
    assert rec["architecture"] == json.loads(json.dumps(toy.TOY_CONFIG))
    assert rec["config"]["steps"] >= 1000


def test_first_training_steps_replay_the_record():
    """The shipped run is a function of its config: its first steps give the same losses."""
    from sfp.models.toy_training import TrainConfig, replay_losses

    rec = toy.toy_manifest()
    cfg = TrainConfig(**rec["config"])
    losses = replay_losses(cfg, 3)
    assert np.allclose(losses, rec["losses_first"][:3], atol=2e-3), (losses, rec["losses_first"])


def test_region_targets_are_the_pixel_shares_of_each_region():
    """Phase 2's per-patch targets, by hand from the scene's label map: a patch's target puts
    on each region caption the share of its scored pixels that region holds (the caption names
    that region's texture); patches less than half scored get no target."""
    from dataclasses import replace

    from sfp.models.toy_training import TrainConfig, batch_for_step

    cfg = replace(TrainConfig(), batch=6)
    batch = batch_for_step(cfg, 0)  # step 0 of seed 0: scenes of generator seed 0
    scenes = toy.toy_scenes(6, torch.Generator().manual_seed(0))
    p = toy.TOY_CONFIG["vision_cfg"]["patch_size"]
    g = toy.IMAGE_SIZE // p
    patches = scenes.labels.reshape(6, g, p, g, p).permute(0, 1, 3, 2, 4).reshape(6, g * g, -1)
    words = [set(toy.ToyTokenizer().words(t)) for t in batch.region_texts]
    skipped = 0
    for i in range(6):
        for n in range(g * g):
            lab, row = patches[i, n], batch.region_target[i, n]
            scored = lab != 255
            if scored.float().mean() < 0.5:
                assert row.sum() == 0
                skipped += 1
                continue
            assert abs(float(row.sum()) - 1) < 1e-5
            for j in row.nonzero().flatten().tolist():
                (texture,) = words[j] & set(toy.TEXTURES)
                share = float((lab == toy.TEXTURES.index(texture)).sum() / scored.sum())
                assert abs(float(row[j]) - share) < 1e-5
    assert skipped < 6 * g * g // 4


def test_load_model_toy_is_offline_and_labelled(clean, monkeypatch):
    import socket

    def no_network(*a, **k):
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "create_connection", no_network)
    b = load_model("toy", device="cpu")
    assert b.provenance == "toy" and b.is_toy and not b.is_synthetic
    assert "not a pretrained CLIP" in b.caveat and "generated textures" in b.caveat
    assert (b.patch_size, b.num_layers, b.width, b.image_size) == (16, 6, 128, (128, 128))
    for k, v in b.model.state_dict().items():
        assert torch.equal(v, clean.model.state_dict()[k]), k


def test_reserved_channels_carry_nothing(clean):
    """Nothing the toy CLIP learned reads or writes the planted circuit's channels: in every
    token they hold one common value (ln_pre's offset of a zero input), and no weight reads
    them."""
    from sfp.core.io import normalize
    from sfp.core.probe import record

    x = normalize(toy.toy_scenes(4, 3).images, clean)
    trace = record(clean, x, store=("hidden",))
    ch = list(toy.RESERVED_CHANNELS)
    for layer in trace.layers:
        h = trace.hidden(layer)[..., ch]
        assert (h - h[..., :1]).abs().max() == 0, layer
    for block in clean.visual.transformer.resblocks:
        assert block.attn.in_proj_weight[:, ch].abs().max() == 0
        assert block.mlp.c_fc.weight[:, ch].abs().max() == 0
    assert clean.visual.proj[ch].abs().max() == 0


# -- the toy benchmark ---------------------------------------------------------------------


def test_toy_benchmark_segmentation_means_something(clean):
    """Dense segmentation of the shipped toy CLIP means something: plain clip reaches the
    0.35 mIoU the toy model is trained for (chance 1/6) and the value-path baselines are well
    above chance too."""
    from sfp.seg.toy import toy_miou

    miou = {m: toy_miou(clean, m, n=100) for m in ("clip", "maskclip", "naclip")}
    assert miou["clip"] >= 0.35, miou
    assert min(miou.values()) > CHANCE + 0.1, miou


def test_sfp_eval_toy_prints_the_method_table_and_resumes(tmp_path, capsys):
    from sfp.cli.app import main
    from sfp.methods.encoders import method_variants

    out = tmp_path / "toy.json"
    argv = ["eval", "--benchmark", "toy", "--limit", "6", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    labels = [r["label"] for r in res["results"]]
    assert labels == [m if p is None else f"{m}/{p}" for m, p in method_variants()]
    assert res["provenance"] == "toy"
    for r in res["results"]:
        assert r["label"] in printed
        if "skipped" in r:  # a preset written for 12-block models
            assert "6-block" in r["skipped"]
            continue
        assert r["num_images"] == 6 and 0 <= r["mIoU"] <= 100
        assert f"{r['mIoU']:7.2f}" in printed
    assert main(argv) == 0  # everything is resumed from <out>.state
    again = json.loads(out.read_text())
    assert [r.get("mIoU") for r in again["results"]] == [r.get("mIoU") for r in res["results"]]


# -- planted toy model ---------------------------------------------------------------------


def test_planted_toy_uses_the_reserved_channels(planted):
    bundle, truth = planted
    assert bundle.provenance == "toy-planted" and bundle.is_synthetic and bundle.is_toy
    assert truth.channels == toy.RESERVED_CHANNELS[-2:]
    assert truth.n_outliers == 4 and truth.onset_layer == 3


def _values(bundle, x, layers):
    """Block ``layer``'s attention values through out_proj's weight: {layer: (B, T, C)}."""
    from sfp.core.forward import run_with_hooks
    from sfp.core.hooks import block_hook

    seen = {}

    def keep(v, name):
        seen[name] = v.permute(0, 2, 1, 3).flatten(2)  # (B, H, T, d) -> (B, T, C)

    run_with_hooks(bundle, x, [(block_hook(layer, "attn.hook_v"), keep) for layer in layers])
    blocks = bundle.visual.transformer.resblocks
    return {layer: seen[block_hook(layer, "attn.hook_v")] @ blocks[layer - 1].attn.out_proj
            .weight.t() for layer in layers}


def test_planted_sink_values_are_the_stated_vector(planted):
    """Step 5 of the circuit by hand: against the same plant without sink values, the last
    block's values change only at the planted tokens, by one common vector (through
    out_proj) of norm ~ sink_value x the reference median patch norm (the massive readout of
    ln_1 is about sqrt(C)); the earlier blocks' values do not change."""
    from dataclasses import replace

    from sfp.core.io import normalize
    from sfp.models.synthetic import plant_outliers

    bundle, truth = planted
    plain, _ = plant_outliers(toy.load_toy().model, name="toy-plain",
                              config=replace(toy.TOY_PLANT, sink_value=0.0),
                              tokenizer=toy.ToyTokenizer())
    x = normalize(toy.toy_scenes(8, 11).images, bundle)
    mask = truth.mask(x).flatten(1)
    assert mask.sum() >= 4
    layers = list(truth.sink_layers)
    a, b = _values(bundle, x, layers), _values(plain, x, layers)
    for layer in layers[:-1]:
        assert torch.allclose(a[layer], b[layer], atol=1e-5), layer
    delta = (a[layers[-1]] - b[layers[-1]])[:, 1:]  # patch tokens (B, N, C)
    assert delta[~mask].abs().max() < 1e-3
    ref = truth.massive_norm / truth.strength
    norms = delta[mask].norm(dim=-1)
    assert ((norms > 0.85 * ref) & (norms < 1.15 * ref)).all(), (norms, ref)
    unit = torch.nn.functional.normalize(delta[mask], dim=-1)
    assert (unit @ unit[0]).min() > 0.999  # one direction for every planted token


def test_planted_sinks_lower_plain_clip_and_the_register_neurons_are_why(clean, planted):
    """The planted outliers lower plain CLIP's mIoU; zeroing the planted register neurons
    (the truth's, with the toolkit's ablation hooks) gives the clean number back; MaskCLIP,
    whose last block does not use the attention pattern, hardly notices them."""
    from sfp.core.neurons import ablate_neurons
    from sfp.seg.toy import toy_miou

    bundle, truth = planted
    n = 40
    base = toy_miou(clean, "clip", n=n)
    assert toy_miou(bundle, "clip", n=n) <= base - 0.15
    ablated = toy_miou(bundle, "clip", n=n, fwd_hooks=ablate_neurons(truth.neurons))
    assert ablated >= base - 0.03, (ablated, base)
    assert abs(toy_miou(bundle, "maskclip", n=n) - toy_miou(clean, "maskclip", n=n)) < 0.03


@pytest.mark.parametrize("detector", ["som", "l2"])
def test_planted_toy_outliers_are_found(planted, detector):
    from sfp.seg.toy import planted_recall

    bundle, truth = planted
    recall, total = planted_recall(bundle, truth, detector, n=50)
    assert total >= 50  # about two planted tokens per scene
    assert recall >= 0.9, recall


def test_sfp_segment_with_the_toy_model_labels_its_files(tmp_path, capsys):
    from PIL import Image

    from sfp.cli.app import main

    scene = ToyDataset("val")[1]
    Image.fromarray(scene.image).save(tmp_path / "scene.png")
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "scene.png"), "--model", "toy", "--benchmark", "toy",
                 "--method", "clip", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "toy CLIP trained on generated textures" in err
    with Image.open(out / "scene_labels.png") as im:
        labels = np.asarray(im).astype(np.int64)
        assert "generated textures" in im.info.get("sfp:caveat", "")
    scored = scene.label != 255
    # pixel accuracy of one scene: above the 1/6 of guessing
    assert (labels[scored] == scene.label[scored]).mean() > 0.3


def test_bad_toy_weights_and_tags_get_one_sentence(tmp_path):
    from sfp.models.loading import ModelLoadError

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage" * 10)
    with pytest.raises(ModelLoadError, match="Could not read the toy CLIP weights"):
        toy.load_toy(path=bad)
    with pytest.raises(ModelLoadError, match="takes no pretrained tag"):
        load_model("toy", "laion2b_s34b_b88k")


def _miou_by_hand(pred: np.ndarray, gt: np.ndarray) -> float:
    scored = gt != 255
    p, g = pred[scored], gt[scored]
    ious = [((p == c) & (g == c)).sum() / ((p == c) | (g == c)).sum()
            for c in np.union1d(np.unique(p), np.unique(g))]
    return float(np.mean(ious))


def test_stage_ablation_of_a_toy_scene_is_scored_against_its_mask(clean):
    import dataclasses

    from sfp.viz.figures import stage_ablation, stage_ablation_data
    from sfp.viz.figures.views import image_view

    scene = ToyDataset("val")[2]
    view = dataclasses.replace(image_view(clean, scene.image, size="model", name="s"),
                               truth=scene.label)
    d = stage_ablation_data(clean, view, "toy", templates=["a photo of {}."])
    assert d.truth is not None and np.array_equal(d.truth, scene.label)  # 128 px: 8 x 16 px
    for k in range(len(d.columns)):
        assert d.miou(k) == pytest.approx(_miou_by_hand(d.labels[k], scene.label))
    assert d.miou(0) > 0.5  # the clean toy CLIP segments this scene
    fig = stage_ablation(d)
    truth_ax = [ax for ax in fig.axes if ax.get_title() == "ground truth"]
    assert len(truth_ax) == 1 and truth_ax[0].images
    assert fig.axes[1].get_title().startswith("CLIP\nmIoU ")
    with pytest.raises(ValueError, match="one class per pixel"):
        dataclasses.replace(view, truth=scene.label[:64])
    with pytest.raises(ValueError, match="pass integer class ids"):
        dataclasses.replace(view, truth=scene.label + 0.5)


def test_sfp_outlier_mitigation_alone_recovers_most_of_what_clip_lost(clean, planted):
    """SFP's first stage (+SOM: the detected outliers replaced, nothing else) on the planted
    toy CLIP gets back at least half of what the planted outliers cost plain CLIP."""
    from sfp.methods.stages import stage_ladder
    from sfp.seg.toy import toy_miou

    som_only = dict((name, cfg) for name, _, cfg in stage_ladder("official"))["+SOM"]
    assert not (som_only.sae or som_only.hai or som_only.pre_aggregate)
    n = 40
    bundle, _ = planted
    lost = toy_miou(clean, "clip", n=n) - toy_miou(bundle, "clip", n=n)
    gained = toy_miou(bundle, "sfp", som_only, n=n) - toy_miou(bundle, "clip", n=n)
    assert lost > 0.15 and gained >= 0.5 * lost, (lost, gained)
