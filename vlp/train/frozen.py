"""Frozen reference models: a model (config + params) read from a vlp workdir onto a run's mesh, sharded like the
run's own params, with no optimizer state. `Reference` (config.reference: a vlp workdir or an export) is the one
mechanism for a frozen model beside the trained params: distillation's teacher, Mod-X's previous phase, EVA's
teacher, the prompt objective's CLIP. It is never checkpointed: reloaded at every start and checked by fingerprint.

A low layer: it reads checkpoints and configs and never imports the trainer, so objectives may call it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
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


# ---- reference models (config.reference) --------------------------------------------------------------------------
# An objective that reads a frozen model (a distillation teacher, Mod-X's previous phase) builds a `Reference` from
# the run's config and keeps the model's params in TrainState.extra[REFERENCE_KEY], so they are sharded like the
# student (by the same logical rules), passed to the jitted step beside the params, and never seen by the optimizer.
# The trainer drops them from every checkpoint (`without_reference`) and loads them again at every start
# (`attach_reference`); extra[FINGERPRINT_KEY] (sha256 of the reference's files, as 8 uint32 words) is
# checkpointed, so a resume against a changed reference fails instead of silently training against another model.

REFERENCE_KEY = "reference"
FINGERPRINT_KEY = "reference_fingerprint"
FINGERPRINT_WORDS = 8  # sha256 = 8 x 32 bits


class ReferenceMismatchError(ValueError):
    """The reference model found at resume is not the one the run's checkpoints were trained against."""


def _files(path: epath.Path) -> list[epath.Path]:
    """Every regular file under `path` (itself if a file), sorted by name."""
    if not path.is_dir():
        return [path]
    found = []
    for child in sorted(path.iterdir(), key=lambda p: p.name):
        found.extend(_files(child))
    return found


