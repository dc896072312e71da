"""Builds the evaluators named in `config.evals` and the sharded, batched encoders they call."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from vlp.eval import EVALUATORS
from vlp.eval.common import Encoders
from vlp.parallel.mesh import batch_shard_count
from vlp.parallel.sharding import batch_sharding


def batched_apply(fn: Callable, params: Any, array: np.ndarray, batch_size: int, mesh: Mesh) -> np.ndarray:
    """fn(params, chunk) over fixed-size chunks (the last one zero-padded, so one compilation serves all),
    each chunk sharded on the batch axes; returns the concatenated numpy output."""
    shards = batch_shard_count(mesh)
    batch_size = -(-batch_size // shards) * shards  # round up to a multiple of the batch shards
    sharding = batch_sharding(mesh, array.ndim)
    outputs = []
    for start in range(0, len(array), batch_size):
        chunk = array[start:start + batch_size]
        valid = len(chunk)
        if valid < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - valid, *chunk.shape[1:]), chunk.dtype)])
        out = fn(params, jax.device_put(chunk, sharding))
        outputs.append(np.asarray(multihost_utils.process_allgather(out, tiled=True))[:valid])
    return np.concatenate(outputs)


def make_encoders(objective: Any, mesh: Mesh, batch_size: int, image_output: int | None = None) -> Encoders:
    """Batched, sharded encoders of an objective; those it lacks are None (image-only objectives have no text).
    `image_output` picks one of several image embeddings (TIPS: CLS token 1 or 2)."""
    max_len = objective.config.data.max_text_len

    def batched(name: str, **kwargs: Any) -> Callable | None:
        fn = getattr(objective, name, None)
        if fn is None:
            return None
        jitted = jax.jit(functools.partial(fn, **kwargs))
        return lambda params, array: batched_apply(jitted, params, array, batch_size, mesh)

    captioners: dict = {}  # one jitted decoder per set of decoding options, compiled once

    def caption(params: Any, images: np.ndarray, **options: Any) -> list[str]:
        key = tuple(sorted(options.items()))
        if key not in captioners:
            captioners[key] = batched("caption_tokens", **options)
        return [objective.tokenizer.decode(row) for row in captioners[key](params, images)]

    itm = getattr(objective, "itm_scores", None)
    itm_jitted = jax.jit(itm) if itm is not None else None

    def itm_score(params: Any, images: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """ITM scores of pairs (images[i], tokens[i]) in fixed-size sharded chunks (one compilation)."""
        size = -(-batch_size // batch_shard_count(mesh)) * batch_shard_count(mesh)
        outputs = []
        for start in range(0, len(images), size):
            chunk_i, chunk_t = images[start:start + size], tokens[start:start + size]
            valid = len(chunk_i)
            pad = size - valid
            chunk_i = np.concatenate([chunk_i, np.zeros((pad, *chunk_i.shape[1:]), chunk_i.dtype)])
            chunk_t = np.concatenate([chunk_t, np.zeros((pad, *chunk_t.shape[1:]), chunk_t.dtype)])
            out = itm_jitted(params, jax.device_put(chunk_i, batch_sharding(mesh, chunk_i.ndim)),
                             jax.device_put(chunk_t, batch_sharding(mesh, chunk_t.ndim)))
            outputs.append(np.asarray(multihost_utils.process_allgather(out, tiled=True))[:valid])
        return np.concatenate(outputs)

    return Encoders(
        itm_score=itm_score if itm is not None else None,
        encode_image=batched("encode_image", **({"output": image_output} if image_output else {})),
        encode_text=batched("encode_text"),
        tokenize=lambda texts: objective.tokenizer.encode(texts, max_len),
        encode_patches=batched("encode_patches"),
        caption=caption if hasattr(objective, "caption_tokens") else None,
        encode_signal=batched("encode_signal"),
    )


class _Suffixed:
    """An evaluator whose result keys get a suffix (e.g. `retrieval_i2t_r1_cls2`)."""

    def __init__(self, evaluator: Any, suffix: str):
        self.evaluator, self.suffix = evaluator, suffix

    def run(self, params: Any) -> dict[str, float]:
        return {k + self.suffix: v for k, v in self.evaluator.run(params).items()}


def build_evaluators(config: ml_collections.ConfigDict, objective: Any, mesh: Mesh, split: str | None = None,
                     names: list[str] | None = None) -> dict[str, Any]:
    """One evaluator per entry of config.evals (or of `names`, in that order); `split` overrides every entry's
    split (tools/eval.py --split).

    Optional entry keys: `source` (evaluate on another data source than the training one), `image_output` (which
    image embedding, e.g. TIPS's CLS 1 or 2), `key_prefix` (default: the entry's name) and `key_suffix` of the
    result keys (e.g. `retrieval` + `_cls2` -> `retrieval_i2t_r1_cls2`)."""
    names = list(config.evals.keys()) if names is None else list(names)
    unknown = [n for n in names if n not in config.evals]
    if unknown:
        raise ValueError(f"no evaluator named {unknown} in config.evals; valid: {sorted(config.evals.keys())}")
    evaluators = {}
    for name in names:
        ev = config.evals[name]
        if ev.type not in EVALUATORS:
            raise ValueError(f"evals.{name}.type={ev.type!r}; valid: {sorted(EVALUATORS)}")
        options = {k: v for k, v in ev.to_dict().items()
                   if k not in ("type", "split", "batch_size", "source", "image_output", "key_prefix", "key_suffix")}
        encoders = make_encoders(objective, mesh, ev.get("batch_size", 500), ev.get("image_output"))
        evaluator = EVALUATORS[ev.type].build(
            encoders, name=ev.get("key_prefix", name), data_source=ev.get("source") or config.data.source,
            split=split or ev.split, image_size=config.data.image_size, **options)
        evaluators[name] = _Suffixed(evaluator, ev.key_suffix) if ev.get("key_suffix") else evaluator
    return evaluators


def run_evaluators(evaluators: dict[str, Any], params: Any) -> dict[str, float]:
    results: dict[str, float] = {}
    for evaluator in evaluators.values():
        results.update(evaluator.run(params))
    return results
