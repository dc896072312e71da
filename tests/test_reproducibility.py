"""Determinism: the same config and seed give bit-identical per-step losses, on 1 device and on 8 devices, and in
two separate `python -m vlp.train` processes.

Both runs of a pair go through `train_and_evaluate` in this process. The second run loads the first's compiled
executables from the session's persistent compilation cache (tests/conftest.py): what is compared is the init, the
data pipeline and the execution; recompiling the same programs would only double the test's time.
"""

import sys

import numpy as np
import pytest
from conftest import tiny_config
from test_distributed import TINY_TRAIN_ARGS, clean_env, run, train_losses, without_evals

from vlp.train.metrics import read_jsonl
from vlp.train.trainer import train_and_evaluate

STEPS = 4


def step_losses(workdir) -> np.ndarray:
    """The logged training losses of steps 1..STEPS, in step order."""
    losses = {r["step"]: r["loss"] for r in read_jsonl(workdir / "metrics.jsonl") if "loss" in r}
    assert sorted(losses) == list(range(1, STEPS + 1)), sorted(losses)
    return np.array([losses[step] for step in range(1, STEPS + 1)])


@pytest.mark.parametrize("mesh", [
    {"mesh.num_devices": 1},
    {"mesh.num_devices": -1, "mesh.shape": "(8, 1, 1)"},
], ids=["1_device", "8_devices"])
def test_same_config_and_seed_give_identical_losses(tmp_path, mesh):
    config = tiny_config(total_steps=STEPS, log_every=1, **{
        "optim.warmup_steps": 1, "evals.zeroshot.num_examples": 16, "evals.retrieval.num_examples": 16,
        "evals.zeroshot.batch_size": 16, "evals.retrieval.batch_size": 16, **mesh})
    first = train_and_evaluate(config, tmp_path / "a")
    second = train_and_evaluate(config, tmp_path / "b")
    losses_a, losses_b = step_losses(tmp_path / "a"), step_losses(tmp_path / "b")
    assert np.isfinite(losses_a).all() and len(set(losses_a.tolist())) == STEPS  # real, changing losses
    assert np.array_equal(losses_a, losses_b), (losses_a, losses_b)
    assert first["final_loss"] == second["final_loss"] == losses_a[-1]
    for key in ("zeroshot_top1", "retrieval_i2t_r1", "retrieval_t2i_r1"):
        assert first[key] == second[key], key


def test_two_separate_processes_give_identical_losses(tmp_path):
    """`python -m vlp.train` twice, each in a fresh process with its own empty compilation cache: nothing compiled
    or cached in one run (executables, jit caches, Python hash seeds) is shared with the other."""
    losses = []
    for name in ("a", "b"):
        env = clean_env(tmp_path / f"cache_{name}", 1, PYTHONHASHSEED="random")
        run([sys.executable, "-m", "vlp.train", f"--workdir={tmp_path / name}", *without_evals(TINY_TRAIN_ARGS),
             "--config.mesh.num_devices=1"], env, 300)
        losses.append(train_losses(tmp_path / name))
    assert sorted(losses[0]) == list(range(1, 7)), sorted(losses[0])
    assert len(set(losses[0].values())) == 6 and all(np.isfinite(list(losses[0].values())))  # real, changing
    assert losses[0] == losses[1], losses
