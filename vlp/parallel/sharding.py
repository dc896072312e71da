"""Logical-axis sharding: one rule table maps the logical names on params and activations to mesh axes.

Rules are data: a sequence of (logical name, mesh axis | tuple of axes | None). For each dimension the first rule
whose mesh axes are still unused in that array wins (flax semantics), so `batch` takes (data, fsdp) on activations
and `embed` falls back to unsharded there, while on params `embed` is FSDP-sharded.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlp.parallel.mesh import BATCH_AXES

LogicalRules = Sequence[tuple[str, Any]]

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("proj", "tensor"),
    ("kv", None),
    ("qkv", None),
    ("length", None),
    ("patch_h", None),
    ("patch_w", None),
    ("channels", None),
    ("norm", None),
    ("layers", None),
    ("classes", "fsdp"),  # rows of a large classifier (MLCD's 1M cluster centres)
)


def as_rules(rules: Any) -> tuple[tuple[str, Any], ...]:
    """Normalises a rule table from config (lists from JSON become tuples)."""
    out = []
    for entry in rules:
        name, axes = entry
        out.append((str(name), tuple(axes) if isinstance(axes, (list, tuple)) else axes))
    return tuple(out)


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drops mesh axes from dimensions they do not divide (those dimensions stay replicated)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            fitted.append(None)
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        size = int(np.prod([mesh.shape[a] for a in names]))
        fitted.append(axes if dim % size == 0 else None)
    return P(*fitted)


def strip_boxes(tree: Any) -> Any:
    """The values inside `nn.Partitioned` boxes, without applying sharding constraints (unlike nn.unbox)."""
    return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree,
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: LogicalRules) -> Any:
    """NamedShardings for a tree of (possibly `nn.Partitioned`-boxed) abstract values from `jax.eval_shape`.

    Leaves without logical names are replicated; dimensions a mesh axis does not divide are replicated too.
    """
    # Mapped over the tree's own leaves (not over a tree of specs), so leafless nodes such as optax's MaskedNode
    # (frozen params under multi_transform) keep their place.
    def leaf_sharding(leaf: Any) -> Any:
        if isinstance(leaf, nn.Partitioned) and not hasattr(leaf.value, "shape"):
            return leaf.value  # a leafless placeholder in a box (MaskedNode): as strip_boxes leaves it
        if isinstance(leaf, nn.Partitioned):
            spec = nn.logical_to_mesh_axes(leaf.names, rules)
            return NamedSharding(mesh, _fit_spec(spec, tuple(leaf.value.shape), mesh))
        return NamedSharding(mesh, P())

    return jax.tree.map(leaf_sharding, abstract_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) dimension split over (data, fsdp); the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def host_to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's host-local batch into global arrays sharded on the batch axes."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
            for k, v in batch.items()}


def sharded_fraction(params: Any) -> float:
    """Fraction of parameter bytes that are split over more than one device (for FSDP checks)."""
    total = sharded = 0
    for leaf in jax.tree.leaves(params):
        size = leaf.size * leaf.dtype.itemsize
        total += size
        if not leaf.sharding.is_fully_replicated:
            sharded += size
    return sharded / max(total, 1)
