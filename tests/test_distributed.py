"""Multi-process runs on this machine: 2 processes x 2 CPU devices train, checkpoint, resume and compute the sharded
losses exactly like 1 process; a dead peer stops the survivor quickly; the launch settings come from the environment.

Every multi-process case runs in subprocesses with a clean environment (conftest's 8-device XLA flag removed).
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlp.parallel import distributed
from vlp.train.metrics import read_jsonl

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "multiprocess_worker.py"
LAUNCHER = REPO / "launch" / "cpu_multiprocess.sh"
# Compilation dominates these runs on 2 cores: skip LLVM's expensive passes (the same flags on both sides of every
# comparison) and let later runs reuse earlier compilations through a persistent cache.
FAST_COMPILE_FLAGS = ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
TINY_TRAIN_ARGS = [
    "--config=configs/clip.py:tiny", "--config.total_steps=6", "--config.batch_size=16", "--config.log_every=1",
    "--config.checkpoint_every=3", "--config.eval_every=1000", "--config.optim.warmup_steps=2",
    *(f"--config.model.{tower}.{key}={value}" for tower in ("image", "text")
      for key, value in (("width", 32), ("depth", 1), ("mlp_dim", 64), ("num_heads", 2))),
    "--config.model.embed_dim=32",
    *(f"--config.evals.{name}.{key}=16" for name in ("zeroshot", "retrieval")
      for key in ("num_examples", "batch_size")),
]


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jax_compilation_cache")


def without_evals(args: list[str]) -> list[str]:
    """`args` with no evaluators (their `--config.evals.*` settings dropped), for runs whose losses alone are
    compared: no eval compiles."""
    return [a for a in args if not a.startswith("--config.evals.")] + ["--config.evals={}"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(compile_cache: Path, devices_per_process: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLP_", "JAX_"))}
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices_per_process),
               XLA_FLAGS=" ".join(flags + FAST_COMPILE_FLAGS), JAX_COMPILATION_CACHE_DIR=str(compile_cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONUNBUFFERED="1", PYTHON=sys.executable,
               # a broken run fails in seconds rather than JAX's minutes
               VLP_INIT_TIMEOUT_SECONDS="60", VLP_HEARTBEAT_TIMEOUT_SECONDS="10", VLP_SHUTDOWN_TIMEOUT_SECONDS="30")
    env.update(extra)
    return env


def run(cmd: list[str], env: dict[str, str], timeout_seconds: float) -> str:
    """Runs `cmd` in its own process group (killed whole on timeout); returns stdout + stderr, asserts success."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:4])} ... did not finish in {timeout_seconds} s:\n{output[-3000:]}")
    assert proc.returncode == 0, f"{' '.join(cmd[:4])} ... exited with {proc.returncode}:\n{output[-3000:]}"
    return output


def start_workers(mode: str, env: dict[str, str], logs: Path, num_processes: int = 2) -> list[subprocess.Popen]:
    """`tests/multiprocess_worker.py mode` as processes 0..n-1, output to logs/<rank>.log (files: no pipe stalls)."""
    env = dict(env, VLP_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}", VLP_NUM_PROCESSES=str(num_processes))
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(num_processes):
        with (logs / f"{rank}.log").open("w") as log:
            procs.append(subprocess.Popen([sys.executable, str(WORKER), mode], cwd=REPO, stdout=log,
                                          stderr=subprocess.STDOUT, env=dict(env, VLP_PROCESS_ID=str(rank))))
    return procs


def kill_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def train_losses(workdir: Path) -> dict[int, float]:
    records = [r for r in read_jsonl(workdir / "metrics.jsonl") if "loss" in r]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"metrics.jsonl has repeated steps {steps}: only process 0 may write it"
    return {r["step"]: r["loss"] for r in records}


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, compile_cache) -> Path:
    workdir = tmp_path_factory.mktemp("two_processes")
    run(["bash", str(LAUNCHER), "2", f"--workdir={workdir}", *TINY_TRAIN_ARGS], clean_env(compile_cache, 2), 240)
    return workdir


