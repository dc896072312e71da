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


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, I/O error); the checkpoints already on disk are untouched."""


class Checkpointer:
    """Items per step: `state` (TrainState, sharded arrays) and `data` (the grain iterator state)."""

    def __init__(self, directory: str | Path, *, max_to_keep: int, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self._last_started: int | None = None
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
        """Starts an (async) save of `step`. Raises CheckpointWriteError if this save, or a previous async one,
        failed to write; orbax writes into a temporary directory and renames it only when complete, so a failed
        save never replaces or damages an existing checkpoint."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        previous, self._last_started = self._last_started, step
        try:
            return self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as e:  # noqa: BLE001 - orbax re-raises I/O errors of its background threads here
            raise self._write_error(step if previous is None else f"{step} (or the pending save of {previous})",
                                    e) from e

    def _write_error(self, step: int | str, error: Exception) -> Exception:
        cause = error
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            return error
        return CheckpointWriteError(cause.errno, f"could not write the checkpoint of step {step} to "
                                                 f"{self.directory}: {cause.strerror or cause}")

    def restore(self, abstract_state: Any, data_iterator: Any | None = None,
                step: int | None = None) -> tuple[int, Any]:
        """Restores `step` (default: the newest good one) into shardings of `abstract_state`.

        `data_iterator` (if given) is moved to the saved position in place. Returns (step, state).
        """
        steps = [step] if step is not None else list(reversed(self.all_steps()))
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if data_iterator is not None:
            self._check_process_count(steps[0])
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

    def _check_process_count(self, step: int) -> None:
        """Each process saves its own data-iterator position; another process count cannot map them (and that is
        not damage: the checkpoint must not be moved aside)."""
        saved = sorted((self.directory / str(step) / "data").glob("process_*-of-*.json"))
        counts = {path.stem.rsplit("-of-", 1)[1] for path in saved}
        if counts and counts != {str(jax.process_count())}:
            raise RuntimeError(
                f"checkpoint step {step} in {self.directory} was written by {counts.pop()} process(es) and this run "
                f"has {jax.process_count()}: the data iterator positions are per process, so the exact data order "
                f"cannot continue. Resume with the same process count (the device count and mesh may differ), or "
                f"start a new run from these params with init_from.path={str(self.directory.parent)!r}")

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

    def restore_params(self, abstract_params: Any) -> tuple[int, Any]:
        """(step, params) of the newest checkpoint, onto the shapes and shardings of `abstract_params`."""
        step = self.latest_step()
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item={"params": abstract_params}, partial_restore=True,
                                         restore_args=jax.tree.map(
                                             lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding),
                                             {"params": abstract_params}))))
        return step, restored["state"]["params"]

    def wait(self) -> None:
        """Blocks until pending async saves are written; raises CheckpointWriteError if one failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._write_error(self._last_started, e) from e

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
