"""The two param layouts of a transformer stack (`layers.Encoder`) and the conversion between them.

Unscanned (`model.scan_layers=False`): `.../encoder/block_0/attn/qkv/kernel`, one entry per block. Scanned
(`scan_layers=True`): `.../encoder/blocks/attn/qkv/kernel` with a leading [depth] axis. Exporters and importers
speak the unscanned (per-layer) names; checkpoints hold whichever layout their run used. `stack_layers` and
`unstack_layers` (flat "/"-joined dicts) and `restack` (any pytree, e.g. a TrainState with its optimizer moments)
convert, for numpy arrays, jax arrays and `jax.ShapeDtypeStruct`s (whose shardings get / lose the leading axis).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

STACKED = "blocks"
_BLOCK = re.compile(r"block_(\d+)")
_BLOCK_PART = "ln_1"  # every EncoderBlock has it: tells a scanned `blocks` node from a module that is named blocks


def _is_stacked_node(key: Any, value: Any) -> bool:
    return key == STACKED and isinstance(value, Mapping) and _BLOCK_PART in value


def _block_keys(node: Mapping) -> list[str]:
    return [k for k in node if isinstance(k, str) and _BLOCK.fullmatch(k)]


def _stack_leaves(*leaves: Any) -> Any:
    first = leaves[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        sharding = first.sharding
        if isinstance(sharding, NamedSharding):
            sharding = NamedSharding(sharding.mesh, P(None, *sharding.spec))
        return jax.ShapeDtypeStruct((len(leaves),) + tuple(first.shape), first.dtype, sharding=sharding)
    if isinstance(first, np.ndarray) or np.isscalar(first):
        return np.stack(leaves)
    return jnp.stack(leaves)


def _unstack_leaf(leaf: Any, depth: int) -> list[Any]:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        sharding = leaf.sharding
        if isinstance(sharding, NamedSharding):
            sharding = NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[1:]))
        return [jax.ShapeDtypeStruct(tuple(leaf.shape[1:]), leaf.dtype, sharding=sharding)] * depth
    if leaf.shape[0] != depth:
        raise ValueError(f"a scanned layer param has leading axis {leaf.shape[0]}, expected the depth {depth}")
    return [leaf[i] for i in range(depth)]


def _depth(node: Mapping) -> int:
    leaves = jax.tree.leaves(node)
    if not leaves:
        raise ValueError("cannot unstack a scanned layer stack without any array (its depth is unknown)")
    return int(leaves[0].shape[0])


def restack(tree: Any, stacked: bool) -> Any:
    """`tree` with every transformer stack in the scanned (`stacked=True`) or unscanned layout; a stack already in
    that layout, and everything that is not a stack, is returned as it is. Works through any pytree node."""
    if isinstance(tree, Mapping):
        out = {}
        blocks = _block_keys(tree)
        for key, value in tree.items():
            if stacked and key in blocks:
                continue
            if not stacked and _is_stacked_node(key, value):
                depth = _depth(value)
                parts = jax.tree.map(lambda leaf: _unstack_leaf(leaf, depth), restack(value, False))
                for i in range(depth):
                    out[f"block_{i}"] = jax.tree.map(lambda p: p[i], parts, is_leaf=lambda p: isinstance(p, list))
                continue
            out[key] = restack(value, stacked)
        if stacked and blocks:
            indices = sorted(int(_BLOCK.fullmatch(k).group(1)) for k in blocks)
            if indices != list(range(len(indices))):
                raise ValueError(f"layer params {sorted(blocks)} are not block_0 ... block_{len(blocks) - 1}")
            subtrees = [restack(tree[f"block_{i}"], True) for i in indices]
            out[STACKED] = jax.tree.map(_stack_leaves, *subtrees)
        return type(tree)(out) if isinstance(tree, dict) else out
    children, treedef = jax.tree_util.tree_flatten(tree, is_leaf=lambda x: x is not tree)
    if treedef.num_leaves == 1 and children and children[0] is tree:  # a leaf
        return tree
    return jax.tree_util.tree_unflatten(treedef, [restack(c, stacked) for c in children])


def stack_layers(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{".../encoder/block_{i}/rest": [*s]} -> {".../encoder/blocks/rest": [depth, *s]}; other entries unchanged."""
    return _flat(restack(traverse_util.unflatten_dict(dict(flat), sep="/"), True))


def unstack_layers(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `stack_layers`: per-layer names (what exporters and importers read and write)."""
    return _flat(restack(traverse_util.unflatten_dict(dict(flat), sep="/"), False))


def _flat(tree: dict) -> dict[str, Any]:
    return traverse_util.flatten_dict(tree, sep="/")


def layout_of(tree: Any) -> bool | None:
    """True if `tree` (params, a TrainState, or a flat "/"-joined dict) holds scanned stacks, False if per-layer
    ones, None if no transformer stack."""
    paths = ["/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
             for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    if isinstance(tree, Mapping):
        paths += [k for k in tree if isinstance(k, str)]
    if any(re.search(rf"(^|/){STACKED}/{_BLOCK_PART}/", p) for p in paths):
        return True
    if any(re.search(r"(^|/)block_\d+/", p) for p in paths):
        return False
    return None
