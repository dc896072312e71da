"""Checkpoints through orbax's CheckpointManager: the TrainState and the grain iterator position, saved together.

Saves are asynchronous and atomic (orbax writes to a temporary directory and renames it when complete). Restore
takes the newest step that deserialises; a damaged one is reported, moved aside to `<step>.corrupt` (kept for
inspection, and so that training can write that step again) and the previous one is tried.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grain
import jax
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
        errors, failed = [], []
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
                failed.append(candidate)
                continue
            self._quarantine(failed)
            return candidate, restored["state"]
        raise RuntimeError(f"no restorable checkpoint in {self.directory}: " + "; ".join(errors))

    def _quarantine(self, steps: list[int]) -> None:
        if not steps or jax.process_index() != 0:
            return
        for step in steps:
            path = self.directory / str(step)
            target = path.with_name(f"{step}.corrupt")
            suffix = 1
            while target.exists():
                target, suffix = path.with_name(f"{step}.corrupt{suffix}"), suffix + 1
            path.rename(target)
            log.warning("moved unreadable checkpoint %s to %s", path, target)
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
