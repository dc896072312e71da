"""Workdirs on gs:// (any etils.epath URL): every file the trainer writes goes to the URL, orbax writes the
checkpoints there directly (tensorstore's gcs driver), and resume and the corrupt-checkpoint fallback work there.

The bucket is offline (tests/fake_gcs.py): a local folder behind epath's gs:// backend and a small GCS JSON API
that tensorstore's gcs driver talks to.
"""

import json
import os

import pytest
from conftest import tiny_config
from etils import epath
from fake_gcs import fake_gcs

from vlp.train.metrics import MetricWriter, read_jsonl
from vlp.train.paths import write_text_atomic
from vlp.train.trainer import train_and_evaluate


def losses(workdir):
    return {r["step"]: r["loss"] for r in read_jsonl(epath.Path(workdir) / "metrics.jsonl") if "loss" in r}


def test_gcs_workdir_trains_resumes_and_falls_back_from_a_corrupt_checkpoint(tmp_path, monkeypatch, caplog):
    cwd = tmp_path / "cwd"  # a URL mistaken for a local path would land here (pathlib makes gs://b into gs:/b)
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with fake_gcs(tmp_path / "store", monkeypatch):
        store = tmp_path / "store" / "bkt" / "run"
        workdir = "gs://bkt/run"
        config = tiny_config(total_steps=8, checkpoint_every=4, keep_checkpoints=3)
        first = train_and_evaluate(config, workdir)
        first_losses = losses(workdir)
        assert sorted(first_losses) == list(range(1, 9))
        for name in ("config.json", "provenance.json", "final_metrics.json", "metrics.jsonl"):
            assert (store / name).is_file(), name
        assert json.loads((store / "final_metrics.json").read_text())["steps"] == 8
        assert json.loads((store / "config.json").read_text())["total_steps"] == 8
        # Orbax's object-store protocol: steps written in place, finished by commit_success.txt (no renames).
        assert sorted(p.name for p in (store / "checkpoints").iterdir()) == ["4", "8"]
        assert (store / "checkpoints" / "8" / "commit_success.txt").is_file()
        assert list((store / "checkpoints" / "8" / "state").rglob("manifest.ocdbt"))  # tensorstore's array data
        assert not (store / "tensorboard").exists()
        assert not list(cwd.iterdir())

        # Damage the newest checkpoint's array data; its metadata still says it is complete.
        for path in (store / "checkpoints" / "8" / "state").rglob("*"):
            if path.is_file() and "METADATA" not in path.name and path.name != "commit_success.txt":
                path.write_bytes(b"")
        (store / "metrics.jsonl").unlink()
        with caplog.at_level("WARNING"):
            final = train_and_evaluate(config, workdir)
        assert final["resumed_from_step"] == 4
        assert "checkpoint step 8" in caplog.text and "cannot be restored" in caplog.text
        resumed_losses = losses(workdir)
        assert sorted(resumed_losses) == [5, 6, 7, 8]
        for step in range(5, 9):  # the resumed run continues exactly: same data position, same state
            assert resumed_losses[step] == first_losses[step], (step, resumed_losses[step], first_losses[step])
        assert final["zeroshot_top1"] == first["zeroshot_top1"]
        assert (store / "checkpoints" / "8.corrupt" / "commit_success.txt").is_file()  # kept for inspection
        assert (store / "checkpoints" / "8" / "commit_success.txt").is_file()  # written again
        assert len(list((store / "config_history").glob("*.json"))) == 2
        assert not list(cwd.iterdir())


def test_metrics_on_an_object_store_are_rewritten_whole_and_keep_earlier_records(tmp_path, monkeypatch):
    with fake_gcs(tmp_path / "store", monkeypatch):
        target = tmp_path / "store" / "bkt" / "m"
        target.mkdir(parents=True)
        (target / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "lo')  # torn by a kill
        writer = MetricWriter("gs://bkt/m", enabled=True)
        writer.write(3, {"loss": 1.25})
        writer.write(4, {"loss": 0.5})
        writer.close()
        assert read_jsonl("gs://bkt/m/metrics.jsonl") == [{"step": 1, "loss": 2.5}, {"step": 3, "loss": 1.25},
                                                           {"step": 4, "loss": 0.5}]
        assert not (target / "tensorboard").exists()


def test_local_small_files_are_replaced_atomically_with_the_usual_file_mode(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("old")
    old_umask = os.umask(0o022)
    try:
        write_text_atomic(epath.Path(path), "new")
    finally:
        os.umask(old_umask)
    assert path.read_text() == "new"
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # no temporary file left


def test_local_workdir_appends_metrics_after_a_torn_line_and_keeps_tensorboard(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "lo')  # torn by a kill
    writer = MetricWriter(tmp_path, enabled=True)
    writer.write(3, {"loss": 1.5})
    writer.close()
    assert list((tmp_path / "tensorboard").iterdir())
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 3.0}, {"step": 3, "loss": 1.5}]
