"""Preemption notices: TPU VMs, GKE and SLURM (`--requeue`, `--signal`) send SIGTERM before they take the machine.

The trainer asks `reached(step)` after every step; when it says yes, the trainer saves a checkpoint, waits for it
and exits with `PREEMPTED_EXIT_CODE`, so rerunning the same command continues from exactly that step.

- One process: a SIGTERM handler sets a flag (the default action, dying mid-step, is what we avoid).
- Several processes: `jax.distributed` installs its own preemption notifier; `reached_preemption_sync_point` makes
  every process answer yes at the same step, even though only some of them received the signal.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
from jax.experimental import multihost_utils

# EX_TEMPFAIL from sysexits.h: "try again later"; schedulers' requeue hooks (launch/slurm.sbatch) look for it.
PREEMPTED_EXIT_CODE = 75
# The other "requeue me" code: 76 (vlp.train.watchdog.HUNG_EXIT_CODE), a step hung and the watchdog ended the process.


class Preempted(Exception):
    """Raised by the trainer after the preemption checkpoint is safely written."""

    def __init__(self, step: int):
        super().__init__(f"preempted at step {step}: the checkpoint of step {step} is saved; run the same command "
                         f"again to resume from it")
        self.step = step


class PreemptionWatch:
    """Tells the training loop when to stop for a preemption notice; a context manager (restores the handler)."""

    def __init__(self) -> None:
        self.notice = False
        self._previous: Any = None
        self._multi_process = jax.process_count() > 1
        if not self._multi_process and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        del signum, frame
        self.notice = True

    def reached(self, step: int) -> bool:
        """True when the job must stop after `step` (the same answer on every process)."""
        if self._multi_process:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.notice

    def __enter__(self) -> "PreemptionWatch":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
