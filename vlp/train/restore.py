"""Loading a run's params for tools (eval, export): the workdir's config, the experiment, a restored state."""

from __future__ import annotations

from typing import Any

import ml_collections
from etils import epath

from vlp.train.checkpoint import Checkpointer
from vlp.train.frozen import attach_reference, without_reference
from vlp.train.trainer import Experiment, build_experiment
from vlp.train.workdir import load_config


def restore_run(workdir: epath.PathLike, overrides: dict[str, str] | None = None, step: int | None = None,
                config: ml_collections.ConfigDict | None = None) -> tuple[Experiment, int, Any]:
    """(experiment, step, TrainState) of a workdir's newest good (or the given) checkpoint. A frozen reference model
    (config.reference) is not in checkpoints and not loaded (the tools need the run's own params only), unless the
    objective's evaluation reads it (`eval_reads_reference`): then it is loaded and its fingerprint checked."""
    workdir = epath.Path(workdir)
    config = config if config is not None else load_config(workdir, overrides)
    exp = build_experiment(config)
    checkpoints = workdir / "checkpoints"
    if not checkpoints.is_dir():
        raise FileNotFoundError(f"no checkpoints in {workdir}: train first (python -m vlp.train ... "
                                f"--workdir={workdir})")
    checkpointer = Checkpointer(checkpoints, max_to_keep=config.keep_checkpoints, async_save=False)
    try:
        restored_step, state = checkpointer.restore(without_reference(exp.abstract_state), None, step)
    finally:
        checkpointer.close()
    if exp.objective.eval_reads_reference:
        with exp.context():
            state = attach_reference(exp.objective.reference, state, exp.state_shardings.extra, resumed=True)
    return exp, restored_step, state