def test_two_processes_train_like_one_process(tmp_path, compile_cache, two_process_run):
    one = tmp_path / "one_process"
    # Only the losses are compared: the reference run skips the final evals (the 2-process run still runs them).
    run([sys.executable, "-m", "vlp.train", f"--workdir={one}", *without_evals(TINY_TRAIN_ARGS)],
        clean_env(compile_cache, 4), 180)
    expected, got = train_losses(one), train_losses(two_process_run)
    assert sorted(got) == sorted(expected) == list(range(1, 7))
    for step in expected:
        assert rel_diff(got[step], expected[step]) <= 1e-5, (step, got[step], expected[step])
    assert json.loads((two_process_run / "provenance.json").read_text())["process_count"] == 2
    assert sorted(p.name for p in (two_process_run / "checkpoints").iterdir()) == ["3", "6"]


def test_two_process_run_resumes_from_its_mid_checkpoint(tmp_path, compile_cache, two_process_run):
    resumed = tmp_path / "resumed"
    shutil.copytree(two_process_run / "checkpoints" / "3", resumed / "checkpoints" / "3")
    run(["bash", str(LAUNCHER), "2", f"--workdir={resumed}", *TINY_TRAIN_ARGS], clean_env(compile_cache, 2), 180)
    assert json.loads((resumed / "final_metrics.json").read_text())["resumed_from_step"] == 3
    full, again = train_losses(two_process_run), train_losses(resumed)
    assert sorted(again) == [4, 5, 6]
    assert all(again[step] == full[step] for step in again), (again, full)



def test_processes_agree_on_the_newest_step_every_one_can_read(tmp_path, compile_cache, two_process_run):
    resumed = tmp_path / "resumed"
    for step in ("3", "6"):
        shutil.copytree(two_process_run / "checkpoints" / step, resumed / "checkpoints" / step)
    # Only process 1 reads this file (each process saves its own data position): process 0 alone could resume at 6.
    (resumed / "checkpoints" / "6" / "data" / "process_1-of-2.json").write_text("{garbled")
    run(["bash", str(LAUNCHER), "2", f"--workdir={resumed}", *TINY_TRAIN_ARGS], clean_env(compile_cache, 2), 180)
    assert json.loads((resumed / "final_metrics.json").read_text())["resumed_from_step"] == 3
    full, again = train_losses(two_process_run), train_losses(resumed)
    assert sorted(again) == [4, 5, 6]
    assert all(again[step] == full[step] for step in again), (again, full)
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["3", "6", "6.corrupt"]

def test_sharded_losses_in_two_processes_equal_the_single_device_reference(tmp_path, compile_cache):
    procs = start_workers("losses", clean_env(compile_cache, 2), tmp_path)
    try:
        codes = [proc.wait(timeout=180) for proc in procs]
    finally:
        kill_all(procs)
    logs = [(tmp_path / f"{rank}.log").read_text() for rank in range(len(procs))]
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    for log in logs:
        (line,) = [line for line in log.splitlines() if line.startswith("RESULT ")]
        results = json.loads(line.removeprefix("RESULT "))["results"]
        assert sorted(results) == ["sigmoid/gather", "sigmoid/ring", "softmax/gather", "softmax/ring"]
        for case, r in results.items():
            assert r["loss_rel_diff"] <= 1e-5 and r["grad_rel_diff"] <= 1e-5, (case, r)


def test_dead_peer_stops_the_survivor_quickly_with_a_clear_message(tmp_path, compile_cache):
    env = clean_env(compile_cache, 2, VLP_HEARTBEAT_TIMEOUT_SECONDS="4", VLP_SHUTDOWN_TIMEOUT_SECONDS="5")
    procs = start_workers("dead_peer", env, tmp_path)
    try:
        deadline = time.monotonic() + 120
        while "READY" not in (tmp_path / "1.log").read_text():
            assert time.monotonic() < deadline and procs[1].poll() is None, (tmp_path / "1.log").read_text()
            time.sleep(0.1)
        killed_at = time.monotonic()
        procs[1].send_signal(signal.SIGKILL)
        code = procs[0].wait(timeout=60)
        elapsed_seconds = time.monotonic() - killed_at
    finally:
        kill_all(procs)
    log = (tmp_path / "0.log").read_text()
    assert code != 0, log[-3000:]
    assert elapsed_seconds < 20, elapsed_seconds
    assert "entering a collective" in log and "UNEXPECTED" not in log
    assert "another task died" in log, log[-3000:]
    assert re.search(r"stopped sending heartbeats\):\s*1\b", log), log[-3000:]  # names process 1


