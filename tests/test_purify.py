"""Tests of sfp.methods.purify: the SFP encoder against an independent reference, and each stage.

All models are random-initialised (no weights on the test machines); images are smooth random
fields so that patch similarities have structure.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sfp.core import forward, outliers, probe
from sfp.methods.config import ConfigError, SFPConfig
from sfp.methods.encoders import make_encoder
from sfp.methods.purify import (
    SFPEncoder,
    hai_official,
    hai_paper,
    hai_paper_matrix,
    normalize_rows_cols,
    rownorm_apply,
    sae_official,
    sae_paper,
    similarity_logits,
    similarity_matrix,
)
from sfp.models.loading import bundle_from_model, load_model

# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


def smooth_images(n: int, h: int = 224, w: int = 224, seed: int = 0) -> torch.Tensor:
    """(n, 3, h, w) low-frequency random images plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, 4, 4, generator=g)
    x = nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    return x + 0.1 * torch.randn(n, 3, h, w, generator=g)


@pytest.fixture(scope="module")
def vitb():
    torch.manual_seed(0)
    return load_model("ViT-B-16", pretrained=None, device="cpu")


@pytest.fixture(scope="module")
def vits():
    """ViT-S-32: 12 blocks, width 384, 7 x 7 grid at 224 px (fast)."""
    torch.manual_seed(1)
    return load_model("ViT-S-32", pretrained=None, device="cpu")


@pytest.fixture(scope="module")
def shallow():
    """A 6-block ViT (ViT-S-32 with its last 6 blocks removed)."""
    torch.manual_seed(2)
    model = load_model("ViT-S-32", pretrained=None, device="cpu").model
    model.visual.transformer.resblocks = nn.ModuleList(list(model.visual.transformer.resblocks)[:6])
    return bundle_from_model(model, name="ViT-S-32", pretrained="random")


# --------------------------------------------------------------------------------------------
# independent reference of docs/design.md's "The SFP method" (official preset), one square 224 image
# --------------------------------------------------------------------------------------------

_NEIGHBOURS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def _ref_mitigate(feat: torch.Tensor, g: int, flagged: set[int]) -> torch.Tensor:
    """Each flagged token -> mean of its in-grid, unflagged 8-neighbours (loops); with none,
    the window grows to 5 x 5, 7 x 7, ... until it holds an unflagged token."""
    out = feat.clone()
    for idx in flagged:
        r, c = divmod(idx, g)
        for radius in range(1, g):
            nb = [
                feat[(r + dr) * g + (c + dc)]
                for dr in range(-radius, radius + 1)
                for dc in range(-radius, radius + 1)
                if 0 <= r + dr < g and 0 <= c + dc < g and (r + dr) * g + (c + dc) not in flagged
            ]
            if nb:
                out[idx] = sum(nb) / len(nb)
                break
    return out


def _ref_cosine(feat: torch.Tensor) -> torch.Tensor:
    f = feat / feat.norm(dim=-1, keepdim=True)
    s = f @ f.T
    s[s < 0.4] = 0.0
    return s


