"""Checkpoints through orbax's CheckpointManager: the TrainState and the grain iterator position, saved together.

Saves are asynchronous and atomic (orbax writes to a temporary directory and renames it when complete).

Restore takes the newest step that every process can read, by this rule:
- Each process reads the step's state arrays and its own data-iterator position; a failed read is retried
  (`read_attempts` tries in all, waiting `retry_backoff_seconds` x 1, 2, 4, ... between them).
- A failure is *damage* when it says the bytes on disk are missing or wrong: a missing file or item
  (FileNotFoundError, KeyError), JSON that does not parse, array data that does not decode or a tree that does not
  match the run's state (ValueError; tensorstore reports these as DATA_LOSS / NOT_FOUND / INVALID_ARGUMENT /
  OUT_OF_RANGE / FAILED_PRECONDITION). Damage is not retried. Measured with orbax 0.12 / tensorstore: a truncated
  array file gives ValueError OUT_OF_RANGE or DATA_LOSS, a deleted one NOT_FOUND, a garbled _METADATA or data-position
  file json.JSONDecodeError, a deleted data-position file ValueError, a missing item directory KeyError.
- Anything else is *transient* (an I/O error such as EIO, ETIMEDOUT or ENOSPC, out of memory, a tensorstore
  UNKNOWN / UNAVAILABLE / DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED status or any "[OS error N" other than ENOENT,
  an unknown exception): after the last try the restore stops with CheckpointReadError, which names the step and
  the error, and nothing is moved.
- The processes exchange their outcome per step (one small all-gather) and act on it together: all restore the same
  step; if any process hit a transient error, all stop; if any found damage, all try the previous step. Only after
  a good step is agreed does process 0 move the damaged newer steps aside to `<step>.corrupt` (kept for inspection,
  and so that training can write that step again), and only then is the data iterator moved to the saved position:
  a restore that fails leaves the iterator where it was. If no step is readable, UnrestorableCheckpointError lists
  the damaged steps and nothing is moved (`quarantine` moves them when the caller starts afresh).
"""

from __future__ import annotations

import errno
import json
import logging
import re
import time
from typing import Any, Callable

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from vlp.models.layout import layout_of, restack
from vlp.train.paths import as_path

log = logging.getLogger(__name__)