# ---- launch settings from the environment (no processes started) ----

def test_explicit_environment_gives_the_launch_plan():
    plan = distributed.plan_launch({"VLP_COORDINATOR_ADDRESS": "10.0.0.1:1234", "VLP_NUM_PROCESSES": "4",
                                    "JOB_COMPLETION_INDEX": "2", "VLP_LOCAL_DEVICE_IDS": "0,1"})
    assert plan == distributed.LaunchPlan("explicit", "10.0.0.1:1234", 4, 2, (0, 1), "deactivate")
    assert distributed.plan_launch({"VLP_NUM_PROCESSES": "1"}) is None
    assert distributed.plan_launch({"VLP_DISTRIBUTED": "off", "VLP_NUM_PROCESSES": "4"}) is None
    assert distributed.parse_local_device_ids("all") == ()
    assert distributed.timeouts_from_env({"VLP_HEARTBEAT_TIMEOUT_SECONDS": "5"}) == distributed.Timeouts(
        heartbeat_seconds=5)


def test_cluster_layouts_come_from_jax_detection(monkeypatch):
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "16", "SLURM_PROCID": "9",
             "SLURM_LOCALID": "1"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    assert distributed.plan_launch({}) == distributed.LaunchPlan("slurm")
    assert distributed.plan_launch({"VLP_LOCAL_DEVICE_IDS": "all"}).local_device_ids == ()  # one process per node
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.plan_launch({}) is None
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")  # any pod; only an indexed Job is a launch
    assert distributed.plan_launch({}) is None


@pytest.mark.parametrize("environ, message", [
    ({"VLP_NUM_PROCESSES": "2", "VLP_PROCESS_ID": "0"}, "needs VLP_COORDINATOR_ADDRESS=host:port"),
    ({"VLP_COORDINATOR_ADDRESS": "h:1"}, "VLP_NUM_PROCESSES is not"),
    ({"VLP_COORDINATOR_ADDRESS": "h:1", "VLP_NUM_PROCESSES": "2"}, "set VLP_PROCESS_ID to 0..1"),
    ({"VLP_COORDINATOR_ADDRESS": "h:1", "VLP_NUM_PROCESSES": "2", "VLP_PROCESS_ID": "2"}, "expected 0..1"),
    ({"VLP_COORDINATOR_ADDRESS": "h:1", "VLP_NUM_PROCESSES": "two"}, "VLP_NUM_PROCESSES='two' is not valid"),
    ({"VLP_LOCAL_DEVICE_IDS": "0,0", "VLP_NUM_PROCESSES": "1"}, "VLP_LOCAL_DEVICE_IDS='0,0' is not valid"),
    ({"VLP_DISTRIBUTED": "yes please"}, "VLP_DISTRIBUTED='yes please' is not valid"),
    ({"VLP_HEARTBEAT_TIMEOUT_SECONDS": "0"}, "VLP_HEARTBEAT_TIMEOUT_SECONDS='0' is not valid"),
])
def test_inconsistent_environment_is_a_clear_error(environ, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        distributed.plan_launch(environ)
        distributed.timeouts_from_env(environ)


def test_initialize_after_device_use_is_an_error():
    import jax

    jax.devices()
    with pytest.raises(RuntimeError, match="before jax.devices"):
        distributed.initialize(environ={"VLP_COORDINATOR_ADDRESS": "127.0.0.1:1", "VLP_NUM_PROCESSES": "2",
                                        "VLP_PROCESS_ID": "0"})
