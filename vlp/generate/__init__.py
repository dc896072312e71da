"""Fixed-shape autoregressive decoding (greedy, top-k/top-p sampling, beam search) for the captioning objectives.

Every decoder is a `lax.while_loop` over positions with static shapes, so one jitted program serves every batch;
a row stops at its end-of-text token (later positions are padding) and the loop exits when all rows have stopped.
The model enters through a step function

    step_fn(state, prev_token [N], index) -> (logits [N, vocab], state)

where `state` is any pytree with N leading rows: a KV cache (`Captioner.decode_step`) or, for the uncached
reference, the token buffer that is re-read in full at every step. Outputs are int32 token ids [B, max_len]
(vlp's convention: pieces, eos, then pad).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

StepFn = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Any]]
DECODE_METHODS = ("greedy", "beam", "sample")


def _loop(step_fn: StepFn, state: Any, batch: int, max_len: int, eos_id: int, pad_id: int,
          choose: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
    def cond(carry):
        i, _, _, done, _ = carry
        return (i < max_len) & ~jnp.all(done)

    def body(carry):
        i, tokens, prev, done, state = carry
        logits, state = step_fn(state, prev, i)
        token = jnp.where(done, pad_id, choose(logits, i).astype(jnp.int32))
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, i))
        return i + 1, tokens, token, done | (token == eos_id), state

    carry = (jnp.int32(0), jnp.full((batch, max_len), pad_id, jnp.int32), jnp.zeros((batch,), jnp.int32),
             jnp.zeros((batch,), bool), state)
    return jax.lax.while_loop(cond, body, carry)[1]


def greedy(step_fn: StepFn, state: Any, batch: int, max_len: int, eos_id: int, pad_id: int = 0) -> jax.Array:
    """The argmax token at every position, per row until its eos. -> [batch, max_len]."""
    return _loop(step_fn, state, batch, max_len, eos_id, pad_id, lambda logits, i: jnp.argmax(logits, axis=-1))


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Sets to -inf the logits outside the `top_k` largest (0: all) and outside the smallest set of most probable
    tokens whose probability reaches `top_p` (nucleus sampling; the most probable token always stays). [N, V]."""
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # mass before a token is below top_p
        threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def sample(step_fn: StepFn, state: Any, batch: int, max_len: int, eos_id: int, rng: jax.Array,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, pad_id: int = 0) -> jax.Array:
    """Ancestral sampling from softmax(logits / temperature) restricted by `filter_logits`. -> [batch, max_len]."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 (use greedy decoding for the argmax)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")

    def choose(logits, i):
        logits = filter_logits(logits.astype(jnp.float32) / temperature, top_k, top_p)
        return jax.random.categorical(jax.random.fold_in(rng, i), logits, axis=-1)

    return _loop(step_fn, state, batch, max_len, eos_id, pad_id, choose)


def length_penalty_of(length: jax.Array, alpha: float) -> jax.Array:
    """GNMT's length normalisation ((5 + length) / 6) ** alpha (Wu et al., 2016); alpha 0 = raw log-probability."""
    return ((5.0 + length) / 6.0) ** alpha


def beam_search(step_fn: StepFn, state: Any, batch: int, max_len: int, eos_id: int, beams: int = 4,
                length_penalty: float = 0.6, pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
    """Beam search; `state` has batch * beams rows (row b * beams + k is beam k of example b).

    Each beam carries its sum of log-probabilities, its length and whether it ended (eos). At every position the
    beams x vocab continuations (an ended beam continues only with padding at no cost) are ranked by
    log-probability / length_penalty_of(length), and the best `beams` survive; the loop stops when every beam
    ended. With beams=1 this is greedy decoding. Returns (best tokens [batch, max_len], its score [batch]).
    """
    if beams < 1:
        raise ValueError(f"beams={beams} must be >= 1")
    k = beams

    def cond(carry):
        i, _, _, _, done, _ = carry
        return (i < max_len) & ~jnp.all(done)

    def body(carry):
        i, seqs, raw, lengths, done, state = carry
        prev = jax.lax.dynamic_index_in_dim(seqs, jnp.maximum(i - 1, 0), axis=2, keepdims=False)
        logits, state = step_fn(state, prev.reshape(batch * k), i)
        vocab = logits.shape[-1]
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(batch, k, vocab)
        pad_only = jnp.where(jnp.arange(vocab) == pad_id, 0.0, -jnp.inf)
        log_probs = jnp.where(done[..., None], pad_only, log_probs)
        cand_raw = (raw[..., None] + log_probs).reshape(batch, k * vocab)
        cand_len = jnp.broadcast_to(jnp.where(done, lengths, i + 1)[..., None], (batch, k, vocab))
        cand_len = cand_len.reshape(batch, k * vocab)
        _, idx = jax.lax.top_k(cand_raw / length_penalty_of(cand_len, length_penalty), k)
        parent, token = idx // vocab, (idx % vocab).astype(jnp.int32)
        seqs = jnp.take_along_axis(seqs, parent[..., None], axis=1)
        seqs = jax.lax.dynamic_update_slice(seqs, token[..., None], (0, 0, i))
        done = jnp.take_along_axis(done, parent, axis=1) | (token == eos_id)
        rows = (jnp.arange(batch)[:, None] * k + parent).reshape(-1)
        state = jax.tree.map(lambda x: x[rows], state)
        return (i + 1, seqs, jnp.take_along_axis(cand_raw, idx, axis=1),
                jnp.take_along_axis(cand_len, idx, axis=1), done, state)

    # Only beam 0 is live at the start, so the first step does not pick the same token `beams` times.
    raw = jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf)[None], (batch, 1))
    carry = (jnp.int32(0), jnp.full((batch, k, max_len), pad_id, jnp.int32), raw, jnp.zeros((batch, k), jnp.int32),
             jnp.zeros((batch, k), bool), state)
    _, seqs, raw, lengths, _, _ = jax.lax.while_loop(cond, body, carry)
    scores = raw / length_penalty_of(lengths, length_penalty)
    best = jnp.argmax(scores, axis=1)
    return (jnp.take_along_axis(seqs, best[:, None, None], axis=1)[:, 0],
            jnp.take_along_axis(scores, best[:, None], axis=1)[:, 0])


def repeat_rows(tree: Any, times: int) -> Any:
    """Each leading row repeated `times` times in place (b -> b * times + k): a batch's state for beam search."""
    return jax.tree.map(lambda x: jnp.repeat(x, times, axis=0), tree)
