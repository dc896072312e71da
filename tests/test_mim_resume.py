"""Exact resume of the masked-image objectives: a SimMIM, MAE, EVA or TIPS run restored from its middle checkpoint
reproduces the uninterrupted run's later losses exactly, so it sees the same per-visit masks (for TIPS, the same EMA
teacher and centres; for EVA, the same frozen teacher, which is not in the checkpoint but reloaded from
reference.path)."""

import shutil

import pytest
from test_mim_objectives import mim_config, teacher_workdir  # noqa: F401

from vlp.train.metrics import read_jsonl
from vlp.train.trainer import train_and_evaluate


def losses(workdir):
    return {r["step"]: r["loss"] for r in read_jsonl(workdir / "metrics.jsonl") if "loss" in r}


@pytest.mark.parametrize("name", ["simmim", "mae", "eva", "tips"])
def test_resumed_run_reproduces_the_uninterrupted_losses(tmp_path, request, name):
    teacher = {"reference.path": request.getfixturevalue("teacher_workdir")} if name == "eva" else {}
    config = mim_config(name, total_steps=4, batch_size=8, checkpoint_every=2, log_every=1, eval_every=1000,
                        async_checkpointing=False, **{"data.read_threads": 1}, **teacher)
    with config.unlocked():
        config.evals = {}
    full = tmp_path / "full"
    train_and_evaluate(config, full)
    full_losses = losses(full)
    assert sorted(full_losses) == [1, 2, 3, 4]

    resumed = tmp_path / "resumed"  # killed after step 2: only that checkpoint survives
    shutil.copytree(full / "checkpoints" / "2", resumed / "checkpoints" / "2")
    final = train_and_evaluate(config, resumed)
    assert final["resumed_from_step"] == 2
    resumed_losses = losses(resumed)
    assert sorted(resumed_losses) == [3, 4]
    for step in (3, 4):
        assert resumed_losses[step] == full_losses[step], (name, step, resumed_losses[step], full_losses[step])
