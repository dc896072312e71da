"""Resuming with another data stream is refused at start: the checkpoint's data position is a batch index that a new
batch size, seed, image size, source, ... would reinterpret. Other keys (total_steps, lr, logging, reader threads)
may change. Every start's config is kept in config_history/."""

import json
import re
import shutil

import ml_collections
import pytest
from conftest import REPO, tiny_config

from vlp import config as vlp_config
from vlp.train import trainer
from vlp.train.trainer import train_and_evaluate
from vlp.train.workdir import CONFIG_HISTORY, DATA_STREAM_KEYS, check_resume_config


def run_config(**updates):
    config = tiny_config(**updates)
    with config.unlocked():
        config.evals = ml_collections.ConfigDict()  # evals do not matter here; saves their compilation
    return config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A workdir after a finished 8-step run (its final checkpoint is step 8)."""
    workdir = tmp_path_factory.mktemp("first") / "run"
    train_and_evaluate(run_config(), workdir)
    return workdir


@pytest.fixture
def workdir(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def history(workdir):
    return [json.loads(p.read_text()) for p in sorted((workdir / CONFIG_HISTORY).iterdir())]


@pytest.fixture
def no_training(monkeypatch):
    def compiled(*args, **kwargs):
        pytest.fail("the changed data config was not refused before training")

    monkeypatch.setattr(trainer.Experiment, "init_state", compiled)
    monkeypatch.setattr(trainer, "jit_train_step", compiled)
    monkeypatch.setattr(trainer, "make_train_iterator", compiled)


@pytest.mark.parametrize("key,old,new", [("batch_size", 16, 32), ("seed", 0, 1), ("data.image_size", 32, 64)])
def test_a_changed_data_key_is_refused_at_start_naming_old_and_new(workdir, no_training, key, old, new):
    saved = (workdir / "config.json").read_text()
    with pytest.raises(ValueError, match=rf"cannot resume .* with a changed data stream: {re.escape(key)}: {old} -> "
                                         rf"{new}\. .*--config\.allow_data_change=True"):
        train_and_evaluate(run_config(**{key: str(new), "total_steps": "10"}), workdir)
    assert (workdir / "config.json").read_text() == saved  # the refused start leaves the saved config alone
    assert len(history(workdir)) == 1


def test_every_changed_data_key_is_named(workdir, no_training):
    config = run_config(**{"seed": "3", "data.train_caption": "noisy", "data.max_text_len": "20"})
    with pytest.raises(ValueError, match=r"seed: 0 -> 3; data.train_caption: 'both' -> 'noisy'; data.max_text_len: "
                                         r"12 -> 20\."):
        train_and_evaluate(config, workdir)


def test_allow_data_change_resumes_with_the_new_stream(workdir):
    final = train_and_evaluate(run_config(**{"seed": "1", "total_steps": "10", "allow_data_change": "True"}),
                               workdir)
    assert final["resumed_from_step"] == 8 and final["steps"] == 10
    assert [c["seed"] for c in history(workdir)] == [0, 1]
    assert json.loads((workdir / "config.json").read_text())["seed"] == 1


def test_keys_that_do_not_change_the_stream_resume(workdir):
    config = run_config(**{"total_steps": "10", "optim.lr": "0.003", "data.read_threads": "2", "log_every": "2"})
    final = train_and_evaluate(config, workdir)
    assert final["resumed_from_step"] == 8 and final["steps"] == 10
    configs = history(workdir)  # one file per start, oldest first; config.json is the newest
    assert [(c["total_steps"], c["optim"]["lr"]) for c in configs] == [(8, 0.002), (10, 0.003)]
    assert json.loads((workdir / "config.json").read_text()) == configs[-1]
    assert re.fullmatch(r"0002_\d{8}T\d{6}Z\.json", sorted((workdir / CONFIG_HISTORY).iterdir())[-1].name)


def test_a_workdir_without_checkpoint_may_start_with_another_stream(tmp_path):
    """A run that died before its first checkpoint has no data position to misread."""
    (tmp_path / "config.json").write_text(vlp_config.to_json(run_config()))
    check_resume_config(tmp_path, run_config(batch_size="32"))  # no checkpoints/ at all
    (tmp_path / "checkpoints" / "tmp_save").mkdir(parents=True)  # only an unfinished save
    check_resume_config(tmp_path, run_config(batch_size="32"))
    (tmp_path / "checkpoints" / "3").mkdir()
    with pytest.raises(ValueError, match="batch_size: 16 -> 32"):
        check_resume_config(tmp_path, run_config(batch_size="32"))


def test_data_stream_keys_are_config_keys():
    config = vlp_config.base_config()
    for key in DATA_STREAM_KEYS:
        node = config
        for part in key.split("."):
            assert part in node, f"DATA_STREAM_KEYS entry {key!r} is not a config key"
            node = node[part]


def test_mask_settings_count_only_for_masked_image_objectives(tmp_path):
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)
    (tmp_path / "config.json").write_text(vlp_config.to_json(run_config()))
    check_resume_config(tmp_path, run_config(**{"mim.mask_ratio": "0.4"}))  # clip draws no masks: resumes
    tips = vlp_config.load_config_file(str(REPO / "configs" / "tips.py") + ":tiny")
    (tmp_path / "config.json").write_text(vlp_config.to_json(tips))
    vlp_config.apply_overrides(tips, {"mim.mask_ratio": "0.55"})
    with pytest.raises(ValueError, match=r"mim\.mask_ratio: 0\.4 -> 0\.55"):
        check_resume_config(tmp_path, tips)
