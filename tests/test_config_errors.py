"""Bad configs and workdirs fail at start with a message naming the key, the value and what is valid."""

import pytest
from conftest import REPO, tiny_config

from vlp import config as vlp_config
from vlp.train.trainer import build_experiment, train_and_evaluate
from vlp.train.workdir import prepare_workdir


def test_unknown_key_names_valid_keys():
    with pytest.raises(KeyError, match=r"unknown config key 'optim.learning_rate'.*valid keys there.*'lr'"):
        tiny_config(**{"optim.learning_rate": "0.1"})


def test_unknown_variant():
    with pytest.raises(ValueError, match=r"unknown config variant 'huge'.*tiny"):
        vlp_config.load_config_file(str(REPO / "configs" / "clip.py") + ":huge")


def test_batch_not_divisible_by_mesh():
    config = tiny_config(batch_size=12, **{"mesh.num_devices": -1})  # 8 devices on (data, fsdp)
    with pytest.raises(ValueError, match=r"batch_size=12 is not divisible by data x fsdp = 8"):
        build_experiment(config)


def test_mesh_that_does_not_match_devices():
    config = tiny_config(**{"mesh.shape": "(3, 1, 1)", "mesh.num_devices": -1})
    with pytest.raises(ValueError, match=r"mesh.shape \(3, 1, 1\) needs 3 devices but 8 are used"):
        build_experiment(config)


@pytest.mark.parametrize("key,value,message", [
    ("optim.lr", "-0.1", r"optim.lr=-0.1 must be > 0"),
    ("total_steps", "0", r"total_steps=0 must be a positive integer"),
    ("objective", "clipp", r"objective='clipp'; valid: \['align', 'clip', 'siglip'\]"),
    ("loss.variant", "allgather", r"loss.variant='allgather'; valid: \['gather', 'ring'\]"),
    ("model.text.vocab_size", "100", r"model.text.vocab_size=100 is smaller than the vocab size 384"),
    ("objective", "siglip", r"objective 'siglip' learns a logit bias: set model.logit_bias_init"),
    ("data.train_caption", "long", r"data.train_caption='long'; valid"),
    ("optim.warmup_steps", "100", r"optim.warmup_steps=100 must be in \[0, total_steps=8\)"),
])
def test_invalid_values(key, value, message):
    config = tiny_config(**{key: value})
    with pytest.raises(ValueError, match=message):
        build_experiment(config)


def test_workdir_under_a_regular_file(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    with pytest.raises(NotADirectoryError, match=r"file.txt exists and is a regular file"):
        prepare_workdir(blocker / "run")
    with pytest.raises(NotADirectoryError):
        train_and_evaluate(tiny_config(), blocker / "run")


def test_saved_config_round_trips(tmp_path):
    config = tiny_config()
    path = tmp_path / "config.json"
    path.write_text(vlp_config.to_json(config))
    restored = vlp_config.load_json(path)
    assert restored.to_dict() == config.to_dict()


def test_cluster_configs_build_without_training():
    for spec in ["clip.py:B/16", "clip.py:L/14", "align.py:B/16", "align.py:L/14", "align.py:tiny"]:
        config = vlp_config.load_config_file(str(REPO / "configs" / spec))
        exp = build_experiment(config)
        count = sum(x.size for x in __import__("jax").tree.leaves(exp.abstract_state.params))
        assert count > (1e8 if "L/14" in spec else 1.1e8 if "B/16" in spec else 1e4), (spec, count)
