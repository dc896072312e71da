"""CLIM: grid boxes tile the unit square, RoIAlign against a numpy reference, mosaics put each image in its cell, the
dense map's last block skips attention, s = 1 regions equal whole-image dense pooling, the loss against numpy, and
one sharded step (mesh 2x4x1) equal to one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, objective_loss_and_grads

from vlp import config as vlp_config
from vlp.models.regions import grid_boxes, make_mosaics, region_embeddings, roi_align
from vlp.objectives.clim import mosaic_layout
from vlp.train.trainer import build_experiment

CAPTIONS = ["red circle left", "blue square", "green triangle right", "a star", "yellow star", "red",
            "circle top img", "blue", "green circle", "red square low", "triangle blue", "yellow", "green star up",
            "purple img", "square", "blue triangle"]


def clim_config(**updates):
    config = vlp_config.load_config_file(str(REPO / "configs" / "clim.py") + ":tiny")
    config.model.image.update(width=32, depth=2, mlp_dim=64, num_heads=2)
    config.model.text.update(width=32, depth=1, mlp_dim=64, num_heads=2)
    config.model.embed_dim = 32
    config.batch_size = 16
    config.clim.grid_sizes = (2, 3)  # a 2x2 and a 3x3 mosaic, then 3 single images
    config.optim.freeze = ("image/(patch_embed|cls_token|pos_embed|ln_pre).*", "image/encoder/block_0/.*",
                           "text/.*", "text_proj/.*")
    config.mesh.num_devices = 1
    vlp_config.apply_overrides(config, {k: str(v) for k, v in updates.items()})
    return config


@pytest.mark.parametrize("s", [1, 2, 3, 4])
def test_grid_boxes_tile_the_unit_square(s):
    boxes = grid_boxes(s).astype(np.float64)
    assert boxes.min() == 0.0 and boxes.max() == 1.0 and np.all(boxes[:, 2:] > boxes[:, :2])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert abs(areas.sum() - 1.0) < 1e-12  # inside [0,1]^2, no overlap (below) and total area 1: a tiling
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            w = min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0])
            h = min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1])
            assert w <= 0 or h <= 0, (i, j)


def np_roi_align(features, boxes, out_size, ratio, aligned):
    """torchvision's CPU roi_align kernel, one sample at a time."""
    height, width, channels = features.shape
    ph, pw = out_size
    out = np.zeros((len(boxes), ph, pw, channels))

    def bilinear(y, x):
        if y < -1.0 or y > height or x < -1.0 or x > width:
            return np.zeros(channels)
        y, x = max(y, 0.0), max(x, 0.0)
        y0, x0 = int(y), int(x)
        if y0 >= height - 1:
            y0 = y1 = height - 1
            y = float(y0)
        else:
            y1 = y0 + 1
        if x0 >= width - 1:
            x0 = x1 = width - 1
            x = float(x0)
        else:
            x1 = x0 + 1
        ly, lx = y - y0, x - x0
        return ((1 - ly) * (1 - lx) * features[y0, x0] + (1 - ly) * lx * features[y0, x1]
                + ly * (1 - lx) * features[y1, x0] + ly * lx * features[y1, x1])

    off = 0.5 if aligned else 0.0
    for k, (x1, y1, x2, y2) in enumerate(boxes.astype(np.float64)):
        sx, sy = x1 - off, y1 - off
        rw, rh = x2 - x1, y2 - y1
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bw, bh = rw / pw, rh / ph
        for i in range(ph):
            for j in range(pw):
                acc = np.zeros(channels)
                for iy in range(ratio):
                    for ix in range(ratio):
                        acc += bilinear(sy + i * bh + (iy + 0.5) * bh / ratio, sx + j * bw + (ix + 0.5) * bw / ratio)
                out[k, i, j] = acc / ratio**2
    return out


@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_matches_numpy_reference(aligned):
    rng = np.random.RandomState(0)
    features = rng.randn(5, 7, 3).astype(np.float32)
    boxes = np.array([[0, 0, 7, 5], [1.3, 0.2, 4.9, 3.7], [5.5, 3.5, 7.6, 5.8], [-1.5, -0.7, 2.2, 1.1],
                      [2.0, 2.0, 2.4, 2.2], [6.9, 4.9, 9.0, 7.0]], np.float32)  # whole, inside, border, outside, tiny
    for out_size, ratio in [((1, 1), 2), ((2, 3), 3)]:
        got = jax.jit(roi_align, static_argnums=(2, 3, 4))(features, boxes, out_size, ratio, aligned)
        np.testing.assert_allclose(got, np_roi_align(features, boxes, out_size, ratio, aligned), rtol=1e-5,
                                   atol=1e-6)


def test_mosaics_put_each_image_in_its_cell_and_layout_cycles():
    images = np.random.RandomState(0).rand(8, 4, 6, 3).astype(np.float32)
    mosaics = np.asarray(make_mosaics(jnp.asarray(images), 2, (8, 12)))  # no resize: exact placement
    for g in range(2):
        for r in range(2):
            for c in range(2):
                np.testing.assert_array_equal(mosaics[g, 4 * r:4 * r + 4, 6 * c:6 * c + 6], images[4 * g + 2 * r + c])
    assert mosaic_layout(16, (2, 3)) == ([(2, 0), (3, 4)], 13)
    assert mosaic_layout(128, (2, 3, 4)) == ([(s, i) for i, s in zip((0, 4, 13, 29, 33, 42, 58, 62, 71, 87, 91, 100,
                                                                      116), (2, 3, 4) * 4 + (2,))], 120)


