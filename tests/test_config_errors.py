"""Bad configs and workdirs fail at start, before anything is compiled, with a message naming the key, the value and
what is valid."""

import re

import pytest
from conftest import REPO, tiny_config

from vlp import config as vlp_config
from vlp.eval import EVALUATORS
from vlp.objectives import available_objectives
from vlp.train import trainer
from vlp.train.trainer import build_experiment, train_and_evaluate
from vlp.train.workdir import prepare_workdir


@pytest.fixture
def no_compilation(monkeypatch):
    """Fails the test if train_and_evaluate gets as far as initialising the state or compiling the train step."""

    def compiled(*args, **kwargs):
        pytest.fail("the bad config was not rejected before the first compilation")

    monkeypatch.setattr(trainer.Experiment, "init_state", compiled)
    monkeypatch.setattr(trainer, "jit_train_step", compiled)


def test_unknown_key_names_valid_keys():
    with pytest.raises(KeyError, match=r"unknown config key 'optim.learning_rate'.*valid keys there.*'lr'"):
        tiny_config(**{"optim.learning_rate": "0.1"})


def test_a_method_config_that_adds_a_key_fails_at_load(tmp_path):
    # A config file edits an unlocked base config: a removed or misspelt key (here the per-tower `remat` that
    # model.remat_policy replaced) would otherwise be added silently and ignored.
    path = tmp_path / "stale.py"
    path.write_text("from vlp import config as vlp_config\n\n\ndef get_config(arg=None):\n"
                    "    c = vlp_config.base_config()\n    c.model.image.remat = True\n"
                    "    c.evals.extra = dict(type='knn')  # evaluator entries are free-form\n    return c\n")
    with pytest.raises(KeyError, match=r"sets keys that base_config\(\) does not have: \['model\.image\.remat'\]"):
        vlp_config.load_config_file(str(path))


@pytest.mark.parametrize("key", sorted(vlp_config.MOVED_KEYS))
def test_a_moved_key_says_where_it_went(key):
    # EVA's teacher and the prompt objective's CLIP became the run's reference model (config.reference).
    message = rf"the config override sets '{re.escape(key)}', which no longer exists: .* set reference.path .* and " \
              r"reference.format \(one of \('vlp', 'safetensors', 'hf', 'open_clip'\)"
    with pytest.raises(KeyError, match=message):
        tiny_config(**{key: "runs/clip"})


def test_a_moved_key_on_the_command_line_says_where_it_went():
    from vlp.train.__main__ import moved_flag_error

    argv = ["vlp.train", "--config=configs/eva.py:tiny", "--config.mim.teacher_workdir=runs/clip", "--workdir=x"]
    assert re.match(r"vlp: the command line sets 'mim.teacher_workdir', which no longer exists: .*reference.path",
                    moved_flag_error(argv))
    assert moved_flag_error(["vlp.train", "--config.reference.path=runs/clip", "--config.mim.mask_ratio=0.4"]) is None


def test_a_saved_config_that_set_a_moved_key_fails_unless_it_was_unset():
    with pytest.raises(KeyError, match=r"the saved config sets 'mim.teacher_workdir', which no longer exists: "
                                       r"EVA's teacher moved: .*reference.path"):
        vlp_config.from_dict({"mim": {"teacher_workdir": "runs/clip"}})
    # Every config.json written before the move holds the key, empty: those still load.
    assert vlp_config.from_dict({"mim": {"teacher_workdir": "", "teacher_config": ""}}).objective == "clip"


def test_unknown_variant():
    with pytest.raises(ValueError, match=r"unknown config variant 'huge'.*tiny"):
        vlp_config.load_config_file(str(REPO / "configs" / "clip.py") + ":huge")


# Values that the config file or override parser rejects while the config is built.
@pytest.mark.parametrize("key,value,error,message", [
    ("batch_size", "abc", ValueError, r"config key 'batch_size': cannot parse 'abc' as int"),
    ("batch_size", "12.5", TypeError, r"config key 'batch_size': '12.5' parses as float; valid: a value of type int"),
    ("optim.lr", "fast", ValueError, r"config key 'optim.lr': cannot parse 'fast' as float"),
    ("optim.lr", "'fast'", TypeError, r"config key 'optim.lr': \"'fast'\" parses as str; valid: a value of type float"),
])
def test_values_of_the_wrong_type(key, value, error, message):
    with pytest.raises(error, match=message):
        tiny_config(**{key: value})


