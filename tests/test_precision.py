"""Precision policy: params and optimizer state stay fp32, towers compute in the configured dtype, logits and
losses are fp32; bf16 compute stays within a stated tolerance of fp32 on a tiny model."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import tiny_config

from vlp.parallel import sharding
from vlp.train.trainer import build_experiment, jit_train_step

# Stated tolerances for bf16 compute (8-bit mantissa, fp32 accumulation) against fp32 on the tiny CLIP model.
LOSS_REL_TOL = 2e-2
MIN_EMBEDDING_COSINE = 0.99


def run(dtype, params=None):
    exp = build_experiment(tiny_config(**{"precision.compute_dtype": dtype}))
    state = exp.init_state()
    if params is not None:
        state = state.replace(params=jax.device_put(params, exp.state_shardings.params))
    rng = np.random.default_rng(0)
    host = exp.objective.example_batch(exp.config.batch_size)
    host["image"] = rng.uniform(-1, 1, host["image"].shape).astype(np.float32)
    host["text"] = rng.integers(1, exp.objective.tokenizer.vocab_size - 1, host["text"].shape).astype(np.int32)
    initial = jax.device_get(state.params)
    with exp.context():
        batch = sharding.host_to_global(host, exp.mesh)
        embeddings = jax.jit(exp.objective.embed)(state.params, batch)
        new_state, metrics = jit_train_step(exp)(state, batch)
    return initial, jax.device_get(embeddings), new_state, jax.device_get(metrics)


def test_bf16_compute_is_close_to_fp32_and_keeps_fp32_state():
    params, emb_32, _, metrics_32 = run("float32")
    _, emb_16, state_16, metrics_16 = run("bfloat16", params)
    for key in ("image_emb", "text_emb"):
        assert emb_16[key].dtype == np.float32  # normalised embeddings and the logits after them are fp32
        cosine = np.sum(emb_16[key] * emb_32[key], axis=-1)
        assert cosine.min() >= MIN_EMBEDDING_COSINE
    assert abs(metrics_16["loss"] - metrics_32["loss"]) / metrics_32["loss"] <= LOSS_REL_TOL
    assert metrics_16["loss"].dtype == np.float32
    assert {leaf.dtype for leaf in jax.tree.leaves(state_16.params)} == {jnp.dtype(jnp.float32)}
    opt_dtypes = {leaf.dtype for leaf in jax.tree.leaves(state_16.opt_state) if jnp.ndim(leaf) > 0}
    assert opt_dtypes == {jnp.dtype(jnp.float32)}