def _ref_rownorm(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (s / (s.sum(dim=-1, keepdim=True) + 1e-6)) @ x


def _ref_detect(detector: str, attn: torch.Tensor, hidden: torch.Tensor) -> set[int]:
    """attn: (H, T, T) of block L-1, hidden: (T, C) its output."""
    n = hidden.shape[0] - 1
    if detector == "som":
        heads = attn.shape[0]
        scaled = attn.clone()
        scaled[:, 0, 1:] *= 1.5  # cls -> patch entries, every head, before averaging
        avg = sum(scaled[h] for h in range(heads)) / heads
        r = [float(avg[0, 1 + i]) for i in range(n)]
        s = [float(avg[1 + i, 1 + i]) for i in range(n)]
        cand = [i for i in range(n) if r[i] > s[i]]
        cand.sort(key=lambda i: (-r[i], i))
        return set(cand[:10])
    patches = hidden[1:]
    if detector == "l2":
        norms = [float(p.norm()) for p in patches]
        return set(sorted(range(n), key=lambda i: (-norms[i], i))[:10])
    assert detector == "lof"
    k = 30
    dist = torch.stack([((patches - patches[i]) ** 2).sum(dim=-1) for i in range(n)])
    order = [torch.argsort(dist[i], stable=True) for i in range(n)]
    kdist = torch.stack([dist[i, order[i][k]] for i in range(n)])  # k-th after dropping self
    lof = torch.stack(
        [kdist[i] * torch.stack([1.0 / kdist[o] for o in order[i][1 : k + 1]]).mean()
         for i in range(n)]
    )
    threshold = torch.quantile(lof.float(), 0.95)
    return {i for i in range(n) if lof[i] > threshold}


def reference_blocks(visual: nn.Module, image: torch.Tensor):
    """Step 1 for one 224 image: embed (no interpolation), blocks 1..L-1 through
    nn.MultiheadAttention itself. Returns ({l: h_l (T, C)}, attention of block L-1 (H, T, T))."""
    blocks = visual.transformer.resblocks
    p = visual.conv1(image)
    x = torch.cat([visual.class_embedding[None], p.flatten(2)[0].T]) + visual.positional_embedding
    x = visual.ln_pre(x)[None]
    h: dict[int, torch.Tensor] = {}
    attn = torch.empty(0)
    for layer in range(1, len(blocks)):
        blk = blocks[layer - 1]
        y = blk.ln_1(x)
        o, w = blk.attn(y, y, y, need_weights=True, average_attn_weights=False)
        x = x + o
        x = x + blk.mlp(blk.ln_2(x))
        h[layer] = x[0]
        attn = w[0]
    return h, attn


def reference_official(visual: nn.Module, h: dict[int, torch.Tensor], attn: torch.Tensor,
                       detector: str):
    """docs/design.md's official steps 2-8, literally, for one square image and 12 blocks."""
    blocks = visual.transformer.resblocks
    L = len(blocks)
    assert L == 12
    g = int(round((h[1].shape[0] - 1) ** 0.5))
    # 2-3. detect on block 11, mitigate
    flagged = _ref_detect(detector, attn, h[11])
    X = _ref_mitigate(h[11][1:], g, flagged)
    # 4. reference similarity from h_9, mitigated at the same positions
    s_pre = _ref_cosine(_ref_mitigate(h[9][1:], g, flagged))
    X = _ref_rownorm(s_pre, X)
    # 5. SAE with block 12's projections, per head
    blk = blocks[L - 1]
    heads = blk.attn.num_heads
    c = X.shape[-1]
    d = c // heads
    wq, wk, wv = blk.attn.in_proj_weight.split(c)
    bq, bk, bv = blk.attn.in_proj_bias.split(c)
    m = (s_pre - s_pre.mean()) * 3.0
    m[m < 0] = float("-inf")

    def heads_of(y: torch.Tensor):
        q, k, v = y @ wq.T + bq, y @ wk.T + bk, y @ wv.T + bv
        return [(q[:, i * d:(i + 1) * d], k[:, i * d:(i + 1) * d], v[:, i * d:(i + 1) * d])
                for i in range(heads)]

    outs = []
    for qh, kh, vh in heads_of(blk.ln_1(X)):
        a = (torch.softmax(kh @ kh.T * d**-0.5, -1) + torch.softmax(qh @ qh.T * d**-0.5, -1)
             + torch.softmax(m, -1)) / 3
        outs.append(a @ vh)
    X = blk.attn.out_proj(torch.cat(outs, dim=-1)) + 0.3 * h[11][0]
    # 6. post similarity from h_4 (not mitigated)
    s_post = _ref_cosine(h[4][1:])
    X = _ref_rownorm(s_post, X)
    # 7. HAI from h_4 + ... + h_10
    P = sum(h[layer] for layer in range(4, 11))
    zs = [torch.softmax(m, -1) @ vh for _, _, vh in heads_of(blk.ln_1(P[1:]))]
    Z = blk.attn.out_proj(torch.cat(zs, dim=-1)) + 0.3 * P[0]
    Z = _ref_rownorm(s_post, Z)
    # 8.
    X = X + Z
    return visual.ln_post(X) @ visual.proj, flagged, s_pre


@pytest.fixture(scope="module")
def reference_run(vitb):
    image = smooth_images(1, seed=3)
    with torch.no_grad():
        h, attn = reference_blocks(vitb.visual, image)
    return image, h, attn


@pytest.mark.parametrize("detector", ["som", "l2", "lof"])
def test_official_matches_independent_reference(vitb, reference_run, detector: str) -> None:
    image, h, attn = reference_run
    with torch.no_grad():
        expected, flagged, s_pre = reference_official(vitb.visual, h, attn, detector)
    enc = SFPEncoder(vitb, SFPConfig.official(detector=detector))
    st = enc.stages(image)
    assert set(st.indices[0].tolist()) == flagged
    assert len(flagged) == 10
    # the similarity matrix has structure (not just its diagonal)
    assert int((s_pre > 0).sum()) > 5 * s_pre.shape[0]
    assert st.features.shape == (1, 196, 512)
    assert torch.allclose(st.s_pre[0], s_pre, atol=1e-5)
    err = (st.features[0] - expected).abs().max().item()
    assert err < 1e-4, err
    assert torch.equal(enc.encode_patches(image), st.features)


# --------------------------------------------------------------------------------------------
# shapes, batches, grids, depths
# --------------------------------------------------------------------------------------------


def test_shapes_and_layers_on_small_vit(vits) -> None:
    enc = SFPEncoder(vits)
    images = smooth_images(2, seed=4)
    st = enc.stages(images)
    assert st.grid == (7, 7)
    assert st.features.shape == (2, 49, vits.embed_dim)
    assert st.features.dtype == torch.float32
    assert st.config.som_layers == (11,) and st.config.hai_layers == tuple(range(4, 11))
    assert set(st.masks) == {11} and st.mask.shape == (2, 49) and st.mask.dtype == torch.bool
    assert st.mask.sum(dim=1).tolist() == [10, 10]
    for t in (st.x_raw, st.x_som, st.x_pre, st.x_sae, st.x_post, st.z, st.x_final):
        assert t is not None and t.shape == (2, 49, vits.width)
    assert st.s_pre.shape == st.s_post.shape == (2, 49, 49)
    assert st.to_grid(st.features).shape == (2, 7, 7, vits.embed_dim)


@pytest.mark.parametrize(
    "cfg",
    [SFPConfig.official(), SFPConfig.official(detector="lof", lof_neighbors=10),
     SFPConfig.paper()],
    ids=["official", "lof", "paper"],
)
def test_batch_equals_images_one_by_one(vits, cfg: SFPConfig) -> None:
    enc = SFPEncoder(vits, cfg)
    images = smooth_images(2, seed=5)
    batch = enc.stages(images)
    for i in range(2):
        single = enc.stages(images[i : i + 1])
        assert torch.equal(single.mask[0], batch.mask[i])
        for layer in batch.masks:
            assert torch.equal(single.masks[layer][0], batch.masks[layer][i])
        assert torch.allclose(single.features[0], batch.features[i], atol=1e-4, rtol=1e-4)
    # different images, different outlier sets
    assert not torch.equal(batch.mask[0], batch.mask[1])


def test_non_square_grid_keeps_rows_and_columns_apart(vitb) -> None:
    images = smooth_images(1, h=224, w=320, seed=6)
    st = SFPEncoder(vitb).stages(images)
    gh, gw = 14, 20
    assert st.grid == (gh, gw)
    assert st.features.shape == (1, gh * gw, 512)
    assert torch.isfinite(st.features).all()
    flagged = set(st.indices[0].tolist())
    assert len(flagged) == 10
    raw, som = st.x_raw[0], st.x_som[0]
    for idx in range(gh * gw):
        r, c = divmod(idx, gw)
        if idx not in flagged:
            assert torch.equal(som[idx], raw[idx])
            continue
        nb = [(r + dr) * gw + c + dc for dr, dc in _NEIGHBOURS
              if 0 <= r + dr < gh and 0 <= c + dc < gw and (r + dr) * gw + c + dc not in flagged]
        assert torch.allclose(som[idx], raw[nb].mean(dim=0), atol=1e-5)


def test_depth_derived_layers_for_a_6_block_model(shallow) -> None:
    assert shallow.num_layers == 6
    r = SFPEncoder(shallow).resolved  # the release's 9 / 4 / 4..10, clamped to L - 1 = 5
    assert (r.detect_layer, r.ref_layer, r.post_layer, r.hai_layers) == (5, 5, 4, (4, 5))
    enc = SFPEncoder(shallow, SFPConfig.official(layer_rule="scaled"))
    r = enc.resolved
    assert (r.detect_layer, r.ref_layer, r.post_layer) == (5, 5, 2)
    assert r.hai_layers == (2, 3, 4, 5)
    st = enc.stages(smooth_images(1, seed=7), trace=True)
    assert set(st.masks) == {5}
    assert torch.isfinite(st.features).all()
    assert st.trace.layers == (1, 2, 3, 4, 5)
    assert SFPEncoder(shallow, SFPConfig.paper()).resolved.som_layers == (1, 2, 3, 4, 5)
    assert SFPEncoder(shallow, SFPConfig.official(ref_layer=3)).resolved.ref_layer == 3
    with pytest.raises(ConfigError, match="ref_layer=9 is out of range for a 6-block model"):
        SFPEncoder(shallow, SFPConfig.official(ref_layer=9))


# --------------------------------------------------------------------------------------------
# switches: each removes exactly its stage
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_images() -> torch.Tensor:
    return smooth_images(2, seed=8)


@pytest.fixture(scope="module")
def official_stages(vits, small_images):
    return SFPEncoder(vits).stages(small_images, trace=True)


def test_official_stages_compose(vits, small_images, official_stages) -> None:
    st = official_stages
    blk = vits.visual.transformer.resblocks[-1]
    tr = st.trace
    assert tr.layers == tuple(range(1, 12))
    assert torch.equal(st.x_raw, tr.hidden(11)[:, 1:])
    assert torch.equal(st.cls, tr.hidden(11)[:, 0])
    assert torch.allclose(st.s_pre, similarity_matrix(
        outliers.mitigate(tr.hidden(9)[:, 1:], st.grid, st.mask), 0.4))
    assert torch.equal(st.x_pre, rownorm_apply(st.s_pre, st.x_som))
    assert torch.allclose(st.x_sae, sae_official(blk, st.x_pre, st.s_pre, st.cls), atol=1e-6)
    assert torch.allclose(st.s_post, similarity_matrix(tr.hidden(4)[:, 1:], 0.4))
    assert torch.allclose(st.x_post, rownorm_apply(st.s_post, st.x_sae), atol=1e-6)
    p = sum(tr.hidden(layer) for layer in range(4, 11))
    assert torch.allclose(st.z, hai_official(blk, p, st.s_pre, st.s_post), atol=1e-5)
    assert torch.allclose(st.features, forward.project_patches(vits.visual, st.x_post + st.z))
    assert torch.equal(SFPEncoder(vits).encode_patches(small_images), st.features)


def test_trace_equals_the_probe(vits, small_images, official_stages) -> None:
    rec = probe.record(vits, small_images, layers=[2, 9, 11])
    tr = official_stages.trace
    for layer in (2, 9, 11):
        assert torch.allclose(tr.hidden(layer), rec.hidden(layer), atol=1e-5)
        assert torch.allclose(tr.attention(layer), rec.attention(layer), atol=1e-6)
    assert torch.equal(
        official_stages.masks[11], outliers.som(tr.attention(11), top_k=10, cls_scale=1.5).mask
    )


def test_som_off_removes_only_mitigation(vits, small_images, official_stages) -> None:
    st = SFPEncoder(vits, SFPConfig.official(som=False)).stages(small_images)
    rec = probe.record(vits, small_images, layers=[9, 11], store=("hidden",))
    assert not st.mask.any() and st.masks == {} and st.reports == {}
    assert st.reference_report is None and st.indices[0].numel() == 0
    assert torch.allclose(st.x_som, rec.hidden(11)[:, 1:], atol=1e-5)
    assert torch.equal(st.x_som, st.x_raw)
    assert torch.allclose(st.s_pre, similarity_matrix(rec.hidden(9)[:, 1:], 0.4), atol=1e-6)
    # post similarity does not depend on SOM
    assert torch.equal(st.s_post, official_stages.s_post)
    assert not torch.allclose(st.features, official_stages.features)


def test_sae_off_runs_block_L_as_a_standard_block(vits, small_images, official_stages) -> None:
    st = SFPEncoder(vits, SFPConfig.official(sae=False)).stages(small_images)
    ref = official_stages
    assert torch.equal(st.mask, ref.mask)
    assert torch.equal(st.x_pre, ref.x_pre)
    blk = vits.visual.transformer.resblocks[-1]
    tokens = torch.cat([ref.cls[:, None], ref.x_pre], dim=1)
    with torch.no_grad():
        y = blk.ln_1(tokens)
        a, _ = blk.attn(y, y, y, need_weights=False)
        expected = tokens + a
        expected = (expected + blk.mlp(blk.ln_2(expected)))[:, 1:]
    assert torch.allclose(st.x_sae, expected, atol=1e-5)
    assert torch.allclose(st.z, ref.z)  # HAI is untouched
    assert torch.allclose(st.features, forward.project_patches(vits.visual, st.x_post + st.z))


def test_hai_off_drops_z(vits, small_images, official_stages) -> None:
    st = SFPEncoder(vits, SFPConfig.official(hai=False)).stages(small_images)
    assert st.z is None and st.hai_matrix is None
    assert torch.equal(st.x_post, official_stages.x_post)
    assert torch.equal(st.x_final, st.x_post)
    assert torch.equal(st.features, forward.project_patches(vits.visual, official_stages.x_post))


def test_aggregation_switches(vits, small_images, official_stages) -> None:
    st = SFPEncoder(vits, SFPConfig.official(pre_aggregate=False)).stages(small_images)
    assert torch.equal(st.x_pre, st.x_som)
    assert torch.equal(st.s_pre, official_stages.s_pre)  # still needed for M
    st = SFPEncoder(vits, SFPConfig.official(post_aggregate=False)).stages(small_images)
    assert st.s_post is None
    assert torch.equal(st.x_post, st.x_sae)
    assert torch.equal(st.x_sae, official_stages.x_sae)
    tr = official_stages.trace
    p = sum(tr.hidden(layer) for layer in range(4, 11))
    blk = vits.visual.transformer.resblocks[-1]
    assert torch.allclose(st.z, hai_official(blk, p, st.s_pre, None), atol=1e-5)


def test_hai_attention_option(vits, small_images, official_stages) -> None:
    st = SFPEncoder(vits, SFPConfig.official(hai_attention="sae")).stages(small_images)
    assert torch.equal(st.x_post, official_stages.x_post)
    blk = vits.visual.transformer.resblocks[-1]
    p = sum(official_stages.trace.hidden(layer) for layer in range(4, 11))
    expected = sae_official(blk, p[:, 1:], st.s_pre, p[:, 0])
    assert torch.allclose(st.z, rownorm_apply(st.s_post, expected), atol=1e-5)


# --------------------------------------------------------------------------------------------
# mitigation never gives NaN
# --------------------------------------------------------------------------------------------


def _flag_block(hidden: torch.Tensor) -> outliers.OutlierResult:
    """Flags the 3 x 3 block at rows 2..4, cols 2..4 of a 7 x 7 grid."""
    b, t, _ = hidden.shape
    mask = torch.zeros(b, 7, 7, dtype=torch.bool)
    mask[:, 2:5, 2:5] = True
    mask = mask.reshape(b, t - 1)
    return outliers.OutlierResult(scores=mask.float(), mask=mask)


def _flag_all_but_one(hidden: torch.Tensor) -> outliers.OutlierResult:
    b, t, _ = hidden.shape
    mask = torch.ones(b, t - 1, dtype=torch.bool)
    mask[:, -1] = False
    return outliers.OutlierResult(scores=mask.float(), mask=mask)


def test_no_nan_when_an_outlier_has_no_unflagged_neighbour(vits, small_images) -> None:
    outliers.register_detector("test-purify-block", _flag_block, needs="hidden", overwrite=True)
    st = SFPEncoder(vits, SFPConfig.official(detector="test-purify-block")).stages(small_images)
    assert torch.isfinite(st.features).all()
    centre = 3 * 7 + 3
    assert st.reports[11].widened.tolist() == [1, 1]
    assert st.reports[11].radius[:, centre].tolist() == [2, 2]
    assert st.reference_report.widened.tolist() == [1, 1]
    assert st.widened.tolist() == [2, 2]
    # the centre is the mean of the 16 unflagged tokens of its 5 x 5 window
    window = [r * 7 + c for r in range(1, 6) for c in range(1, 6)
              if not (2 <= r <= 4 and 2 <= c <= 4)]
    assert torch.allclose(st.x_som[:, centre], st.x_raw[:, window].mean(dim=1), atol=1e-5)

    outliers.register_detector("test-purify-most", _flag_all_but_one, needs="hidden",
                               overwrite=True)
    st = SFPEncoder(vits, SFPConfig.official(detector="test-purify-most")).stages(small_images)
    assert torch.isfinite(st.features).all()
    assert (st.reports[11].widened > 0).all()
    assert torch.allclose(st.x_som[:, 0], st.x_raw[:, -1])


# --------------------------------------------------------------------------------------------
# paper preset
# --------------------------------------------------------------------------------------------


def test_paper_som_purifies_every_layer_and_propagates(vits, small_images) -> None:
    st = SFPEncoder(vits, SFPConfig.paper()).stages(small_images, trace=True)
    tr = st.trace
    blocks = vits.visual.transformer.resblocks
    assert set(st.masks) == set(range(1, 12))
    assert st.s_pre is None and st.s_post is None and st.z is None
    for layer in range(1, 12):
        expected = outliers.som(tr.attention(layer), top_k=None, cls_scale=1.0).mask
        assert torch.equal(st.masks[layer], expected)
    assert any(st.masks[layer].any() for layer in range(1, 12))
    for layer in (1, 6, 10):
        h = tr.hidden(layer)
        purified = torch.cat(
            [h[:, :1], outliers.mitigate(h[:, 1:], st.grid, st.masks[layer])], dim=1
        )
        with torch.no_grad():
            nxt = forward.block_forward(blocks[layer], purified)
        assert torch.allclose(tr.hidden(layer + 1), nxt, atol=1e-5)
    assert torch.equal(st.x_raw, tr.hidden(11)[:, 1:])
    # SAE eq. 6-7 on the purified h_11, then F_vis = A_HAI F_SAE
    assert torch.allclose(st.x_sae, sae_paper(blocks[-1], st.x_som), atol=1e-5)
    a = hai_paper_matrix([tr.attention(layer) for layer in range(1, 12)],
                         [st.masks[layer] for layer in range(1, 12)])
    assert torch.allclose(st.hai_matrix, a, atol=1e-6)
    assert torch.allclose(st.x_final, a @ st.x_sae, atol=1e-5)
    assert torch.allclose(st.features, forward.project_patches(vits.visual, st.x_final))
    off = SFPEncoder(vits, SFPConfig.paper(hai=False)).stages(small_images)
    assert torch.equal(off.x_final, off.x_sae) and off.hai_matrix is None


@pytest.mark.parametrize("form", ["block", "eq7"])
@pytest.mark.parametrize("value", ["proj", "identity"])
def test_sae_paper_per_head_loop(vits, form: str, value: str) -> None:
    blk = vits.visual.transformer.resblocks[-1]
    torch.manual_seed(9)
    x = torch.randn(2, 49, vits.width)
    omega = 0.5
    heads = blk.attn.num_heads
    c = vits.width
    d = c // heads
    with torch.no_grad():
        got = sae_paper(blk, x, omega=omega, value=value, form=form)
        wq, wk, wv = blk.attn.in_proj_weight.split(c)
        bq, bk, bv = blk.attn.in_proj_bias.split(c)
        expected = []
        for b in range(2):
            y = blk.ln_1(x[b])
            q, k, v = y @ wq.T + bq, y @ wk.T + bk, y @ wv.T + bv
            outs, attns = [], []
            for i in range(heads):
                sl = slice(i * d, (i + 1) * d)
                att = torch.softmax(omega * (q[:, sl] @ q[:, sl].T + k[:, sl] @ k[:, sl].T)
                                    / d**0.5, dim=-1)
                attns.append(att)
                outs.append(att @ v[:, sl])
            if value == "proj":
                a = blk.attn.out_proj(torch.cat(outs, dim=-1))
            else:
                a = (sum(attns) / heads) @ x[b]
            if form == "block":
                h1 = x[b] + a
                expected.append(h1 + blk.mlp(blk.ln_2(h1)))
            else:
                expected.append(x[b] + blk.mlp(blk.ln_2(a)))
    assert torch.allclose(got, torch.stack(expected), atol=1e-5)


def test_sae_paper_with_class_token(vits) -> None:
    blk = vits.visual.transformer.resblocks[-1]
    torch.manual_seed(10)
    x, cls = torch.randn(1, 49, vits.width), torch.randn(1, vits.width)
    with torch.no_grad():
        with_cls = sae_paper(blk, x, cls)
        tokens = torch.cat([cls[:, None], x], dim=1)
        assert torch.allclose(with_cls, sae_paper(blk, tokens)[:, 1:], atol=1e-6)
    assert with_cls.shape == x.shape


def test_hai_paper_matrix_by_hand() -> None:
    torch.manual_seed(11)
    attn = torch.softmax(torch.randn(2, 3, 3, 6, 6), dim=-1)  # 2 layers, B=3, H=3, T=6 (N=5)
    masks = [torch.zeros(3, 5, dtype=torch.bool), torch.zeros(3, 5, dtype=torch.bool)]
    masks[0][0, 1] = True
    masks[1][0, 1] = True
    masks[1][2, 4] = True
    summed = torch.zeros(3, 5, 5)
    for layer in range(2):
        a = attn[layer].mean(dim=1)[:, 1:, 1:].clone()
        for b in range(3):
            for j in range(5):
                if masks[layer][b, j]:
                    a[b, :, j] = 0.0
        summed += a
    rows = summed / (summed.sum(-1, keepdim=True) + 1e-6)
    expected = rows / (rows.sum(-2, keepdim=True) + 1e-6)
    got = hai_paper_matrix(list(attn), masks)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.all(got[0, :, 1] == 0)  # outlier column of both layers stays zero
    assert torch.allclose(got[1].sum(dim=0), torch.ones(5), atol=1e-4)  # columns normalised
    twice = hai_paper_matrix(list(attn), masks, iterations=2)
    assert torch.allclose(twice, normalize_rows_cols(got), atol=1e-6)
    feats = torch.randn(3, 5, 4)
    f_vis, a = hai_paper(list(attn), feats, masks)
    assert torch.allclose(f_vis, a @ feats) and torch.equal(a, got)


# --------------------------------------------------------------------------------------------
# pure helpers
# --------------------------------------------------------------------------------------------


def test_similarity_helpers() -> None:
    t = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]])
    s = similarity_matrix(t, 0.4)
    c = 2**-0.5
    expected = torch.tensor([[1, c, 0, 0], [c, 1, c, 0], [0, c, 1, 0], [0, 0, 0, 0]])
    assert torch.allclose(s[0], expected, atol=1e-6)  # zero token: zero row, no NaN
    x = torch.arange(8.0).reshape(1, 4, 2)
    out = rownorm_apply(s, x)
    assert torch.allclose(out[0, 0], (x[0, 0] + c * x[0, 1]) / (1 + c + 1e-6))
    assert torch.equal(out[0, 3], torch.zeros(2))
    m = similarity_logits(s, 3.0)
    mean = s.mean()
    assert torch.isclose(m[0, 0, 0], 3 * (1 - mean))
    assert m[0, 0, 2] == float("-inf")
    assert m[0, 3, 3] == 0.0  # diagonal guard: the zero token's row is not all -inf
    assert torch.isfinite(torch.softmax(m, dim=-1)).all()


