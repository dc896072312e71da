"""MLCD: the multi-label cluster-discrimination loss against numpy (sanity values of methods.md section 16), its
PartialFC sampling, the sharded centres (2x4x1 == 1 device), the cluster-label side file and the k-means tool."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, objective_loss_and_grads
from test_benchmarks import run_json_lines

from vlp import config as vlp_config
from vlp.data.cluster_labels import LABELS_KEY, AddClusterLabels, write_cluster_labels
from vlp.data.kmeans import KMeans, centre_mesh
from vlp.data.transforms import SelectCaption
from vlp.losses.cluster_discrimination import mlcd_loss, num_sampled, sharded_mlcd_loss
from vlp.parallel.mesh import make_mesh
from vlp.train.trainer import build_experiment

# Jitted: op-by-op dispatch of the loss costs seconds on a loaded 2-core machine.
mlcd_loss = jax.jit(mlcd_loss, static_argnames=("scale", "margin", "sample_ratio"))


def np_normalize(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_mlcd(emb, centres, positives, scale, margin, kept=None):
    """Per-row log(1 + sum_{sampled non-positives} e^{s cos}) + log(1 + sum_{positives} e^{-s (cos - m)}), mean."""
    cos = np_normalize(emb) @ np_normalize(centres).T
    kept = np.arange(centres.shape[0]) if kept is None else kept
    total = []
    for b in range(len(emb)):
        neg = [j for j in kept if j not in set(positives[b])]
        total.append(np.log1p(np.exp(scale * cos[b, neg]).sum())
                     + np.log1p(np.exp(-scale * (cos[b, positives[b]] - margin)).sum()))
    return float(np.mean(total))


def random_problem(seed=0, b=16, d=8, k_centres=32, k=3):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(b, d)).astype(np.float32)
    centres = rng.normal(size=(k_centres, d)).astype(np.float32)
    positives = np.stack([rng.choice(k_centres, k, replace=False) for _ in range(b)]).astype(np.int32)
    return emb, centres, positives


def test_one_positive_and_no_negatives_is_log1p_exp_minus_s_cos():
    emb, centres, _ = random_problem(b=4, k_centres=1, k=1)
    loss, _ = mlcd_loss(emb, centres, np.zeros((4, 1), np.int32), scale=16.0)
    cos = (np_normalize(emb) @ np_normalize(centres).T)[:, 0]
    np.testing.assert_allclose(float(loss), np.mean(np.log1p(np.exp(-16.0 * cos))), rtol=1e-6)


def test_loss_matches_numpy_without_sampling():
    emb, centres, positives = random_problem()
    loss, metrics = mlcd_loss(emb, centres, positives, scale=8.0, margin=0.2)
    np.testing.assert_allclose(float(loss), np_mlcd(emb, centres, positives, 8.0, 0.2), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss_negative"] + metrics["loss_positive"]), float(loss), rtol=1e-6)


def test_sampled_loss_matches_numpy_on_its_sample_and_unsampled_centres_get_no_gradient():
    emb, centres, positives = random_problem(k_centres=64)
    rng = jax.random.key(3)
    count = num_sampled(64, 0.25)
    # The sample: every positive of the batch, then the highest of one uniform draw over the centres.
    scores = np.array(jax.random.uniform(rng, (64,)))
    scores[np.unique(positives)] += 2.0
    kept = np.argsort(-scores)[:count]
    loss, grads = jax.jit(jax.value_and_grad(lambda c: mlcd_loss(emb, c, positives, rng, scale=8.0,
                                                                  sample_ratio=0.25)[0]))(jnp.asarray(centres))
    np.testing.assert_allclose(float(loss), np_mlcd(emb, centres, positives, 8.0, 0.0, kept), rtol=1e-5)
    touched = np.abs(np.asarray(grads)).sum(1) > 0
    assert set(np.flatnonzero(touched)) == set(kept) | set(positives.ravel())
    assert touched.sum() < 64 and count == 16


def test_a_shard_keeps_its_own_positives_and_ignores_other_shards_ids():
    from vlp.losses.cluster_discrimination import _sample

    scores = jnp.asarray([0.9, 0.0, 0.5, 0.1, 0.2, 0.3, 0.4, 0.6])  # centres 8..15 of shard 1
    # id 9 (local 1) is a positive here; id 1 and 3 belong to shard 0 (local -7 and -5 must not wrap to 1 or 3).
    kept = _sample(scores, jnp.asarray([[9, 1], [3, 1]]), jnp.int32(8), 3)
    assert sorted(np.asarray(kept).tolist()) == [0, 1, 7]


def test_sharded_loss_and_gradients_equal_one_device():
    emb, centres, positives = random_problem(k_centres=32)
    args = (jnp.asarray(emb), jnp.asarray(centres))
    want, want_grads = jax.jit(jax.value_and_grad(lambda e, c: mlcd_loss(e, c, positives, scale=8.0, margin=0.1)[0],
                                                  argnums=(0, 1)))(*args)
    with jax.set_mesh(make_mesh((2, 4, 1))):
        fn = jax.jit(jax.value_and_grad(lambda e, c: sharded_mlcd_loss(e, c, positives, scale=8.0, margin=0.1)[0],
                                        argnums=(0, 1)))
        got, got_grads = fn(*args)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7)


def mlcd_config(labels_path, **updates):
    config = vlp_config.load_config_file(str(REPO / "configs" / "mlcd.py") + ":tiny")
    config.model.image.update(width=32, depth=1, mlp_dim=64, num_heads=2)
    config.model.embed_dim = 32
    config.batch_size = 16
    config.mlcd.update(labels_path=str(labels_path), num_centres=32, positives=3, scale=8.0, sample_ratio=1.0)
    config.mesh.num_devices = 1
    vlp_config.apply_overrides(config, {k: str(v) for k, v in updates.items()})
    return config


@pytest.fixture(scope="module")
def labels_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("clusters") / "labels.npy"
    labels = np.stack([np.random.default_rng(i).choice(32, 4, replace=False) for i in range(50)])
    write_cluster_labels(str(path), labels, {"num_centres": 32, "source": "shapes", "split": "test"})
    return path, labels


def _loss_and_grads(labels_path, mesh_shape, num_devices, batch, params=None):
    exp = build_experiment(mlcd_config(labels_path, **{"mesh.shape": str(mesh_shape), "mesh.num_devices": num_devices}))
    loss, _, grads, params = objective_loss_and_grads(exp, batch, params)
    return loss, grads, params, exp.state_shardings.params["centres"].spec


def test_sharded_step_equals_single_device_with_centres_on_fsdp(labels_file):
    path, labels = labels_file
    rng = np.random.RandomState(0)
    batch = {"image": rng.randn(16, 32, 32, 3).astype(np.float32), "label": np.zeros((16,), np.int32),
             LABELS_KEY: labels[:16, :3].astype(np.int32)}
    loss1, grads1, params, _ = _loss_and_grads(path, (1, 1, 1), 1, batch)
    loss8, grads8, _, spec = _loss_and_grads(path, (2, 4, 1), -1, batch, params)
    assert spec[0] == "fsdp"  # the centres' rows are split over fsdp
    assert 0 < loss1 < 20 and abs(loss8 - loss1) <= 1e-5 * abs(loss1)
    total = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads1)))
    flat8 = dict(jax.tree_util.tree_leaves_with_path(grads8))
    for path_, g1 in jax.tree_util.tree_leaves_with_path(grads1):
        diff = np.linalg.norm(np.asarray(flat8[path_]) - g1)
        assert diff <= 1e-5 * max(np.linalg.norm(g1), 1e-3 * total), (jax.tree_util.keystr(path_), diff)


def test_cluster_labels_follow_the_record_index(labels_file):
    path, labels = labels_file
    transform = AddClusterLabels(SelectCaption("noisy"), str(path), 2)
    example = {"image": np.zeros((4, 4, 3), np.uint8), "caption_noisy": "x", "caption_synthetic": "y", "label": 1,
               "index": 7}
    np.testing.assert_array_equal(transform.map(example)[LABELS_KEY], labels[7, :2])
    with pytest.raises(IndexError, match="record index 50 has no row"):
        transform.map(dict(example, index=50))
    with pytest.raises(ValueError, match="mlcd.positives=5, but .* holds 4 labels"):
        AddClusterLabels(SelectCaption("noisy"), str(path), 5)


def test_kmeans_sharded_over_8_devices_finds_separated_clusters_and_exact_top_k():
    rng = np.random.default_rng(0)
    true_centres = np_normalize(rng.normal(size=(8, 16)))
    members = np.repeat(np.arange(8), 40)
    x = np_normalize(true_centres[members] + 0.05 * rng.normal(size=(320, 16))).astype(np.float32)
    kmeans = KMeans(8, 16, centre_mesh())
    assert kmeans.mesh.shape["centres"] == 8
    kmeans.init_from(x[[members.tolist().index(c) for c in range(8)]])  # one point of each cluster
    history = kmeans.fit(lambda: iter([x[:200], x[200:]]), 3, lambda: x[:8])
    ids, cos = kmeans.assign(x, 2)
    # Each found cluster is exactly one true cluster; the top-2 match brute force.
    assert len({(m, i) for m, i in zip(members, ids[:, 0])}) == 8
    centres = np.asarray(kmeans.centres)
    found = ids[np.arange(0, 320, 40), 0]  # the centre id of each true cluster
    means = np_normalize(np.stack([x[members == c].mean(0) for c in range(8)]))
    np.testing.assert_allclose(centres[found], means, atol=1e-5)  # spherical k-means: normalised member means
    np.testing.assert_allclose(history[-1], np.mean(np.sum(x * means[members], 1)), rtol=1e-5)
    brute = x @ centres.T
    np.testing.assert_array_equal(ids, np.argsort(-brute, axis=1)[:, :2])
    np.testing.assert_allclose(cos, np.sort(brute, axis=1)[:, ::-1][:, :2], rtol=1e-5)


def test_config_errors_name_the_key(labels_file):
    path, _ = labels_file
    with pytest.raises(ValueError, match="mlcd.labels_path is empty"):
        vlp_config.validate(mlcd_config(""))
    with pytest.raises(ValueError, match=r"mlcd.sample_ratio=1.5 must be in \(0, 1\]"):
        vlp_config.validate(mlcd_config(path, **{"mlcd.sample_ratio": 1.5}))
    config = mlcd_config(path, **{"mlcd.num_centres": 64})
    with pytest.raises(ValueError, match="clustered into 32 centres; set mlcd.num_centres=32"):
        build_experiment(config).objective.train_example_transform(SelectCaption())
    assert json.loads(path.with_name("labels.npy.json").read_text())["positives"] == 4


def test_cluster_variant_builds_with_sharded_1m_centres():
    config = vlp_config.load_config_file(str(REPO / "configs" / "mlcd.py") + ":B/16")
    config.mlcd.labels_path = "unused.npy"
    exp = build_experiment(config)  # abstract shapes and shardings only
    assert exp.abstract_state.params["centres"].shape == (1_000_000, 512)


def test_memory_and_kmeans_benchmark_runs_one_step():
    memory, kmeans = run_json_lines("mlcd.py", "--centres=4096", "--dim=64", "--batch=64", "--kmeans_n=2000",
                                    "--kmeans_k=64", "--kmeans_dim=32", "--iterations=1")
    assert memory["centres_mib_per_device"] == round(4096 * 64 * 4 / 8 / 2**20, 1)
    assert memory["loss_step_temp_mib_per_device"] > 0 and memory["loss_step_output_mib_per_device"] > 0
    assert kmeans["pass_embeddings_per_second"] > 0 and kmeans["top10_assign_embeddings_per_second"] > 0