# (overrides, message): each message names the key, the bad value and what would be valid. tiny_config runs on one
# device; `mesh.num_devices: -1` uses the 8 virtual devices of this test process.
BAD_CONFIGS = {
    "negative_lr": ({"optim.lr": "-0.1"}, r"optim.lr=-0.1 must be > 0"),
    "zero_steps": ({"total_steps": "0"}, r"total_steps=0 must be a positive integer"),
    "batch_not_divisible_by_data_parallel": (
        {"batch_size": "12", "mesh.num_devices": "-1"},
        r"batch_size=12 is not divisible by data x fsdp = 8 .*; use a multiple of 8"),
    "batch_not_divisible_by_accumulation": (
        {"accumulation.steps": "3"},
        r"batch_size=16 cannot be split into accumulation.steps=3 micro-batches .*; use a multiple of 3"),
    "mesh_product_not_device_count": (
        {"mesh.shape": "(3, 1, 1)", "mesh.num_devices": "-1"},
        r"mesh.shape \(3, 1, 1\) needs 3 devices but 8 are used; valid shapes multiply to 8"),
    "more_devices_than_exist": (
        {"mesh.num_devices": "99"}, r"mesh.num_devices=99 but 8 devices exist; use -1 \(all\) or 1..8"),
    "unknown_objective": ({"objective": "clipp"},
                          r"objective='clipp'; valid: " + re.escape(str(available_objectives()))),
    "unknown_loss_variant": ({"loss.variant": "allgather"}, r"loss.variant='allgather'; valid: \['gather', 'ring'\]"),
    "model_size_patch_does_not_divide_image": (
        {"model.image.variant": "B/17"},
        r"model.image.variant='B/17': patch size 17 does not divide data.image_size=32; valid patch sizes for this "
        r"image size: \[1, 2, 4, 8, 16, 32\]"),
    "unknown_model_size": (
        {"model.image.variant": "X/16"},
        r"model.image.variant='X/16': unknown ViT variant 'X/16'; valid: '<size>/<patch>' with size in \['Ti', "),
    "image_size_not_divisible_by_patch": (
        {"data.image_size": "30"},
        r"model.image.patch_size=8: patch size 8 does not divide data.image_size=30; valid patch sizes .*\[1, 2, 3, "),
    "missing_tokenizer_file": (
        {"data.tokenizer": "/nonexistent/sp.model"},
        r"data.tokenizer='/nonexistent/sp.model' is not a file; valid: a SentencePiece .model file .* or '' for the "
        r"bundled"),
    "unknown_data_source": ({"data.source": "laion"}, r"data.source='laion': unknown data source 'laion'; valid forms: "
                                                      r"\['shapes', 'shapes:classes=<lo>-<hi>', 'shapes:xor', 'arrayrecord:"),
    "unknown_caption_kind": ({"data.train_caption": "long"}, r"data.train_caption='long'; valid: \('noisy', "),
    "negative_worker_count": ({"data.worker_count": "-1"}, r"data.worker_count=-1 must be >= 0"),
    "bad_record_share_above_one": ({"data.max_bad_record_share": "1.5"},
                                   r"data.max_bad_record_share=1.5 must be in \[0, 1\]"),
    "empty_bad_record_window": ({"data.bad_record_window": "0"}, r"data.bad_record_window=0 must be >= 1"),
    "unknown_eval_type": (
        {"evals.zeroshot.type": "zeroshoot"},
        r"evals.zeroshot.type='zeroshoot'; valid: " + re.escape(str(sorted(EVALUATORS)))),
    "unknown_mask_kind": ({"mim.mask_kind": "grid"}, r"mim.mask_kind='grid'; valid: \('block', 'random'\)"),
    "mask_ratio_out_of_range": ({"mim.mask_ratio": "1.0"}, r"mim.mask_ratio=1.0 must be in \[0, 1\)"),
    "unknown_eval_split": (
        {"evals.retrieval.split": "val"},
        r"evals.retrieval.split='val'; valid splits of data.source='shapes': \['train', 'validation', 'test'\]"),
    "empty_eval_set": ({"evals.zeroshot.num_examples": "0"},
                       r"evals.zeroshot.num_examples=0 must be a positive integer"),
    "warmup_equals_total_steps": (
        {"optim.warmup_steps": "8"}, r"optim.warmup_steps=8 must be in \[0, total_steps=8\)"),
    "warmup_beyond_total_steps": (
        {"optim.warmup_steps": "100"}, r"optim.warmup_steps=100 must be in \[0, total_steps=8\)"),
    "unknown_schedule": ({"optim.schedule": "cosin"}, r"optim.schedule 'cosin'; valid: \('cosine', "),
    "label_smoothing_above_range": ({"loss.label_smoothing": "1.5"}, r"loss.label_smoothing=1.5 not in \[0, 1\)"),
    "label_smoothing_below_range": ({"loss.label_smoothing": "-0.1"}, r"loss.label_smoothing=-0.1 not in \[0, 1\)"),
    "negative_accumulation_steps": (
        {"accumulation.steps": "-2"}, r"accumulation.steps=-2 must be a positive integer"),
    "unknown_precision_dtype": (
        {"precision.compute_dtype": "fp16"},
        r"precision.compute_dtype='fp16'; valid: \('auto', 'float32', 'bfloat16'\)"),
    "nan_policy_typo": ({"nan_policy": "skp"}, r"nan_policy='skp'; valid: \('stop', 'skip'"),
    "unknown_image_pooling": ({"model.image.pool": "mean"}, r"model.image.pool='mean'; valid: \('cls', 'gap', 'map'\)"),
    "unknown_remat_policy": ({"model.remat_policy": "dots"},
                             r"model.remat_policy='dots'; valid: \('none', 'full', 'dots_saveable'"),
    "vocab_smaller_than_tokenizer": (
        {"model.text.vocab_size": "100"},
        r"model.text.vocab_size=100 is smaller than the vocab size 384 .*; use >= 384 or leave it unset"),
    "siglip_without_logit_bias": (
        {"objective": "siglip"}, r"objective 'siglip' learns a logit bias: set model.logit_bias_init \(SigLIP: -10.0"),
    "no_checkpoints_kept": ({"keep_checkpoints": "0"}, r"keep_checkpoints=0 must be a positive integer"),
    "watchdog_factor_not_above_one": ({"watchdog.factor": "0.5"}, r"watchdog.factor=0.5 must be > 1"),
    "watchdog_negative_floor": ({"watchdog.min_seconds": "-1"}, r"watchdog.min_seconds=-1.0 must be >= 0"),
    "watchdog_negative_absolute_limit": (
        {"watchdog.max_step_seconds": "-5"}, r"watchdog.max_step_seconds=-5.0 must be >= 0 \(0 = no absolute limit"),
    "watchdog_no_warmup": ({"watchdog.warmup_steps": "0"}, r"watchdog.warmup_steps=0 must be a positive integer"),
    "patch_dropout_of_every_patch": ({"model.image.patch_dropout": "1.0"},
                                     r"model.image.patch_dropout=1.0 must be in \[0, 1\)"),
    "patch_dropout_until_step_without_dropout": (
        {"model.image.patch_dropout_until_step": "4"},
        r"model.image.patch_dropout_until_step=4 ends a patch dropout that is off .*set patch_dropout > 0"),
    "patch_dropout_until_step_beyond_the_run": (
        {"model.image.patch_dropout": "0.5", "model.image.patch_dropout_until_step": "9"},
        r"model.image.patch_dropout_until_step=9 must be unset or in \[1, total_steps=8\]"),
    "gpu_attention_kernel_on_cpu": (
        {"model.attention": "cudnn"},
        r"model.attention='cudnn': attention implementation 'cudnn' needs an NVIDIA GPU but the JAX backend is "
        r"'cpu'; valid on cpu: \['auto', 'xla'\]"),
    "unknown_attention_kernel": (
        {"model.attention": "flash"}, r"model.attention='flash': unknown attention implementation 'flash'; valid: "),
    "coca_negative_caption_weight": (
        {"objective": "coca", "coca.caption_weight": "-1"}, r"coca.caption_weight=-1.0 must be >= 0"),
    "cappa_masked_pred_prob_above_one": (
        {"objective": "cappa", "cappa.masked_pred_prob": "1.5"}, r"cappa.masked_pred_prob=1.5 must be in \[0, 1\]"),
    "clip_distill_unknown_kind": (
        {"objective": "clip_distill", "clip_distill.kind": "mse"},
        r"clip_distill.kind='mse'; valid: \('kl', 'cosine'\)"),
    "modx_negative_alpha": ({"objective": "modx", "modx.alpha": "-1"}, r"modx.alpha=-1.0 must be >= 0"),
    "reference_unknown_format": ({"reference.format": "onnx"}, r"reference.format='onnx'; valid: \('vlp', "),
    "prompt_without_reference": (
        {"objective": "prompt"}, r"objective 'prompt' needs a frozen reference model: set reference.path \(and "
                                 r"reference.format, one of \('vlp', 'safetensors', 'hf', 'open_clip'\)\)"),
    "reference_missing_workdir": (
        {"reference.path": "/nonexistent/teacher"}, r"reference.path='/nonexistent/teacher' is not a directory"),
    "shapes_class_range_out_of_bounds": (
        {"data.source": "shapes:classes=0-64"}, r"shapes:classes=0-64: the class range must lie in 0-63"),
    "cleanclip_negative_inmodal_weight": (
        {"objective": "cleanclip", "cleanclip.inmodal_weight": "-1"}, r"cleanclip.inmodal_weight=-1.0 must be >= 0"),
    "cleanclip_crop_scale_reversed": (
        {"objective": "cleanclip", "cleanclip.crop_scale": "(0.9, 0.5)"},
        r"cleanclip.crop_scale=\(0.9, 0.5\) must satisfy 0 < low <= high <= 1"),
    "uniter_negative_task_ratio": (
        {"objective": "uniter", "uniter.mlm_ratio": "-1"},
        r"uniter task ratios itm/mlm/mrfr = \[2.0, -1.0, 1.0\] must be >= 0 with a positive sum"),
    "uniter_zero_ot_iterations": (
        {"objective": "uniter", "uniter.ot_iterations": "0"}, r"uniter.ot_iterations=0 must be an integer >= 1"),
}