@pytest.fixture(scope="module")
def setup():
    exp = build_experiment(clim_config())
    with exp.context():
        params = jax.device_get(exp.init_state().params)
    rng = np.random.RandomState(0)
    batch = {"image": rng.randn(16, 32, 32, 3).astype(np.float32),
             "text": exp.objective.tokenizer.encode(CAPTIONS, 12), "label": np.zeros((16,), np.int32)}
    return exp, params, batch


def test_dense_map_last_block_skips_attention(setup):
    exp, params, batch = setup
    obj = exp.objective
    images = batch["image"][:2]
    changed = images.copy()
    changed[:, :8, :8] += 1.0  # patch (0, 0) only
    # A 1-block tower whose only block is the last one: with attention skipped, a change of patch (0, 0) reaches
    # no other token's dense embedding; the ordinary forward (attention on) spreads it to every token.
    one_block = build_experiment(clim_config(**{"model.image.depth": 1, "optim.freeze": "()"})).objective
    p1 = {**params, "image": {**params["image"], "encoder": {"block_0": params["image"]["encoder"]["block_1"]}}}
    x = jnp.asarray(np.concatenate([images, changed]))
    dense, plain, full = jax.jit(lambda p, q, x: (one_block.encode_dense(q, x), one_block.encode_patches(q, x),
                                                  obj.encode_dense(p, x[:2])))(params, p1, x)
    dense, plain = np.asarray(dense), np.asarray(plain)
    diff = np.abs(dense[:2] - dense[2:]).max(axis=(0, 3))  # [gh, gw]
    assert diff[0, 0] > 1e-3 and diff.reshape(-1)[1:].max() == 0.0, diff
    assert np.abs(plain[:2] - plain[2:]).max(axis=(0, 2))[1:].min() > 1e-6  # attention spreads the change
    # s = 1: the single cell's region embedding is the normalised mean of the whole image's dense embeddings.
    pooled = np.asarray(full).mean(axis=(1, 2))
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    np.testing.assert_allclose(region_embeddings(full, 1), pooled, rtol=1e-5, atol=1e-6)


def np_infonce(img, txt, scale):
    logits = scale * img.astype(np.float64) @ txt.T.astype(np.float64)
    lse_r = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    lse_c = np.log(np.exp(logits - logits.max(0, keepdims=True)).sum(0)) + logits.max(0)
    return 0.5 * (np.mean(lse_r - np.diag(logits)) + np.mean(lse_c - np.diag(logits)))


def _loss_and_grads(mesh_shape, num_devices, batch, params):
    exp = build_experiment(clim_config(**{"mesh.shape": str(mesh_shape), "mesh.num_devices": num_devices}))
    loss, _, grads, _ = objective_loss_and_grads(exp, batch, params)
    return loss, grads


@pytest.fixture(scope="module")
def single_step(setup):
    _, params, batch = setup
    return _loss_and_grads((1, 1, 1), 1, batch, params)


def test_loss_is_infonce_of_regions_and_singles_against_frozen_text(setup, single_step):
    exp, params, batch = setup
    obj = exp.objective

    def pieces(p, images, text):  # each image on its own path: its own mosaic, or encoded whole
        parts = [obj.encode_regions(p, images[0:4], 2), obj.encode_regions(p, images[4:13], 3),
                 obj.encode_image(p, images[13:])]
        return jnp.concatenate(parts), obj.image_embeddings(p, images), obj.encode_text(p, text)

    want_img, got_img, txt = (np.asarray(a) for a in jax.jit(pieces)(params, batch["image"], batch["text"]))
    np.testing.assert_allclose(got_img, want_img, rtol=1e-5, atol=1e-6)
    scale = float(np.exp(params["log_logit_scale"]))
    loss, grads = single_step
    np.testing.assert_allclose(loss, np_infonce(want_img, txt, scale), rtol=1e-5)
    assert all(np.all(g == 0) for g in jax.tree.leaves(grads["text"]))  # the text side is frozen
    assert np.linalg.norm(grads["image"]["encoder"]["block_1"]["attn"]["qkv"]["kernel"]) > 0


def test_sharded_step_equals_single_device(setup, single_step):
    _, params, batch = setup
    loss1, grads1 = single_step
    loss8, grads8 = _loss_and_grads((2, 4, 1), -1, batch, params)
    assert abs(loss8 - loss1) <= 1e-5 * abs(loss1)
    total = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads1)))
    for (path, g1), g8 in zip(jax.tree_util.tree_leaves_with_path(grads1), jax.tree.leaves(grads8)):
        diff = np.linalg.norm(np.asarray(g8) - np.asarray(g1))
        assert diff <= 1e-5 * max(np.linalg.norm(g1), 1e-3 * total), (jax.tree_util.keystr(path), diff)


def test_cluster_variant_builds_with_the_last_six_blocks_trainable():
    config = vlp_config.load_config_file(str(REPO / "configs" / "clim.py") + ":B/16")
    exp = build_experiment(config)  # abstract: the freeze patterns must each match parameters of a B/16
    paths = [[getattr(k, "key", None) for k in path]
             for path, _ in jax.tree_util.tree_leaves_with_path(exp.abstract_state.opt_state)]
    trained = {p[p.index("encoder") + 1] for p in paths if "image" in p and "encoder" in p}
    assert trained == {f"block_{i}" for i in range(6, 12)}, trained
    assert not any("text" in p for p in paths)
