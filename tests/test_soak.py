"""kill -9 soak: a CPU training run (2 grain worker processes, async checkpoints every 2 steps) is killed with
SIGKILL, its whole process group at once, at seeded-random moments (at least once while orbax is writing a
checkpoint into its temporary directory) and restarted until it completes. Its final TrainState and per-step losses
must equal an uninterrupted run's exactly, and no restart may resume from a checkpoint that was not complete when
the previous run died.

CI runs KILLS = 3 kill points. A longer soak: `VLP_SOAK_KILLS=20 pytest tests/test_soak.py` (the run gets
8 steps per kill, and the last kill lands after the last step); `VLP_SOAK_SEED=<n>` picks other moments.
"""

import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from vlp.train.metrics import read_jsonl
from vlp.train.restore import restore_run

REPO = Path(__file__).resolve().parents[1]
KILLS = int(os.environ.get("VLP_SOAK_KILLS", "3"))
SEED = int(os.environ.get("VLP_SOAK_SEED", "0"))
CHECKPOINT_EVERY = 2
# A kill lets a run log at most 7 steps, so every planned kill happens before the run could finish.
TOTAL_STEPS = 8 * max(KILLS, 3) + 8
TMP_MARK = "orbax-checkpoint-tmp"
RUN_TIMEOUT_SECONDS = 300
FAST_COMPILE_FLAGS = ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
TRAIN_ARGS = [
    "--config=configs/clip.py:tiny", f"--config.total_steps={TOTAL_STEPS}", "--config.batch_size=16",
    "--config.log_every=1", f"--config.checkpoint_every={CHECKPOINT_EVERY}", "--config.keep_checkpoints=3",
    "--config.eval_every=1000", "--config.optim.warmup_steps=2", "--config.mesh.num_devices=1",
    "--config.data.worker_count=2", "--config.async_checkpointing=True",
    *(f"--config.model.{tower}.{key}={value}" for tower in ("image", "text")
      for key, value in (("width", 32), ("depth", 1), ("mlp_dim", 64), ("num_heads", 2))),
    "--config.model.embed_dim=32",
    *(f"--config.evals.{name}.{key}=16" for name in ("zeroshot", "retrieval")
      for key in ("num_examples", "batch_size")),
]


@dataclasses.dataclass
class Kill:
    """When to kill a run. `checkpoint`: the moment its `count`-th new orbax temporary directory appears.
    `steps`: `delay_seconds` after it logs its `count`-th step, at the latest at its `count + 2`-th. `startup`:
    `delay_seconds` after launch (imports, restore, grain workers, compilation), at the latest at its first step.
    `finish`: `delay_seconds` after it logs the last step (final checkpoint, evaluation, final_metrics.json)."""

    kind: str
    count: int = 0
    delay_seconds: float = 0.0

    def due(self, seconds: float, new_tmp_dirs: int, log: str, since: dict[str, float]) -> bool:
        """`since`: when the run logged its `count`-th step (`count`) and the last step (`last`), in seconds."""
        steps = len(re.findall(r"\] step \d+/", log))
        if steps >= self.count:
            since.setdefault("count", seconds)
        if f"] step {TOTAL_STEPS}/" in log:
            since.setdefault("last", seconds)
        if self.kind == "checkpoint":
            return new_tmp_dirs >= self.count
        if self.kind == "steps":
            return steps >= self.count + 2 or ("count" in since and seconds - since["count"] >= self.delay_seconds)
        if self.kind == "finish":
            return "last" in since and seconds - since["last"] >= self.delay_seconds
        return steps >= 1 or seconds >= self.delay_seconds


def kill_plan(rng: random.Random, kills: int) -> list[Kill]:
    """The first three kills cover checkpoint, steps and startup once, later ones draw a kind; a longer soak's last
    kill is `finish`."""
    kinds = ["checkpoint", "steps", "startup"][:kills]
    kinds += rng.choices(["checkpoint", "steps", "startup"], weights=[2, 2, 1], k=kills - len(kinds))
    if kills > 3:
        kinds[-1] = "finish"
    plan = []
    for kind in kinds:
        if kind == "checkpoint":
            plan.append(Kill(kind, count=rng.randint(1, 3)))
        elif kind == "steps":
            plan.append(Kill(kind, count=rng.randint(1, 5), delay_seconds=rng.uniform(0.0, 0.2)))
        elif kind == "finish":
            plan.append(Kill(kind, delay_seconds=rng.uniform(0.0, 1.0)))
        else:
            plan.append(Kill(kind, delay_seconds=rng.uniform(0.5, 4.0)))
    return plan


@dataclasses.dataclass
class Attempt:
    log: str
    planned: Kill | None  # the kill this run was launched with
    killed: Kill | None  # the same if it was killed, None if it completed first
    complete_steps: tuple[int, ...] = ()  # finalised checkpoints on disk after the run ended or died
    tmp_dirs: tuple[str, ...] = ()  # orbax temporary directories left behind


def clean_env(compile_cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLP_", "JAX_"))}
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags + FAST_COMPILE_FLAGS),
               JAX_COMPILATION_CACHE_DIR=str(compile_cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               PYTHONUNBUFFERED="1")
    return env


def checkpoint_dirs(workdir: Path) -> list[Path]:
    directory = workdir / "checkpoints"
    return list(directory.iterdir()) if directory.is_dir() else []


def complete_steps(workdir: Path) -> tuple[int, ...]:
    """Steps whose checkpoint orbax has finalised: renamed to the step number, with metadata and both items."""
    return tuple(sorted(int(p.name) for p in checkpoint_dirs(workdir) if p.name.isdigit()
                        and (p / "_CHECKPOINT_METADATA").is_file()
                        and all((p / item).is_dir() and any((p / item).iterdir()) for item in ("state", "data"))))


