"""Decoding: the KV-cached decoders equal the uncached ones token for token, beam size 1 is greedy, beam search
finds the exhaustive optimum of a toy model, and nucleus/top-k filtering matches numpy."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_coca import coca_config

from vlp import generate
from vlp.train.trainer import build_experiment

EOS, PAD, VOCAB, LENGTH = 4, 0, 5, 3


def toy_step(table):
    """A Markov 'model': logits = table[index, prev_token] (state unused)."""

    def step_fn(state, prev, index):
        return jnp.asarray(table)[index, prev], state

    return step_fn


def toy_table(seed):
    table = np.random.RandomState(seed).randn(LENGTH, VOCAB, VOCAB).astype(np.float32) * 2
    table[:, :, PAD] = -1e9  # the model never emits padding
    return table


def exhaustive_best(table, alpha):
    """The best sequence by log p / ((5 + len) / 6) ** alpha over every sequence ending at eos or at LENGTH."""
    logp = table - np.log(np.exp(table).sum(-1, keepdims=True))
    best, best_score = None, -np.inf
    for n in range(1, LENGTH + 1):
        for seq in itertools.product(range(1, VOCAB), repeat=n):
            if EOS in seq[:-1] or (n < LENGTH and seq[-1] != EOS):
                continue
            prev = (0,) + seq[:-1]
            score = sum(logp[i, prev[i], seq[i]] for i in range(n)) / ((5 + n) / 6) ** alpha
            if score > best_score:
                best, best_score = list(seq) + [PAD] * (LENGTH - n), score
    return best, best_score


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_beam_search_finds_the_exhaustive_optimum(alpha):
    for seed in range(4):
        table = toy_table(seed)
        # 16 beams keep every 2-token prefix of this 4-token model, so the search is exhaustive.
        tokens, score = generate.beam_search(toy_step(table), jnp.zeros((16, 1)), 1, LENGTH, EOS, beams=16,
                                             length_penalty=alpha, pad_id=PAD)
        best, best_score = exhaustive_best(table, alpha)
        assert np.asarray(tokens)[0].tolist() == best
        np.testing.assert_allclose(float(score[0]), best_score, rtol=1e-5)


def test_beam_size_one_is_greedy_on_toy_model():
    for seed in range(8):
        table = toy_table(seed)
        greedy = generate.greedy(toy_step(table), jnp.zeros((1, 1)), 1, LENGTH, EOS, PAD)
        beam, _ = generate.beam_search(toy_step(table), jnp.zeros((1, 1)), 1, LENGTH, EOS, beams=1,
                                       length_penalty=0.6, pad_id=PAD)
        assert np.asarray(beam).tolist() == np.asarray(greedy).tolist()


def test_filter_logits_matches_numpy():
    rng = np.random.RandomState(0)
    logits = rng.randn(6, 20).astype(np.float32)
    for top_k, top_p in [(0, 0.5), (3, 1.0), (5, 0.3), (0, 0.999)]:
        out = np.asarray(generate.filter_logits(jnp.asarray(logits), top_k, top_p))
        for row, got in zip(logits, out):
            order = np.argsort(-row)[:top_k or None]  # top-k first, then the nucleus of the renormalised rest
            probs = np.exp(row[order] - row.max())
            probs /= probs.sum()
            expected = set(order[:int(np.searchsorted(np.cumsum(probs), top_p) + 1)])
            assert set(np.flatnonzero(np.isfinite(got))) == expected
            np.testing.assert_array_equal(got[list(expected)], row[list(expected)])


@pytest.fixture(scope="module")
def captioner():
    exp = build_experiment(coca_config())
    with exp.context():
        params = exp.init_state().params
    # Random weights put the argmax on many different tokens (a trained model would be as good a test).
    images = np.random.RandomState(0).randn(4, 32, 32, 3).astype(np.float32)
    return exp.objective, jax.device_get(params), images


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_cached_decoding_equals_uncached(captioner, method):
    objective, params, images = captioner
    cached = np.asarray(objective.caption_fn(method=method, beams=3)(params, images))
    uncached = np.asarray(objective.caption_fn(method=method, beams=3, cached=False)(params, images))
    np.testing.assert_array_equal(cached, uncached)
    assert len(np.unique(cached)) > 3  # not a degenerate constant output


def test_model_beam_one_and_top_k_one_sampling_are_greedy(captioner):
    objective, params, images = captioner
    greedy = np.asarray(objective.caption_fn(method="greedy")(params, images))
    np.testing.assert_array_equal(np.asarray(objective.caption_fn(method="beam", beams=1)(params, images)), greedy)
    np.testing.assert_array_equal(np.asarray(objective.caption_fn(method="sample", top_k=1)(params, images)), greedy)
