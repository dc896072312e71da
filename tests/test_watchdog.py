"""The step watchdog: a step that takes far longer than the median (or than an absolute bound) ends the process with
exit code 76, naming the step; compilation, warm-up, evals and checkpoint saves are never timed; SLURM requeues on 76.
"""

import re
import subprocess
import sys
import time

import pytest
from test_launch import fake_slurm, start_sbatch  # noqa: F401 - fake_slurm is a fixture

from vlp.train.watchdog import HUNG_EXIT_CODE, StepTimer, StepWatchdog


def timed_steps(timer: StepTimer, durations: list[float], start: float = 0.0, first_step: int = 1) -> float:
    """Reports steps first_step.. finishing after the given durations (the first report arms the timer)."""
    now = start
    timer.finished(first_step, now)
    for i, seconds in enumerate(durations):
        now += seconds
        timer.finished(first_step + 1 + i, now)
    return now


def test_limit_is_factor_times_the_median_after_warmup_with_a_floor():
    timer = StepTimer(factor=10, min_seconds=0.5, warmup_steps=2)
    # Warm-up steps (9 s, 8 s) are not kept; the median of the rest is 0.2 s.
    now = timed_steps(timer, [9.0, 8.0, 0.1, 0.2, 0.3, 0.2, 5.0])
    assert list(timer.durations) == pytest.approx([0.1, 0.2, 0.3, 0.2, 5.0])
    assert timer.median() == pytest.approx(0.2)
    assert timer.limit()[0] == pytest.approx(2.0)
    assert timer.overdue(now + 1.99) is None
    message = timer.overdue(now + 2.5)
    assert message.startswith("step 9 has not finished after 2.5 s (the last finished step is 8; limit 2.0 s = "
                               "max(10 x median step time 0.200 s over the last 5 steps")
    assert f"exiting with code {HUNG_EXIT_CODE}" in message
    # The floor: a fast median never gives a limit below min_seconds.
    fast = StepTimer(factor=10, min_seconds=300, warmup_steps=1)
    now = timed_steps(fast, [1.0, 0.01, 0.01, 0.01])
    assert fast.limit()[0] == 300 and fast.overdue(now + 299) is None and fast.overdue(now + 301)


def test_nothing_is_timed_before_the_first_step_finishes_nor_during_warmup():
    timer = StepTimer(factor=2, min_seconds=0, warmup_steps=3)
    assert timer.overdue(1e6) is None  # the first step (compilation) may take any time
    now = timed_steps(timer, [0.1, 0.1], start=100.0)
    assert timer.median() is None and timer.overdue(now + 1e6) is None  # still warming up: no relative limit
    absolute = StepTimer(factor=2, min_seconds=0, max_step_seconds=30, warmup_steps=3)
    now = timed_steps(absolute, [0.1], start=100.0)
    assert absolute.overdue(now + 29) is None
    assert "limit 30.0 s = watchdog.max_step_seconds=30" in absolute.overdue(now + 31)


def test_pause_excludes_evals_and_saves_and_restarts_the_clock():
    timer = StepTimer(factor=10, min_seconds=0, warmup_steps=1)
    now = timed_steps(timer, [0.1] * 6)  # steps 1..7; median 0.1 s, limit 1 s
    timer.pause()
    assert timer.overdue(now + 1000) is None
    timer.finished(8, now + 500)  # a report while paused is no step time
    assert list(timer.durations) == pytest.approx([0.1] * 5)
    timer.resume(7, now + 1000)
    assert timer.overdue(now + 1000.5) is None
    assert "step 8 has not finished after 1.5 s" in timer.overdue(now + 1001.5)
    # A rollback moves the state back: timing continues from the restored step.
    timer.pause()
    timer.resume(3, now + 2000)
    timer.finished(4, now + 2000.1)
    assert "step 5 has not finished" in timer.overdue(now + 2002)


