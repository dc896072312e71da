"""Frozen reference models: a model (config + params) read from a vlp workdir onto a run's mesh, sharded like the
run's own params, with no optimizer state. EVA's teacher uses it; distillation, Mod-X, XBT and CLIM can too.

A low layer: it reads checkpoints and configs and never imports the trainer, so objectives may call it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from etils import epath
from jax.sharding import Mesh

from vlp import config as vlp_config
from vlp.parallel import sharding
from vlp.train.checkpoint import Checkpointer


@dataclasses.dataclass(frozen=True)
class FrozenModel:
    """`objective` builds the model and its encoders from `config`; `params` are placed on the run's mesh."""

    config: ml_collections.ConfigDict
    objective: Any
    params: Any
    step: int


def build_objective(config: ml_collections.ConfigDict) -> Any:
    """The objective (model + encoders) a run's config describes; nothing is initialised."""
    from vlp.objectives import get_objective  # objectives import this module

    return get_objective(config.objective)(config)


def abstract_params(objective: Any, mesh: Mesh, rules: sharding.LogicalRules) -> Any:
    """ShapeDtypeStructs of `objective.init`'s params with the shardings the logical `rules` give on `mesh` (the
    ones a student with these params would get)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(objective.init, jax.random.key(0))
    shardings = sharding.logical_shardings(boxed, mesh, rules)
    return with_shardings(sharding.strip_boxes(boxed), shardings)


def with_shardings(shapes: Any, shardings: Any) -> Any:
    """A tree of ShapeDtypeStructs carrying `shardings` (a tree of the same structure)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def restore_params(source: epath.PathLike, abstract: Any) -> tuple[int, Any]:
    """(step, params) of a vlp workdir's (or its checkpoints directory's) newest checkpoint, onto `abstract`'s
    shapes and shardings (so they may come from another mesh or process count). Optimizer state, the extra state
    and the data position are not read."""
    directory = epath.Path(source)
    if (directory / "checkpoints").is_dir():
        directory = directory / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"{str(source)!r}: no such directory; give a vlp workdir or its checkpoints/ "
                                f"directory")
    checkpointer = Checkpointer(directory, max_to_keep=1000, async_save=False)
    try:
        if checkpointer.latest_step() is None:
            raise FileNotFoundError(f"{str(source)!r}: no checkpoint in {directory}")
        return checkpointer.restore_params(abstract)
    finally:
        checkpointer.close()


def load_frozen_model(workdir: epath.PathLike, mesh: Mesh, rules: sharding.LogicalRules) -> FrozenModel:
    """The model of a vlp workdir (its config.json and newest checkpoint's params), its params sharded on `mesh`
    by the logical `rules` (pass the run's own: then the frozen model is sharded like a student of its shape)."""
    config = vlp_config.load_json(epath.Path(workdir) / "config.json")
    objective = build_objective(config)
    step, params = restore_params(workdir, abstract_params(objective, mesh, rules))
    return FrozenModel(config, objective, params, step)