@pytest.mark.parametrize("overrides,message", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_bad_config_fails_before_compilation(tmp_path, no_compilation, overrides, message):
    config = tiny_config(**overrides)
    with pytest.raises(ValueError, match=message):
        train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_zeroshot_eval_on_a_source_without_class_names(tmp_path, no_compilation, monkeypatch):
    from make_data import write_record_shards

    for split in ("train", "validation"):  # a caption set: no class names
        spec = write_record_shards(tmp_path / "captions_only", 8, split=split)
    config = tiny_config(**{"data.source": spec})
    message = (rf"evals.zeroshot.type='zeroshot' needs class names: data source '{re.escape(spec)}' has no class "
               r"names \(its manifest lists none; make_shards writes them for --class_folders input\) \(or set "
               r"evals.zeroshot.class_names, or remove evals.zeroshot\)")
    with pytest.raises(ValueError, match=message):
        train_and_evaluate(config, tmp_path / "run")


def test_workdir_under_a_regular_file(tmp_path, no_compilation):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    message = rf"cannot create workdir {re.escape(str(blocker / 'run'))}: {re.escape(str(blocker))} exists and is a " \
              r"regular file, not a directory; choose another --workdir"
    with pytest.raises(NotADirectoryError, match=message):
        prepare_workdir(blocker / "run")
    with pytest.raises(NotADirectoryError, match=message):
        train_and_evaluate(tiny_config(), blocker / "run")
    assert blocker.read_text() == "not a directory"


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