def convert_layout(tree: Any, abstract: Any) -> Any:
    """`tree` (restored arrays) in the layer layout of `abstract` (ShapeDtypeStructs with shardings), placed on
    those shardings; `tree` itself when the layouts already agree."""
    wanted = layout_of(abstract)
    if wanted is None or layout_of(tree) in (None, wanted):
        return tree
    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    return jax.jit(lambda t: restack(t, wanted), out_shardings=shardings)(tree)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, I/O error); the checkpoints already on disk are untouched."""


class CheckpointReadError(OSError):
    """A checkpoint could not be read for a reason other than damage (I/O error, out of memory) even after retries;
    nothing was moved, so a later restart can read it once the cause is gone."""


class UnrestorableCheckpointError(RuntimeError):
    """Every candidate checkpoint is damaged (on at least one process); `damaged_steps` lists them, newest first."""

    def __init__(self, message: str, damaged_steps: list[int]):
        super().__init__(message)
        self.damaged_steps = damaged_steps


# tensorstore (and XLA) errors start with an absl status code; these mean the stored bytes are missing or wrong.
_DAMAGE_STATUS = ("DATA_LOSS", "NOT_FOUND", "INVALID_ARGUMENT", "OUT_OF_RANGE", "FAILED_PRECONDITION",
                  "ALREADY_EXISTS", "UNIMPLEMENTED")
_ABSL_CODES = _DAMAGE_STATUS + ("UNKNOWN", "INTERNAL", "ABORTED", "CANCELLED", "UNAVAILABLE", "DEADLINE_EXCEEDED",
                                 "RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "UNAUTHENTICATED")
_STATUS = re.compile(r"^([A-Z_]+): ")
_OS_ERROR = re.compile(r"\[OS error (\d+)")


def is_damage(error: BaseException) -> bool:
    """True if `error` (raised while reading a checkpoint) says its files are missing or corrupt; False for
    transient causes (I/O errors, out of memory, unknown errors), which are retried and never quarantined."""
    if isinstance(error, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return True
    if isinstance(error, (OSError, MemoryError)):  # EIO, ETIMEDOUT, ENOSPC, EACCES, a dropped connection, ...
        return False
    if not isinstance(error, (ValueError, KeyError, TypeError)):
        return False
    if error.__cause__ is not None and not is_damage(error.__cause__):  # e.g. an I/O error re-raised as ValueError
        return False
    message = str(error)
    os_error = _OS_ERROR.search(message)  # tensorstore wraps the errno of a failed system call
    if os_error:
        return int(os_error.group(1)) == errno.ENOENT
    status = _STATUS.match(message)
    if status and status.group(1) in _ABSL_CODES:
        return status.group(1) in _DAMAGE_STATUS
    return True  # JSON that does not parse, a missing item, a tree or shape that does not match


_OK, _DAMAGED, _TRANSIENT = 0, 1, 2


class Checkpointer:
    """Items per step: `state` (TrainState, sharded arrays) and `data` (the grain iterator state)."""

    def __init__(self, directory: epath.PathLike, *, max_to_keep: int, async_save: bool = True, read_attempts: int = 3,
                 retry_backoff_seconds: float = 1.0):
        if read_attempts < 1:
            raise ValueError(f"read_attempts={read_attempts} is not valid: give 1 or more")
        self.directory = as_path(directory)  # local or a URL (gs://...): orbax writes to either directly
        self.read_attempts, self.retry_backoff_seconds = read_attempts, retry_backoff_seconds
        self._state_reader, self._params_reader = ocp.StandardCheckpointHandler(), ocp.PyTreeCheckpointHandler()
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
        """Restores `step` (default: the newest step every process can read) into shardings of `abstract_state`.

        `data_iterator` (if given) is moved to the saved position in place, only once a step is agreed. Returns
        (step, state). Raises CheckpointReadError (transient, nothing moved) or UnrestorableCheckpointError.
        """
        steps = [step] if step is not None else list(reversed(self.all_steps()))
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if data_iterator is not None:
            self._check_process_count(steps[0])
        step, state, damaged = self._newest_readable(steps, self._train_state_reader(abstract_state,
                                                                                      data_iterator is not None))
        if data_iterator is not None:  # only now: a failed restore leaves the iterator where it was
            grain.checkpoint.CheckpointHandler().restore(
                self.directory / str(step) / "data", args=grain.checkpoint.CheckpointRestore(data_iterator))
        self.quarantine(damaged)
        return step, state

    def restore_params(self, abstract_params: Any) -> tuple[int, Any]:
        """(step, params) of the newest checkpoint every process can read, onto the shapes and shardings of
        `abstract_params`. Damaged steps are skipped, never moved: this directory may belong to another run."""
        steps = list(reversed(self.all_steps()))
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        def read(path: epath.Path) -> Any:
            tree = {"params": self._in_saved_layout(path, abstract_params)}
            args = ocp.args.PyTreeRestore(item=tree, partial_restore=True, restore_args=jax.tree.map(
                lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), tree))
            return convert_layout(self._params_reader.restore(path / "state", args=args)["params"], abstract_params)

        step, params, _ = self._newest_readable(steps, read)
        return step, params

    def _in_saved_layout(self, path: epath.Path, abstract: Any) -> Any:
        """`abstract` with its transformer stacks in the layout of the checkpoint at `path` (scanned or per-layer:
        a run may change model.scan_layers between its checkpoints, or read another run's)."""
        saved = layout_of(self._params_reader.metadata(path / "state").tree)
        wanted = layout_of(abstract)
        if saved is None or wanted is None or saved == wanted:
            return abstract
        log.warning("checkpoint %s holds %s layer params; converting them for model.scan_layers=%s", path,
                    "scanned (stacked)" if saved else "per-layer", wanted)
        return restack(abstract, saved)

    def _train_state_reader(self, abstract_state: Any, with_data: bool) -> Callable[[epath.Path], Any]:
        def read(path: epath.Path) -> Any:
            saved_layout = self._in_saved_layout(path, abstract_state)
            state = self._state_reader.restore(path / "state", args=ocp.args.StandardRestore(saved_layout))
            if saved_layout is not abstract_state:  # params and optimizer moments alike
                state = convert_layout(state, abstract_state)
            if with_data:  # this process's position; it is applied to the iterator after the agreement
                json.loads((path / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json")
                           .read_text())
            return state

        return read

    def _newest_readable(self, steps: list[int], read: Callable[[epath.Path], Any]) -> tuple[int, Any, list[int]]:
        """(step, what `read` gave, the damaged newer steps) for the first of `steps` that every process read.

        Handlers are called directly, not through the manager, whose restore ends in a cross-process barrier that
        a process with a failed read would never reach; the outcome exchange is the only collective here.
        """
        errors, damaged = [], []
        for candidate in steps:
            value, error = self._read(candidate, read)
            outcome = _OK if error is None else _DAMAGED if is_damage(error) else _TRANSIENT
            outcomes = self._all_processes(outcome)
            if (outcomes == _TRANSIENT).any():
                raise self._read_error(candidate, error, np.flatnonzero(outcomes == _TRANSIENT).tolist(), damaged)
            if not (outcomes == _DAMAGED).any():
                return candidate, value, damaged
            why = (f"{type(error).__name__}: {str(error).splitlines()[0][:300]}" if error is not None else
                   f"damaged on process(es) {np.flatnonzero(outcomes == _DAMAGED).tolist()}")
            log.warning("checkpoint step %d in %s cannot be restored (%s); trying the previous one",
                        candidate, self.directory, why)
            errors.append(f"step {candidate}: {why}")
            damaged.append(candidate)
        raise UnrestorableCheckpointError(f"no restorable checkpoint in {self.directory}: " + "; ".join(errors),
                                          damaged)

    def _read(self, step: int, read: Callable[[epath.Path], Any]) -> tuple[Any, Exception | None]:
        """(read(step dir), None), or (None, the error) after `read_attempts` tries; damage is not retried."""
        path = self.directory / str(step)
        for attempt in range(1, self.read_attempts + 1):
            try:
                return read(path), None
            except Exception as e:  # noqa: BLE001 - classified by is_damage
                if is_damage(e) or attempt == self.read_attempts:
                    return None, e
                wait_seconds = self.retry_backoff_seconds * 2 ** (attempt - 1)
                log.warning("reading checkpoint step %d in %s failed (%s: %s); try %d of %d in %.1f s", step,
                            self.directory, type(e).__name__, str(e).splitlines()[0][:300], attempt + 1,
                            self.read_attempts, wait_seconds)
                time.sleep(wait_seconds)
        raise AssertionError("unreachable")

    @staticmethod
    def _all_processes(outcome: int) -> np.ndarray:
        """Every process's outcome for the same step, indexed by process."""
        if jax.process_count() == 1:
            return np.array([outcome])
        return np.asarray(multihost_utils.process_allgather(np.array([outcome], np.int32))).reshape(-1)

    def _read_error(self, step: int, error: Exception | None, processes: list[int],
                    damaged: list[int]) -> CheckpointReadError:
        what = (f"{type(error).__name__}: {str(error).splitlines()[0][:300]}" if error is not None else
                f"a transient error on process(es) {processes} (see their logs)")
        also = f"; steps {damaged} looked damaged" if damaged else ""
        return CheckpointReadError(
            getattr(error, "errno", None) or errno.EIO,
            f"could not read checkpoint step {step} in {self.directory} after {self.read_attempts} tries: {what}. "
            f"This is not damage (an I/O error, out of memory, ...), so nothing was moved{also}; fix the cause and "
            f"restart to resume from it")

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

    def quarantine(self, steps: list[int]) -> None:
        """Process 0 moves these (damaged) steps aside to `<step>.corrupt`; every process then sees them gone."""
        if not steps:
            return
        for step in steps if jax.process_index() == 0 else ():
            path = self.directory / str(step)
            target = path.with_name(f"{step}.corrupt")
            suffix = 1
            while target.exists():
                target, suffix = path.with_name(f"{step}.corrupt{suffix}"), suffix + 1
            path.rename(target)
            log.warning("moved unreadable checkpoint %s to %s", path, target)
        if jax.process_count() > 1:  # the others list the steps only after process 0 has moved them
            multihost_utils.sync_global_devices("vlp checkpoint quarantine")
        self.manager.reload()

    def wait(self) -> None:
        """Blocks until pending async saves are written; raises CheckpointWriteError if one failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._write_error(self._last_started, e) from e

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
        self._state_reader.close()
        self._params_reader.close()