def run_once(workdir: Path, log_path: Path, env: dict[str, str], kill: Kill | None) -> Attempt:
    """Runs the training command once; kills its process group (grain workers included) when `kill` says."""
    cmd = [sys.executable, "-m", "vlp.train", f"--workdir={workdir}", *TRAIN_ARGS]
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    start = time.monotonic()
    seen_tmp = {p.name for p in checkpoint_dirs(workdir) if TMP_MARK in p.name}  # leftovers of the previous kill
    new_tmp_dirs, since = 0, {}
    with log_path.open() as reader:
        text = ""
        while proc.poll() is None:
            seconds = time.monotonic() - start
            if seconds > RUN_TIMEOUT_SECONDS:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                pytest.fail(f"a run did not finish in {RUN_TIMEOUT_SECONDS} s:\n{log_path.read_text()[-3000:]}")
            if kill is not None:
                text += reader.read()
                tmp = {p.name for p in checkpoint_dirs(workdir) if TMP_MARK in p.name}
                new_tmp_dirs += len(tmp - seen_tmp)
                seen_tmp = tmp
                if kill.due(seconds, new_tmp_dirs, text, since):
                    os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its grain workers, at once
                    break
            time.sleep(0.002)
    proc.wait()
    killed = proc.returncode == -signal.SIGKILL
    tmp_dirs = tuple(sorted(p.name for p in checkpoint_dirs(workdir) if TMP_MARK in p.name))
    attempt = Attempt(log_path.read_text(), kill, kill if killed else None, complete_steps(workdir), tmp_dirs)
    if not killed:
        assert proc.returncode == 0, f"training exited with {proc.returncode}:\n{attempt.log[-3000:]}"
    return attempt


def losses_by_step(workdir: Path) -> dict[int, list[float]]:
    """Every logged training loss of each step, in logging order (steps after the last checkpoint of a killed run
    are logged again by the run that resumed)."""
    out: dict[int, list[float]] = {}
    for record in read_jsonl(workdir / "metrics.jsonl"):
        if "loss" in record:
            out.setdefault(record["step"], []).append(record["loss"])
    return out


def final_state(workdir: Path):
    _, step, state = restore_run(workdir)
    assert step == TOTAL_STEPS
    return jax.tree.map(np.asarray, {"params": state.params, "opt_state": state.opt_state})


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jax_compilation_cache")


def test_killed_and_restarted_run_equals_uninterrupted_run(tmp_path, compile_cache):
    env = clean_env(compile_cache)
    reference = tmp_path / "reference"
    run_once(reference, tmp_path / "reference.log", env, None)  # also fills the compilation cache

    soaked = tmp_path / "soaked"
    plan, attempts, extra_tries = kill_plan(random.Random(SEED), KILLS), [], 3
    while True:
        if not plan and extra_tries and not any(a.killed and a.tmp_dirs for a in attempts):
            plan.append(Kill("checkpoint", count=1))  # no kill caught a checkpoint being written yet: try again
            extra_tries -= 1
        attempt = run_once(soaked, tmp_path / f"soaked_{len(attempts)}.log", env, plan.pop(0) if plan else None)
        attempts.append(attempt)
        if attempt.killed is None:
            break
    killed = [a for a in attempts if a.killed is not None]
    summary = [(a.killed.kind, a.complete_steps, a.tmp_dirs) for a in killed]
    print("kills (kind, complete checkpoints, orbax temporary dirs left):", *summary, sep="\n  ")
    # Every planned kill happened (a `finish` kill may come after the run has already completed).
    assert len(killed) >= KILLS or (attempts[-1].planned and attempts[-1].planned.kind == "finish"), summary
    assert any(a.tmp_dirs for a in killed), f"no kill landed while a checkpoint was being written: {summary}"

    # No restart resumed from a partial checkpoint: each names the newest checkpoint complete at the last kill (a run
    # killed during startup may die before it restores).
    for before, after in zip(attempts, attempts[1:]):
        resumed = [int(s) for s in re.findall(r"resumed from checkpoint step (\d+)", after.log)]
        newest = [max(before.complete_steps)] if before.complete_steps else []
        trained = after.killed is None or re.search(r"\] step \d+/", after.log)
        assert resumed == newest or (not trained and not resumed), (resumed, before.complete_steps, before.tmp_dirs)
    assert not [p.name for p in checkpoint_dirs(soaked) if "corrupt" in p.name or TMP_MARK in p.name]

    expected, got = losses_by_step(reference), losses_by_step(soaked)
    steps = list(range(1, TOTAL_STEPS + 1))
    assert sorted(expected) == sorted(got) == steps
    assert all(len(values) == 1 for values in expected.values())
    assert np.array_equal([got[s][-1] for s in steps], [expected[s][0] for s in steps])
    assert all(value == expected[s][0] for s in steps for value in got[s])  # the killed runs' logs too

    expected_final = json.loads((reference / "final_metrics.json").read_text())
    got_final = json.loads((soaked / "final_metrics.json").read_text())
    for key in ("final_loss", "zeroshot_top1", "retrieval_i2t_r1", "retrieval_t2i_r1"):
        assert got_final[key] == expected_final[key], key
    assert got_final["resumed_from_step"] == max(attempts[-2].complete_steps, default=0)

    expected_state, got_state = final_state(reference), final_state(soaked)
    assert jax.tree.structure(expected_state) == jax.tree.structure(got_state)
    for a, b in zip(jax.tree.leaves(expected_state), jax.tree.leaves(got_state)):
        assert np.array_equal(a, b)