def test_bf16_runs_and_keeps_dtype() -> None:
    torch.manual_seed(1)
    bundle = load_model("ViT-S-32", pretrained=None, device="cpu", precision="bf16")
    images = smooth_images(1, seed=12)
    for cfg in (SFPConfig.official(), SFPConfig.paper()):
        st = SFPEncoder(bundle, cfg).stages(images)
        assert st.features.dtype == torch.bfloat16
        assert torch.isfinite(st.features.float()).all()
        if st.s_pre is not None:
            assert st.s_pre.dtype == torch.bfloat16  # computed in the model's dtype (forward.work)


def test_make_encoder_builds_sfp(vits, small_images, official_stages) -> None:
    enc = make_encoder(vits, "sfp")
    assert isinstance(enc, SFPEncoder) and enc.config == SFPConfig.official()
    assert torch.equal(enc(small_images), official_stages.features)
    assert make_encoder(vits, "sfp", "paper").config == SFPConfig.paper()
    assert "SFPConfig.official()" in repr(enc)
    with pytest.raises(TypeError):
        SFPEncoder(vits, {"top_k": 3})  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# planted outliers (sfp.models.synthetic): detections against ground truth
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted():
    """Synthetic ViT-S-16 (10 cells, onset layer 6) and 2 normalised scenes; in the second,
    every patch of 3 cells has a step edge, so fewer than 10 of its tokens are planted."""
    import open_clip

    from sfp.models.synthetic import planted_model, synthetic_scene

    bundle, truth = planted_model("ViT-S-16", seed=0)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)
    images = torch.stack([(synthetic_scene(s) - mean) / std for s in (1, 4)])
    p = bundle.patch_size
    for r, c in torch.nonzero(truth.cells < 3).tolist():
        images[1, :, r * p : (r + 1) * p, c * p : c * p + p // 2] += 3.0
    mask = truth.mask(images).flatten(1)
    counts = mask.sum(dim=1).tolist()
    assert counts[0] == 10 and 0 < counts[1] < 10, counts
    return bundle, truth, images, mask


def _norm_ratio(x: torch.Tensor) -> torch.Tensor:
    """max / median of the token norms per image: (B, N, C) -> (B,)."""
    n = x.norm(dim=-1)
    return n.amax(dim=-1) / n.median(dim=-1).values


@pytest.mark.parametrize("detector", ["som", "l2", "lof"])
def test_planted_outliers_are_found_and_suppressed(planted, detector: str) -> None:
    bundle, truth, images, mask = planted
    st = SFPEncoder(bundle, SFPConfig.official(detector=detector)).stages(images)
    # exactly the planted tokens where there are top_k = 10 of them
    assert torch.equal(st.mask[0], mask[0])
    # with fewer, every planted token is found; SOM flags nothing else, while l2 and LOF
    # always flag 10 (top 10 norms; LOF above its 95% quantile)
    assert not (mask[1] & ~st.mask[1]).any()
    if detector == "som":
        assert torch.equal(st.mask[1], mask[1])
    else:
        assert int(st.mask[1].sum()) == 10
    assert (_norm_ratio(st.x_raw) > 10).all()  # the planted tokens dominate h_{L-1} ...
    assert (_norm_ratio(st.x_som) < 2).all()  # ... and no longer after mitigation
    assert torch.isfinite(st.features).all()


def test_planted_top_k_below_the_planted_count(planted) -> None:
    bundle, truth, images, mask = planted
    st = SFPEncoder(bundle, SFPConfig.official(top_k=3)).stages(images)
    assert st.mask.sum(dim=1).tolist() == [3, 3]
    assert not (st.mask & ~mask).any()  # only planted tokens are detected
    assert (_norm_ratio(st.x_som) > 10).all()  # the undetected ones still dominate


def test_planted_paper_som_stops_propagation(planted) -> None:
    bundle, truth, images, mask = planted
    first_sink = truth.onset_layer + 1
    st = SFPEncoder(bundle, SFPConfig.paper(som_start=first_sink)).stages(images)
    assert torch.equal(st.masks[first_sink], mask)  # eq. 4 finds exactly the planted tokens
    assert (_norm_ratio(st.x_raw) < 2).all()  # purified at their first sink layer, gone later
