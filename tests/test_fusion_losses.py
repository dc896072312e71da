"""Shared parts of the fusion objectives (ALBEF, TCL, UNITER): MLM masking per visit, the mask id, MLM / ITM / queue
contrastive losses against numpy, ITM hard-negative sampling (distribution, groups, seed, 1 device == 8 devices)
and the feature queue (methods.md sections 10-12, 19)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlp.data.mlm import IGNORE_LABEL, AddMLMMask, mlm_mask, mlm_vocab_size
from vlp.data.tokenizer import Tokenizer
from vlp.data.transforms import VISIT_KEY, SelectCaption, TokenizeBatch
from vlp.losses import fusion
from vlp.parallel.mesh import make_mesh

TOKENIZER = Tokenizer()


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_softmax(x):
    return np.exp(np_log_softmax(x))


# ---------------------------------------------------------------- masking


def test_mask_id_is_outside_the_vocabulary_and_never_encoded():
    tok = TOKENIZER
    assert tok.mask_id == tok.vocab_size == mlm_vocab_size(tok) - 1
    assert set(tok.special_ids) == {tok.pad_id, tok.eos_id}
    ids = tok.encode(["a large red circle in the upper left", "[MASK] <mask> blue"], 16)
    assert ids.max() < tok.vocab_size


def test_mlm_mask_rates_and_special_tokens():
    rng = np.random.default_rng(0)
    vocab, mask_id, specials = 50, 50, (0, 49)
    tokens = rng.integers(1, 49, (400, 64))
    tokens[:, -16:] = 0  # padding
    tokens[:, 47] = 49  # eos
    masked, labels = mlm_mask(tokens, np.random.default_rng(1), mask_id, vocab, specials)
    chosen = labels != IGNORE_LABEL
    content = (tokens != 0) & (tokens != 49)
    assert not chosen[~content].any() and (masked[~content] == tokens[~content]).all()  # specials never masked
    assert (labels[chosen] == tokens[chosen]).all()
    assert abs(chosen.sum() / content.sum() - 0.15) < 0.01
    n = chosen.sum()
    as_mask = (masked == mask_id)
    kept = chosen & (masked == tokens)
    assert not (as_mask & ~chosen).any() and (masked[~chosen] == tokens[~chosen]).all()
    assert abs(as_mask.sum() / n - 0.8) < 0.02
    # random replacements (~10%, plus the 1/47 of them that hit the original) are never special nor the mask id
    randomised = chosen & ~as_mask & ~kept
    assert abs(randomised.sum() / n - 0.1 * 46 / 47) < 0.015 and abs(kept.sum() / n - 0.1 * 48 / 47) < 0.015
    assert np.isin(masked[randomised], np.arange(1, 49)).all()


def test_mlm_mask_per_visit_reproducible_and_batched_through_the_pipeline():
    transform = AddMLMMask(SelectCaption("noisy"), TOKENIZER, 12, seed=3, prob=0.5)
    record = {"image": np.zeros((4, 4, 3), np.uint8), "caption_noisy": "a large red circle in the upper left",
              "caption_synthetic": "x", "label": 1}
    first = transform.map(dict(record, **{VISIT_KEY: np.int64(7)}))
    again = transform.map(dict(record, **{VISIT_KEY: np.int64(7)}))
    other = [transform.map(dict(record, **{VISIT_KEY: np.int64(v)}))["mlm_labels"] for v in range(8, 14)]
    assert np.array_equal(first["mlm_text"], again["mlm_text"])
    assert any(not np.array_equal(first["mlm_labels"], o) for o in other)  # a new draw at each visit
    batch = TokenizeBatch(TOKENIZER, 12).map({k: np.stack([v, v]) if k != "caption" else [v, v]
                                              for k, v in first.items()})
    assert batch["mlm_text"].shape == (2, 12) and batch["mlm_labels"].shape == (2, 12)
    unmasked = batch["text"][0]
    chosen = batch["mlm_labels"][0] != IGNORE_LABEL
    assert chosen.any() and (batch["mlm_labels"][0][chosen] == unmasked[chosen]).all()
    assert (batch["mlm_text"][0][~chosen] == unmasked[~chosen]).all()


# ---------------------------------------------------------------- losses


def test_mlm_loss_matches_numpy_and_alpha_zero_is_plain_ce():
    rng = np.random.default_rng(0)
    logits, teacher = rng.normal(size=(2, 3, 4, 7)).astype(np.float32)
    labels = np.full((3, 4), IGNORE_LABEL)
    labels[0, 1], labels[1, 3], labels[2, 0] = 2, 6, 0
    valid = labels != IGNORE_LABEL
    logp = np_log_softmax(logits)[valid]
    ce = -logp[np.arange(3), labels[valid]]
    alpha = 0.4
    want = np.mean((1 - alpha) * ce - alpha * (np_softmax(teacher)[valid] * logp).sum(-1))
    got, metrics = fusion.mlm_loss(logits, labels, teacher, alpha)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    plain, _ = fusion.mlm_loss(logits, labels)
    np.testing.assert_allclose(plain, ce.mean(), rtol=1e-5)
    np.testing.assert_allclose(fusion.mlm_loss(logits, labels, teacher, 0.0)[0], ce.mean(), rtol=1e-6)
    assert float(metrics["mlm_tokens"]) == 3


def test_itm_loss_matches_numpy_and_is_ln2_for_uniform_outputs():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(9, 2)).astype(np.float32)
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0])
    want = -np_log_softmax(logits)[np.arange(9), labels].mean()
    np.testing.assert_allclose(fusion.itm_loss(logits, labels)[0], want, rtol=1e-6)
    np.testing.assert_allclose(fusion.itm_loss(np.zeros((9, 2), np.float32), labels)[0], np.log(2), rtol=1e-6)


def np_queue_loss(q, k, queue, temp, q_m, alpha, groups):
    b = q.shape[0]
    cols = np.concatenate([k, queue])
    g = np.arange(b) // (b // groups)
    allowed = np.concatenate([g[:, None] == g[None], np.ones((b, len(queue)), bool)], 1)
    losses = []
    for i in range(b):
        logits, logits_m = (q[i] @ cols.T / temp)[allowed[i]], (q_m[i] @ cols.T / temp)[allowed[i]]
        onehot = (np.flatnonzero(allowed[i]) == i).astype(np.float64)
        target = (1 - alpha) * onehot + alpha * np_softmax(logits_m)
        losses.append(-(target * np_log_softmax(logits)).sum())
    return np.mean(losses)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("groups", [1, 2])
def test_queue_contrastive_loss_matches_numpy(groups):
    rng = np.random.default_rng(groups)
    q, k, q_m = (unit(rng.normal(size=(8, 16))) for _ in range(3))
    queue = unit(rng.normal(size=(24, 16)))
    got, _ = fusion.queue_contrastive_loss(*(jnp.float32(x) for x in (q, k, queue)), 0.1, jnp.float32(q_m), 0.4,
                                           groups)
    np.testing.assert_allclose(got, np_queue_loss(q, k, queue, 0.1, q_m, 0.4, groups), rtol=1e-5)
    plain, _ = fusion.queue_contrastive_loss(*(jnp.float32(x) for x in (q, k, queue)), 0.1, jnp.float32(q_m), 0.0,
                                             groups)
    np.testing.assert_allclose(plain, np_queue_loss(q, k, queue, 0.1, q, 0.0, groups), rtol=1e-5)


def test_queue_contrastive_loss_at_init_is_ln_local_batch_plus_queue():
    # random 256-d unit vectors are nearly orthogonal: every logit ~ 0 at a large temperature
    rng = np.random.default_rng(0)
    q, k = unit(rng.normal(size=(2, 64, 256)))
    queue = unit(rng.normal(size=(512, 256)))
    loss, _ = fusion.queue_contrastive_loss(jnp.float32(q), jnp.float32(k), jnp.float32(queue), 1.0, groups=4)
    np.testing.assert_allclose(loss, np.log(64 // 4 + 512), rtol=2e-3)


# ---------------------------------------------------------------- hard negatives and queue


def test_hard_negatives_follow_softmax_without_the_diagonal_within_groups():
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(8, 8)).astype(np.float32) * 1.5
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = np.asarray(jax.vmap(lambda k: fusion.sample_hard_negatives(jnp.asarray(sim), k, groups=2))(keys))
    for i in range(8):
        group = np.arange(8) // 4 == i // 4
        allowed = group & (np.arange(8) != i)
        want = np.where(allowed, np.exp(sim[i] - sim[i].max()), 0.0)
        want /= want.sum()
        freq = np.bincount(draws[:, i], minlength=8) / len(keys)
        np.testing.assert_allclose(freq, want, atol=0.03)
        assert freq[i] == 0 and freq[~group].sum() == 0


def test_hard_negatives_same_on_one_device_and_a_mesh_of_eight():
    sim = jnp.asarray(np.random.default_rng(1).normal(size=(16, 16)), jnp.float32)
    key = jax.random.key(5)
    sample = jax.jit(fusion.sample_hard_negatives, static_argnums=2)
    one = np.asarray(sample(jax.device_put(sim, jax.devices()[0]), key, 1))
    mesh = make_mesh((2, 4, 1), 8)
    sharded = jax.device_put(sim, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))
    eight = np.asarray(sample(sharded, key, 1))
    assert np.array_equal(one, eight) and (one != np.arange(16)).all()
    assert not np.array_equal(one, np.asarray(sample(sim, jax.random.key(6), 1)))  # the seed matters


def test_enqueue_is_fifo():
    queue, ptr = jnp.zeros((6, 2)), jnp.int32(0)
    for step in range(4):
        queue, ptr = fusion.enqueue(queue, ptr, jnp.full((2, 2), step + 1.0))
    np.testing.assert_array_equal(np.asarray(queue)[:, 0], [4, 4, 2, 2, 3, 3])
    assert int(ptr) == 2
    with pytest.raises(ValueError, match="not divisible by the global batch 4"):
        fusion.enqueue(queue, ptr, jnp.zeros((4, 2)))


# ---------------------------------------------------------------- TCL local mutual information


def np_lmi(g, locals_, valid, temp):
    b, k = valid.shape
    terms = []
    for i in range(b):
        negs = [g[i] @ locals_[j, kk] / temp for j in range(b) if j != i for kk in range(k) if valid[j, kk]]
        for kk in range(k):
            if valid[i, kk]:
                pos = g[i] @ locals_[i, kk] / temp
                terms.append(-pos + np.log(np.exp(pos) + np.exp(negs).sum()))
    return np.mean(terms)


def test_lmi_matches_numpy_and_ignores_added_padding():
    rng = np.random.default_rng(0)
    g, locals_ = unit(rng.normal(size=(4, 8))), unit(rng.normal(size=(4, 5, 8)))
    valid = np.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], bool)
    got = fusion.local_mutual_information_loss(jnp.float32(g), jnp.float32(locals_), valid, 0.2)
    np.testing.assert_allclose(got, np_lmi(g, locals_, valid, 0.2), rtol=1e-5)
    # three more pad positions, holding garbage features: the loss is unchanged
    padded = np.concatenate([locals_, unit(rng.normal(size=(4, 3, 8)))], axis=1)
    more = np.concatenate([valid, np.zeros((4, 3), bool)], axis=1)
    np.testing.assert_allclose(fusion.local_mutual_information_loss(jnp.float32(g), jnp.float32(padded), more, 0.2),
                               got, rtol=1e-6)


def test_lmi_at_init_is_ln_one_plus_negatives():
    rng = np.random.default_rng(1)
    g, locals_ = unit(rng.normal(size=(8, 512))), unit(rng.normal(size=(8, 16, 512)))
    got = fusion.local_mutual_information_loss(jnp.float32(g), jnp.float32(locals_), np.ones((8, 16), bool), 1.0)
    np.testing.assert_allclose(got, np.log(1 + 7 * 16), rtol=2e-3)


def test_avg_pool_locals_pools_row_major_blocks():
    x = np.arange(2 * 16 * 1, dtype=np.float32).reshape(2, 16, 1)  # 4x4 grid
    got = np.asarray(fusion.avg_pool_locals(jnp.asarray(x), 4, 2))
    np.testing.assert_allclose(got[0, :, 0], [np.mean([0, 1, 4, 5]), np.mean([2, 3, 6, 7]), np.mean([8, 9, 12, 13]),
                                              np.mean([10, 11, 14, 15])])
