"""Preemption: on SIGTERM the trainer finishes the step, saves a checkpoint, waits for it and exits with code 75;
rerunning the same command continues from exactly that step. With 2 processes, a SIGTERM to one of them stops both
at the same step (JAX's preemption sync point)."""

import os
import re
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
from conftest import tiny_config
from test_distributed import REPO, TINY_TRAIN_ARGS, clean_env, free_port, train_losses, without_evals

from vlp.parallel import sharding
from vlp.train.metrics import read_jsonl
from vlp.train.preemption import PREEMPTED_EXIT_CODE, Preempted
from vlp.train.trainer import train_and_evaluate

SIGTERM_AT_BATCH = 4  # seeded choice of "a random step" (any step of the run works the same way)


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_compilation_cache")


def test_sigterm_saves_and_the_rerun_continues_exactly(tmp_path, monkeypatch):
    config = tiny_config(**{"checkpoint_every": 1000})
    config.evals = {}  # losses and the resume step are checked: no eval compiles
    reference = train_and_evaluate(config, tmp_path / "uninterrupted")

    real = sharding.host_to_global
    calls = []

    def signalled(batch, mesh):  # the signal arrives (for real, to this process) while batch 4 is prepared
        calls.append(1)
        if len(calls) == SIGTERM_AT_BATCH:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(batch, mesh)

    monkeypatch.setattr(sharding, "host_to_global", signalled)
    workdir = tmp_path / "preempted"
    with pytest.raises(Preempted, match="preempted at step 4"):
        train_and_evaluate(config, workdir)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["4"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again
    monkeypatch.setattr(sharding, "host_to_global", real)
    final = train_and_evaluate(config, workdir)
    assert final["resumed_from_step"] == 4
    expected = train_losses(tmp_path / "uninterrupted")
    got = {}
    for row in (r for r in read_jsonl(workdir / "metrics.jsonl") if "loss" in r):
        got[row["step"]] = row["loss"]
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    assert np.array_equal([got[s] for s in sorted(got)], [expected[s] for s in sorted(expected)])
    assert final["final_loss"] == reference["final_loss"]


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path, compile_cache):
    workdir = tmp_path / "run"
    # The steps and the exit codes are checked, not evals (test_distributed.py's 2-process runs keep theirs).
    args = [a for a in without_evals(TINY_TRAIN_ARGS)
            if not a.startswith(("--config.total_steps", "--config.checkpoint_every"))]
    args += ["--config.total_steps=20", "--config.checkpoint_every=1000"]
    env = dict(clean_env(compile_cache, 2), VLP_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}",
               VLP_NUM_PROCESSES="2")

    def start():
        return [subprocess.Popen([sys.executable, "-m", "vlp.train", f"--workdir={workdir}", *args], cwd=REPO,
                                 env=dict(env, VLP_PROCESS_ID=str(rank)), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True) for rank in range(2)]

    procs = start()
    outputs = ["", ""]
    readers = [threading.Thread(target=lambda i=i: outputs.__setitem__(i, procs[i].stdout.read())) for i in range(2)]
    for reader in readers:
        reader.start()
    try:
        metrics = workdir / "metrics.jsonl"
        deadline = 150
        while deadline > 0 and (not metrics.exists() or metrics.read_text().count('"loss"') < 3):
            threading.Event().wait(0.2)
            deadline -= 0.2
        assert deadline > 0, "the run did not reach step 3"
        os.killpg(procs[1].pid, signal.SIGTERM)  # only process 1 (and its process group) is told
        codes = [proc.wait(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        for reader in readers:
            reader.join(timeout=10)
    assert codes == [PREEMPTED_EXIT_CODE] * 2, outputs
    steps = {int(m) for out in outputs for m in re.findall(r"preempted at step (\d+)", out)}
    assert len(steps) == 1, outputs  # both processes stopped after the same step
    step = steps.pop()
    assert 3 <= step < 20 and (workdir / "checkpoints" / str(step)).is_dir()
    # The rerun continues from that step and finishes.
    env["VLP_COORDINATOR_ADDRESS"] = f"127.0.0.1:{free_port()}"
    procs = start()
    results = [proc.communicate(timeout=240)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], results
    assert f"resumed from checkpoint step {step}" in results[0]
    assert sorted(train_losses_all(workdir))[-1] == 20


def train_losses_all(workdir):
    return {r["step"] for r in read_jsonl(workdir / "metrics.jsonl") if "loss" in r}