def test_watchdog_thread_reports_an_overdue_step_and_stops_quietly_otherwise():
    hung = []
    clock = [0.0]
    watchdog = StepWatchdog(StepTimer(factor=10, min_seconds=0, max_step_seconds=5, warmup_steps=1),
                            poll_seconds=0.01, clock=lambda: clock[0], on_hang=hung.append)
    with watchdog:
        watchdog.finished(1)
        with watchdog.paused(lambda: 1):
            clock[0] = 100.0  # an eval of 100 s
            time.sleep(0.1)
        assert hung == []
        clock[0] = 106.0
        deadline = time.monotonic() + 10
        while not hung and time.monotonic() < deadline:
            time.sleep(0.01)
    assert len(hung) == 1 and hung[0].startswith("step 2 has not finished after 6.0 s")
    disabled = StepWatchdog(StepTimer(factor=10, min_seconds=0, max_step_seconds=1), enabled=False,
                            on_hang=hung.append)
    with disabled:
        disabled.finished(1)
        assert disabled._thread is None


HANG_SCRIPT = """
import json, sys, time
sys.path.insert(0, {tests!r})
from conftest import tiny_config
from vlp.train import trainer

real = trainer.make_train_iterator

class Hanging:
    def __init__(self, inner):
        self.inner, self.drawn = inner, 0
    def __iter__(self):
        return self
    def __next__(self):
        self.drawn += 1
        if self.drawn == {hang_batch}:
            print("hanging at batch", self.drawn, flush=True)
            time.sleep(600)  # a peer that never answers
        return next(self.inner)
    def get_state(self):  # checkpointable like the real iterator (grain saves bytes of unknown iterators)
        return json.dumps(self.inner.get_state()).encode()
    def set_state(self, state):
        self.inner.set_state(json.loads(state))

trainer.make_train_iterator = lambda config, objective: Hanging(real(config, objective))
config = tiny_config(**{{"total_steps": "8", "watchdog.min_seconds": "5.0", "watchdog.warmup_steps": "2",
                        "checkpoint_every": "3", "eval_every": "4", "evals.zeroshot.num_examples": "32",
                        "evals.retrieval.num_examples": "32"}})
trainer.train_and_evaluate(config, {workdir!r})
print("finished without the watchdog", flush=True)
"""


def test_a_hung_step_exits_with_code_76_naming_the_step(tmp_path):
    """A run whose 7th batch never arrives: checkpoint saves (steps 3, 6) and an eval (step 4) pass unnoticed, then
    the watchdog ends the process a few seconds into step 7."""
    from conftest import REPO

    script = HANG_SCRIPT.format(tests=str(REPO / "tests"), hang_batch=7, workdir=str(tmp_path / "run"))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == HUNG_EXIT_CODE, output[-3000:]
    assert "hanging at batch 7" in output
    assert "vlp: watchdog: step 7 has not finished after" in output, output[-3000:]
    assert re.search(r"the last finished step is 6; limit [0-9.]+ s = max\(10 x median step time", output)
    hang_to_exit = time.monotonic() - start
    assert hang_to_exit < 200  # far below the 600 s sleep
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["3", "6"]


@pytest.mark.parametrize("restart_count, requeued", [("0", True), ("50", False)])
def test_slurm_requeues_a_hung_run(fake_slurm, tmp_path, restart_count, requeued):  # noqa: F811
    env, slurm_log = fake_slurm
    proc = start_sbatch(dict(env, FAKE_EXIT=str(HUNG_EXIT_CODE), SLURM_RESTART_COUNT=restart_count),
                        tmp_path / "job.out")
    assert proc.wait(timeout=30) == (0 if requeued else HUNG_EXIT_CODE)
    assert ("scontrol requeue 4242" in slurm_log.read_text()) == requeued
    if requeued:
        assert "the watchdog stopped the trainers (76)" in (tmp_path / "job.out").read_text()
