"""Checkpoints through orbax's CheckpointManager: the TrainState and the grain iterator position, saved together.

Saves are asynchronous and atomic (orbax writes to a temporary directory and renames it when complete). Restore
takes the newest step that deserialises; a damaged one is reported and the previous one is tried.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grain
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    """Items per step: `state` (TrainState, sharded arrays) and `data` (the grain iterator state)."""

    def __init__(self, directory: str | Path, *, max_to_keep: int, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_names=("state", "data"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True),
        )

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any | None, *, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_state: Any, data_iterator: Any | None = None,
                step: int | None = None) -> tuple[int, Any]:
        """Restores `step` (default: the newest good one) into shardings of `abstract_state`.

        `data_iterator` (if given) is moved to the saved position in place. Returns (step, state).
        """
        steps = [step] if step is not None else list(reversed(self.all_steps()))
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        errors = []
        for candidate in steps:
            items = {"state": ocp.args.StandardRestore(abstract_state)}
            if data_iterator is not None:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            try:
                restored = self.manager.restore(candidate, args=ocp.args.Composite(**items))
            except Exception as e:  # noqa: BLE001 - any failure to read means: try the previous step
                log.warning("checkpoint step %d in %s cannot be restored (%s: %s); trying the previous one",
                            candidate, self.directory, type(e).__name__, str(e).splitlines()[0][:300])
                errors.append(f"step {candidate}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                continue
            return candidate, restored["state"]
        raise RuntimeError(f"no restorable checkpoint in {self.directory}: " + "; ".join(errors))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