def fingerprint_files(root: epath.PathLike, files: list[epath.Path]) -> str:
    """sha256 (hex) of the files' paths relative to `root` and their contents, in the given order."""
    digest = hashlib.sha256()
    root = epath.Path(root)
    for file in files:
        digest.update(str(file.relative_to(root) if file != root else file.name).encode() + b"\0")
        with file.open("rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def fingerprint_words(hex_digest: str) -> np.ndarray:
    """A sha256 hex digest as FINGERPRINT_WORDS uint32 words (a checkpointable array)."""
    return np.frombuffer(bytes.fromhex(hex_digest), dtype=">u4").astype(np.uint32)


def _reference_files(fmt: str, path: str, step: int | None) -> tuple[epath.Path, list[epath.Path]]:
    """(root, the files that make up the reference): for a vlp workdir its config.json and the params of the
    checkpoint `step`; for an export its folder (or the file and the config files beside it)."""
    source = epath.Path(path)
    if fmt == "vlp":
        workdir = source.parent if source.name == "checkpoints" else source
        state = workdir / "checkpoints" / str(step) / "state"
        return workdir, [workdir / "config.json", *_files(state)]
    if source.is_dir():
        return source, _files(source)
    beside = [source.with_name(n) for n in ("model_config.json", "open_clip_config.json", "config.json")]
    return source.parent, [source, *(f for f in beside if f.is_file())]


def reference_config(run_config: ml_collections.ConfigDict,
                     block: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """The reference model's resolved config: `reference.config` (recorded at the run's first start), else read from
    the source: a vlp workdir's config.json; an export's model description (safetensors: model_config.json; hf and
    open_clip: their config files) over a copy of the run's config (data, tokenizer and evals stay the run's).
    `block`: another block of the same keys (format, path, config) naming the model; default `run_config.reference`."""
    block = run_config.reference if block is None else block
    if block.config:
        return vlp_config.from_dict(json.loads(block.config))
    if not block.path:
        raise ValueError(f"objective {run_config.objective!r} needs a frozen reference model: set reference.path "
                         f"(and reference.format, one of {vlp_config.INIT_FROM_FORMATS}); e.g. the workdir of a "
                         f"configs/clip.py:tiny run")
    if block.format == "vlp":
        workdir = epath.Path(block.path)
        workdir = workdir.parent if workdir.name == "checkpoints" else workdir
        return vlp_config.load_json(workdir / "config.json")
    from vlp.export.load import checkpoint_overrides
    from vlp.export.safetensors_io import load_safetensors
    from vlp.train.init_from import apply_checkpoint_overrides

    config = vlp_config.from_dict(run_config.to_dict())
    config.reference.update(format="vlp", path="", config="")
    if block.format == "safetensors":
        _, described = load_safetensors(block.path)
        if "model" not in described:
            raise ValueError(f"reference.path={block.path!r}: its model_config.json has no 'model' entry; give a "
                             f"folder written by tools/export.py --format=safetensors or tools/import.py")
        vlp_config._update_locked(config.model, described["model"])
        config.objective = described.get("objective", config.objective)
        config.data.image_size = described.get("image_size", config.data.image_size)
    else:
        apply_checkpoint_overrides(config, checkpoint_overrides(block.format, block.path))
    return config


class Reference:
    """A frozen reference model described by a run's `config.reference`: its objective (model and encoders, built
    from the reference's own config, so it may differ from the student: a bigger teacher) and its loading."""

    def __init__(self, run_config: ml_collections.ConfigDict, block: ml_collections.ConfigDict | None = None):
        """`block`: the (format, path, config) keys naming the model; default `run_config.reference` (XBT also
        reads its frozen new model this way, from its own block)."""
        block = run_config.reference if block is None else block
        self.config = reference_config(run_config, block)
        self.format, self.path = block.format, block.path
        if not block.config:  # recorded in the run's config.json: eval and export read it there
            block.config = vlp_config.to_json(self.config)
        self.objective = build_objective(self.config)

    def init_extra(self) -> dict[str, Any]:
        """Stand-ins of the extra entries (boxed: the reference's logical names give its shardings); the trainer
        replaces them with `attach_reference` before the first step."""
        return {REFERENCE_KEY: self.objective.init(jax.random.key(0)),
                FINGERPRINT_KEY: jnp.zeros((FINGERPRINT_WORDS,), jnp.uint32)}

    def initial_extra(self, shardings: Any) -> dict[str, Any]:
        """The extra entries before `attach_reference`: a zero fingerprint on its sharding, no params (they are
        loaded next; an objective's `initial_extra` may return this instead of initialising a random model)."""
        return {FINGERPRINT_KEY: jax.device_put(np.zeros((FINGERPRINT_WORDS,), np.uint32), shardings[FINGERPRINT_KEY])}

    def load(self, shardings: Any) -> tuple[Any, str]:
        """(params placed on `shardings`, the fingerprint of the files they were read from)."""
        if not self.path:
            raise ValueError("reference.path is empty: a run that reads a reference model loads it at every start "
                             "(it is not kept in the checkpoints); set reference.path to the same model")
        shapes = sharding.strip_boxes(jax.eval_shape(self.objective.init, jax.random.key(0)))
        abstract = with_shardings(shapes, shardings)
        if self.format == "vlp":
            step, params = restore_params(self.path, abstract)
        else:
            from vlp.train.init_from import load_exported_params

            step, params = None, load_exported_params(self.format, self.path, self.objective, abstract)
        root, files = _reference_files(self.format, self.path, step)
        return params, fingerprint_files(root, files)


def without_reference(state: Any) -> Any:
    """`state` (a TrainState or its abstract form) without the reference params: what a checkpoint holds."""
    extra = state.extra
    if not isinstance(extra, dict) or REFERENCE_KEY not in extra:
        return state
    return state.replace(extra={k: v for k, v in extra.items() if k != REFERENCE_KEY})


def attach_reference(reference: Reference, state: Any, extra_shardings: Any, resumed: bool) -> Any:
    """`state` with the reference params loaded onto `extra_shardings[REFERENCE_KEY]` and its fingerprint. A
    `resumed` state's checkpointed fingerprint must equal the reference's, else ReferenceMismatchError."""
    params, hex_digest = reference.load(extra_shardings[REFERENCE_KEY])
    words = fingerprint_words(hex_digest)
    if resumed:
        # Replicated: every process reads its own copy (no collective; the same on every process).
        saved = np.asarray(state.extra[FINGERPRINT_KEY].addressable_shards[0].data).reshape(FINGERPRINT_WORDS)
        if not np.array_equal(saved, words):
            saved_hex = saved.astype(">u4").tobytes().hex()
            raise ReferenceMismatchError(
                f"reference.path={reference.path!r} ({reference.format}) is not the reference model this run was "
                f"trained against: its fingerprint is sha256 {hex_digest[:16]}..., the checkpoint's "
                f"{saved_hex[:16]}... (the reference's files changed, e.g. a teacher run that trained on). Point "
                f"reference.path at the original model, or start a new workdir")
    fingerprint = jax.device_put(words, extra_shardings[FINGERPRINT_KEY])
    return state.replace(extra=dict(state.extra, **{REFERENCE_KEY: params, FINGERPRINT_KEY: fingerprint}))
