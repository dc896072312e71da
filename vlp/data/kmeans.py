"""Spherical k-means in JAX for MLCD's offline clustering (tools/cluster.py): jitted, the centres sharded over the
devices (K up to 1M on a cluster), the data streamed through in chunks so N is bounded only by host memory.

Embeddings are L2-normalised, so the nearest centre is the one with the largest cosine and a centre is the
normalised mean of its members (spherical k-means; what MLCD's CLIP-feature clustering uses, and faiss's
`spherical=True`). Empty clusters are re-seeded from random points.
"""

from __future__ import annotations

from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

CENTRE_AXIS = "centres"


def centre_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh over `devices` (default all) whose axis splits the centres' rows."""
    devices = devices or jax.devices()
    return Mesh(np.asarray(devices), (CENTRE_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def _normalize(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _assign(x: jax.Array, centres: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """x [n, D], centres [K, D] (both normalised) -> (ids [n, k] of the k nearest centres, nearest first; their
    cosines [n, k])."""
    scores = jnp.dot(x, centres.T, precision=jax.lax.Precision.HIGHEST)  # [n, K], sharded on K
    cos, ids = jax.lax.top_k(scores, k)
    return ids.astype(jnp.int32), cos


def _accumulate(sums: jax.Array, counts: jax.Array, x: jax.Array, centres: jax.Array
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Adds the chunk x [n, D] to the per-centre sums [K, D] and counts [K]; also returns the chunk's summed
    cosine to its nearest centre (the objective k-means maximises)."""
    ids, cos = _assign(x, centres, 1)
    ids = ids[:, 0]
    sums = sums + jax.ops.segment_sum(x, ids, num_segments=centres.shape[0])
    counts = counts + jax.ops.segment_sum(jnp.ones_like(ids, jnp.float32), ids, num_segments=centres.shape[0])
    return sums, counts, jnp.sum(cos)


def _update(sums: jax.Array, counts: jax.Array, centres: jax.Array, reseed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """New centres: normalised member means; empty clusters take a row of `reseed` [K, D]. Also returns the number
    of empty clusters."""
    empty = counts == 0
    return _normalize(jnp.where(empty[:, None], reseed, sums)), jnp.sum(empty)


class KMeans:
    """Spherical k-means with the [K, D] centres sharded over `mesh` (K divisible by its size).

    `fit(chunks, init, iterations)` runs Lloyd iterations over a re-iterable stream of chunks [n, D]; `assign(x, k)`
    gives the k nearest centres of each row."""

    def __init__(self, num_centres: int, dim: int, mesh: Mesh | None = None):
        self.mesh = mesh or centre_mesh()
        shards = self.mesh.shape[CENTRE_AXIS]
        if num_centres % shards:
            raise ValueError(f"num_centres={num_centres} does not split over the {shards} devices; use a multiple of "
                             f"{shards}")
        self.num_centres, self.dim = num_centres, dim
        rows = NamedSharding(self.mesh, P(CENTRE_AXIS))
        replicated = NamedSharding(self.mesh, P())
        self._rows = rows
        self._accumulate = jax.jit(_accumulate, in_shardings=(rows, rows, replicated, rows),
                                   out_shardings=(rows, rows, replicated), donate_argnums=(0, 1))
        self._update = jax.jit(_update, in_shardings=(rows, rows, rows, rows), out_shardings=(rows, replicated))
        self._assign = jax.jit(_assign, static_argnums=2, in_shardings=(replicated, rows),
                               out_shardings=(replicated, replicated))
        self.centres: jax.Array | None = None

    def init_from(self, points: np.ndarray) -> None:
        """Starts from `points` [K, D] (e.g. K distinct random samples of the data)."""
        if points.shape != (self.num_centres, self.dim):
            raise ValueError(f"initial centres must be [{self.num_centres}, {self.dim}], got {points.shape}")
        self.centres = jax.device_put(_normalize(jnp.asarray(points, jnp.float32)), self._rows)

    def fit(self, chunks: Callable[[], Iterator[np.ndarray]], iterations: int,
            reseed: Callable[[], np.ndarray], on_iteration: Callable[[int, float, int], None] | None = None
            ) -> list[float]:
        """Lloyd iterations; `chunks()` yields the data [n, D] (normalised) afresh each pass, `reseed()` gives
        [K, D] candidate rows for empty clusters. Returns the mean cosine to the nearest centre per iteration."""
        if self.centres is None:
            raise ValueError("call init_from(points) before fit")
        history = []
        for it in range(iterations):
            sums = jax.device_put(jnp.zeros((self.num_centres, self.dim), jnp.float32), self._rows)
            counts = jax.device_put(jnp.zeros((self.num_centres,), jnp.float32), self._rows)
            total, n = 0.0, 0
            for x in chunks():
                sums, counts, cos = self._accumulate(sums, counts, jnp.asarray(x, jnp.float32), self.centres)
                total, n = total + float(cos), n + len(x)
            self.centres, empty = self._update(sums, counts, self.centres,
                                               jax.device_put(jnp.asarray(reseed(), jnp.float32), self._rows))
            history.append(total / max(n, 1))
            if on_iteration is not None:
                on_iteration(it, history[-1], int(empty))
        return history

    def assign(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """x [n, D] -> (ids [n, k] int32, nearest first; cosines [n, k])."""
        ids, cos = self._assign(jnp.asarray(x, jnp.float32), self.centres, k)
        return np.asarray(ids), np.asarray(cos)
