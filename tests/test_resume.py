"""Resume: a run restored from its step-N/2 checkpoint reproduces the uninterrupted run's losses exactly."""

import json
import shutil

import numpy as np
import pytest
from conftest import tiny_config

from vlp.train.metrics import read_jsonl
from vlp.train.trainer import train_and_evaluate


def losses(workdir):
    return {r["step"]: r["loss"] for r in read_jsonl(workdir / "metrics.jsonl") if "loss" in r}


def test_resume_reproduces_uninterrupted_losses(tmp_path):
    config = tiny_config(total_steps=8, checkpoint_every=4, async_checkpointing=True)
    full = tmp_path / "full"
    train_and_evaluate(config, full)
    full_losses = losses(full)
    assert sorted(full_losses) == list(range(1, 9))

    # Interrupted after step 4: keep only that checkpoint, as if the process had been killed before step 8.
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "4", resumed / "checkpoints" / "4")
    final = train_and_evaluate(config, resumed)
    resumed_losses = losses(resumed)
    assert final["resumed_from_step"] == 4
    assert sorted(resumed_losses) == [5, 6, 7, 8]
    for step in range(5, 9):
        assert resumed_losses[step] == full_losses[step], (step, resumed_losses[step], full_losses[step])
    full_final = json.loads((full / "final_metrics.json").read_text())
    np.testing.assert_equal(final["zeroshot_top1"], full_final["zeroshot_top1"])


def test_rerun_of_finished_run_restores_and_only_evaluates(tmp_path):
    config = tiny_config(total_steps=3)
    first = train_and_evaluate(config, tmp_path)
    again = train_and_evaluate(config, tmp_path)
    assert again["resumed_from_step"] == 3
    assert again["zeroshot_top1"] == first["zeroshot_top1"]


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path, caplog):
    config = tiny_config(total_steps=8, checkpoint_every=4, keep_checkpoints=3)
    train_and_evaluate(config, tmp_path)
    full_losses = losses(tmp_path)
    # Damage the final checkpoint: its array data is gone, its metadata says it is complete.
    for path in (tmp_path / "checkpoints" / "8" / "state").rglob("*"):
        if path.is_file() and "METADATA" not in path.name:
            path.write_bytes(b"")
    (tmp_path / "metrics.jsonl").unlink()
    with caplog.at_level("WARNING"):
        final = train_and_evaluate(config, tmp_path)
    assert final["resumed_from_step"] == 4
    assert "checkpoint step 8" in caplog.text and "cannot be restored" in caplog.text
    assert (tmp_path / "checkpoints" / "8.corrupt").is_dir()  # kept for inspection, not deleted
    assert (tmp_path / "checkpoints" / "8").is_dir()  # written again by the resumed run
    assert all(losses(tmp_path)[s] == full_losses[s] for s in range(5, 9))


def test_no_restorable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    config = tiny_config(total_steps=4)
    train_and_evaluate(config, tmp_path)
    for path in (tmp_path / "checkpoints" / "4" / "state").rglob("*"):
        if path.is_file() and "METADATA" not in path.name:
            path.write_bytes(b"")
    with pytest.raises(RuntimeError, match="no restorable checkpoint"):
        train_and_evaluate(config, tmp_path)


def test_metrics_file_torn_by_a_kill_stays_readable(tmp_path):
    from vlp.train.metrics import MetricWriter, read_jsonl

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.2}\n{"step": 2, "lo')  # killed mid-write
    writer = MetricWriter(tmp_path, enabled=True)
    writer.write(2, {"loss": 3.1})
    writer.close()
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 3.2}, {"step": 2, "loss": 3.1}]
