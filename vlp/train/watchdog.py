"""Step watchdog: gloo and NCCL collectives never time out, so one hung peer (or a stuck read) blocks every process
of a job forever. A daemon thread notices a training step that takes far longer than usual, logs the step, how long
it has waited and the median step time, and ends the process with `HUNG_EXIT_CODE`, so the launcher's requeue takes
over (launch/slurm.sbatch requeues on it as on a preemption; the rerun resumes from the newest checkpoint).

`os._exit` is the only way out: a thread blocked in a collective cannot be interrupted politely. In a multi-process
job the healthy processes wait on the same collective, so their watchdogs trip too and the whole job stops.
"""

from __future__ import annotations

import collections
import contextlib
import os
import statistics
import sys
import threading
import time
from typing import Callable, Iterator

import ml_collections
from absl import logging

# EX_PROTOCOL from sysexits.h: a peer stopped answering. Next to PREEMPTED_EXIT_CODE = 75 (vlp/train/preemption.py),
# the other "requeue me" code.
HUNG_EXIT_CODE = 76


class StepTimer:
    """The watchdog's timing rule, without a thread or a clock of its own (times are passed in, so tests need no
    sleeping).

    The trainer reports each step it knows is finished. The first report arms the timer (the first step's compile is
    never timed); the next `warmup_steps` step times are not kept (more compilation, caches warming up); later ones
    feed a median over the last `window`. A step is overdue when the time since the last finished step (or since the
    end of a pause) exceeds max(factor x median, min_seconds), or max_step_seconds (> 0) from the moment the timer is
    armed. While paused (evals, checkpoint saves, rollbacks) nothing is overdue and nothing is measured.
    """

    def __init__(self, factor: float, min_seconds: float, max_step_seconds: float = 0.0, warmup_steps: int = 5,
                 window: int = 100):
        self.factor, self.min_seconds, self.max_step_seconds = factor, min_seconds, max_step_seconds
        self.warmup_steps = warmup_steps
        self.durations: collections.deque[float] = collections.deque(maxlen=window)
        self._since: float | None = None  # when the clock of the current step started; None: not armed
        self._last_step: int | None = None
        self._seen = 0  # step times measured so far, warm-up included
        self._paused = False

    def finished(self, step: int, now: float) -> None:
        """`step` is known to be complete at time `now` (repeated or older reports are ignored)."""
        if self._paused or (self._last_step is not None and step <= self._last_step):
            return
        if self._since is not None and self._last_step is not None:
            self._seen += 1
            if self._seen > self.warmup_steps:
                self.durations.append((now - self._since) / (step - self._last_step))
        self._since, self._last_step = now, step

    def pause(self) -> None:
        self._paused = True

    def resume(self, step: int, now: float) -> None:
        """Timing goes on after a pause; the training state is now at `step` (a rollback may have moved it back)."""
        self._paused = False
        if self._since is not None:  # still unarmed before the first finished step: the compile is not timed
            self._since, self._last_step = now, step

    def median(self) -> float | None:
        return statistics.median(self.durations) if self.durations else None

    def limit(self) -> tuple[float, str] | None:
        """(seconds, how it was computed), or None while no rule applies yet."""
        limits = []
        median = self.median()
        if median is not None:
            limits.append((max(self.factor * median, self.min_seconds),
                           f"max({self.factor:g} x median step time {median:.3f} s over the last "
                           f"{len(self.durations)} steps, watchdog.min_seconds={self.min_seconds:g})"))
        if self.max_step_seconds > 0:
            limits.append((self.max_step_seconds, f"watchdog.max_step_seconds={self.max_step_seconds:g}"))
        return min(limits) if limits else None

    def overdue(self, now: float) -> str | None:
        """A message naming the stalled step when the current step is overdue at `now`, else None."""
        if self._paused or self._since is None:
            return None
        limit = self.limit()
        elapsed = now - self._since
        if limit is None or elapsed <= limit[0]:
            return None
        return (f"step {self._last_step + 1} has not finished after {elapsed:.1f} s (the last finished step is "
                f"{self._last_step}; limit {limit[0]:.1f} s = {limit[1]}): a peer process, a collective or the input "
                f"pipeline is probably hung; exiting with code {HUNG_EXIT_CODE} so that the launcher requeues the job "
                f"(the rerun resumes from the newest checkpoint)")


def _exit_hung(message: str) -> None:
    """Every process reports for itself (a hung peer may be any of them), then exits at once."""
    logging.error("watchdog: %s", message)
    print(f"vlp: watchdog: {message}", file=sys.stderr, flush=True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(HUNG_EXIT_CODE)


class StepWatchdog:
    """A daemon thread that polls a StepTimer; a context manager (the thread runs inside the `with`).

    `finished`, `paused` are called by the training loop; with `enabled=False` they do nothing and no thread starts.
    """

    def __init__(self, timer: StepTimer, *, enabled: bool = True, poll_seconds: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, on_hang: Callable[[str], None] = _exit_hung):
        self.timer, self.enabled, self.poll_seconds = timer, enabled, poll_seconds
        self._clock, self._on_hang = clock, on_hang
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "StepWatchdog":
        """From the `watchdog` config block (see vlp/config.py)."""
        timer = StepTimer(config.factor, config.min_seconds, config.max_step_seconds, config.warmup_steps)
        # Poll often enough that a short absolute limit is noticed promptly; once a second is plenty otherwise.
        poll = min(1.0, config.max_step_seconds / 10) if config.max_step_seconds > 0 else 1.0
        return cls(timer, enabled=config.enabled, poll_seconds=poll)

    def finished(self, step: int) -> None:
        if self.enabled:
            with self._lock:
                self.timer.finished(step, self._clock())

    @contextlib.contextmanager
    def paused(self, step_after: Callable[[], int]) -> Iterator[None]:
        """No timing inside (evals, saves, rollbacks); `step_after()` is the state's step when the pause ends."""
        if self.enabled:
            with self._lock:
                self.timer.pause()
        try:
            yield
        finally:
            if self.enabled:
                with self._lock:
                    self.timer.resume(step_after(), self._clock())

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            with self._lock:
                message = self.timer.overdue(self._clock())
            if message:
                self._on_hang(message)
                return

    def __enter__(self) -> "StepWatchdog":
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="vlp-step-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
