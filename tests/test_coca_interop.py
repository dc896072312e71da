"""CoCa <-> open_clip: a vlp CoCa run (coca.layout='open_clip') exported with tools/export.py loads in open_clip's
`create_model` with equal embeddings and decoder logits, open_clip's `generate` (top-k 1) gives vlp's greedy tokens,
the export comes back exactly through init_from, and a CoCa initialised by open_clip itself imports with equal
outputs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from test_coca import coca_config, make_batch
from test_interop import run_tool

from vlp import config as vlp_config
from vlp.data.tokenizer import load_tokenizer
from vlp.export import open_clip_coca
from vlp.export.common import ExportError
from vlp.export.load import checkpoint_overrides, model_spec
from vlp.objectives import get_objective

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
RTOL = 1e-4


def open_clip_layout_config():
    config = coca_config()
    vocab = load_tokenizer(config.data.tokenizer or None).vocab_size
    # open_clip's multimodal MLPs are always 4x the width; the start token is one extra row the tokenizer never emits
    config.model.text.mlp_dim = 4 * config.model.text.width
    config.model.text.vocab_size = vocab + 1
    config.coca.update(layout="open_clip", bos_id=vocab, gen_queries=5)
    config.async_checkpointing = False
    return config


def rel_err(got, want) -> float:
    return float(np.abs(np.asarray(got) - np.asarray(want)).max() / np.abs(np.asarray(want)).max())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A CoCa run at step 0 (params scaled so greedy captions depend on the image), exported by the tool."""
    from vlp.train.checkpoint import Checkpointer
    from vlp.train.trainer import build_experiment
    from vlp.train.workdir import prepare_workdir, write_run_files

    tmp = tmp_path_factory.mktemp("coca_interop")
    config = open_clip_layout_config()
    workdir = prepare_workdir(tmp / "run")
    exp = build_experiment(config)
    write_run_files(workdir, config)
    state = exp.init_state()
    flat = traverse_util.flatten_dict(state.params, sep="/")
    # At init the head and the image queries are tiny (std 0.02): every image would get the same caption.
    scale = {"decoder/head/kernel": 40.0, "gen_pooler/queries": 30.0}
    flat = {k: v * scale.get(k, 3.0 if "cross_" in k and k.endswith("kernel") else 1.0) for k, v in flat.items()}
    state = state.replace(params=traverse_util.unflatten_dict(flat, sep="/"))
    checkpointer = Checkpointer(workdir / "checkpoints", max_to_keep=1, async_save=False)
    checkpointer.save(0, state, None, force=True)
    checkpointer.close()
    run_tool("export", [f"--workdir={workdir}", "--format=open_clip", f"--out={tmp / 'oc'}"])
    model = open_clip.create_model(f"local-dir:{tmp / 'oc'}").eval()
    objective = exp.objective
    batch = make_batch(objective.tokenizer, n=8)
    forward = jax.jit(lambda p, images, text: objective.apply(p, images, text))
    return dict(config=config, objective=objective, params=jax.device_get(state.params), folder=tmp / "oc",
                model=model, batch=batch, forward=forward, abstract=exp.abstract_state.params)


def torch_inputs(batch, bos_id):
    """open_clip reads NCHW images and text that starts with the start token (vlp's decoder input at position p
    is token p-1, after its begin token)."""
    images = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy())
    text = np.concatenate([np.full((len(batch["text"]), 1), bos_id), batch["text"][:, :-1]], axis=1)
    return images, torch.from_numpy(text.astype(np.int64))


def open_clip_outputs(model, batch, bos_id):
    images, text = torch_inputs(batch, bos_id)
    with torch.no_grad():
        out = model(images, text, output_labels=False)
    return {"image_emb": out["image_features"].numpy(), "text_emb": out["text_features"].numpy(),
            "logits": out["logits"].numpy()}


def assert_outputs_match(got, want):
    for key in ("image_emb", "text_emb", "logits"):
        assert rel_err(got[key], want[key]) < RTOL, (key, rel_err(got[key], want[key]))
    # Not vacuous: the rows differ from each other.
    assert np.abs(want["text_emb"][0] - want["text_emb"][1]).max() > 1e-2
    assert np.abs(want["image_emb"][0] - want["image_emb"][1]).max() > 1e-2


def test_a_coca_run_exports_to_open_clip_with_equal_embeddings_and_logits(exported):
    got = exported["forward"](exported["params"], exported["batch"]["image"], exported["batch"]["text"])
    want = open_clip_outputs(exported["model"], exported["batch"], exported["config"].coca.bos_id)
    assert want["logits"].shape == got["logits"].shape
    assert_outputs_match(got, want)
    tokens = json.loads((exported["folder"] / "open_clip_config.json").read_text())["vlp_tokens"]
    assert tokens == {"bos_id": exported["config"].coca.bos_id, "eos_id": exported["objective"].tokenizer.eos_id,
                      "pad_id": 0}


def test_open_clip_generate_with_top_k_1_gives_vlps_greedy_tokens(exported, monkeypatch):
    import open_clip.coca_model as coca_model

    # open_clip 3.3 disables generate when transformers lacks BeamSearchScorer (gone in transformers 5); its
    # top-k path needs only the logits processors, which import fine.
    monkeypatch.setattr(coca_model, "_has_transformers", True)
    monkeypatch.setitem(coca_model.GENERATION_TYPES, "top_k", coca_model.TopKLogitsWarper)
    objective, tok = exported["objective"], exported["objective"].tokenizer
    images = exported["batch"]["image"]
    length = exported["config"].data.max_text_len
    want = np.asarray(objective.caption_fn(method="greedy")(exported["params"], jnp.asarray(images)))
    with torch.no_grad():  # seq_len counts the start token; min_seq_len 1 never blocks eos
        got = exported["model"].generate(
            torch_inputs(exported["batch"], exported["config"].coca.bos_id)[0], generation_type="top_k", top_k=1,
            seq_len=length + 1, min_seq_len=1, sot_token_id=exported["config"].coca.bos_id, eos_token_id=tok.eos_id,
            pad_token_id=tok.pad_id, fixed_output_length=True).numpy()
    assert (got[:, 0] == exported["config"].coca.bos_id).all()
    # A caption that ends early is the same; open_clip forces eos as the last token of a full-length one.
    ended = (want[:, :length - 1] == tok.eos_id).any(axis=1)
    np.testing.assert_array_equal(got[ended, 1:], want[ended])
    np.testing.assert_array_equal(got[~ended, 1:length], want[~ended, :length - 1])
    assert (got[~ended, length] == tok.eos_id).all()
    assert len({tuple(row) for row in want.tolist()}) >= 4  # different images get different captions


def test_the_export_comes_back_exactly_through_init_from(exported):
    from vlp.train.init_from import apply_checkpoint_overrides, load_init_params

    overrides = checkpoint_overrides("open_clip", exported["folder"])
    assert overrides["coca.layout"] == "open_clip" and overrides["coca.bos_id"] == exported["config"].coca.bos_id
    config = open_clip_layout_config()
    apply_checkpoint_overrides(config, overrides)
    vlp_config.apply_overrides(config, {"init_from.format": "open_clip", "init_from.path": str(exported["folder"])})
    params = load_init_params(config, exported["objective"], exported["abstract"])
    want = traverse_util.flatten_dict(exported["params"], sep="/")
    got = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_a_coca_initialised_by_open_clip_imports_with_equal_outputs(exported, tmp_path):
    from safetensors.torch import save_file

    from vlp.train.init_from import load_init_params

    raw = json.loads((exported["folder"] / "open_clip_config.json").read_text())
    torch.manual_seed(0)
    model = open_clip.CoCa(**{k: v for k, v in raw["model_cfg"].items() if k != "custom_text"}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # LayerNorms too; the head large enough to matter
            p.add_(torch.randn_like(p) * 0.2)
    (tmp_path / "oc").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "oc" / "open_clip_model.safetensors"))
    (tmp_path / "oc" / "open_clip_config.json").write_text(json.dumps(raw))
    config = open_clip_layout_config()
    vlp_config.apply_overrides(config, {"init_from.format": "open_clip", "init_from.path": str(tmp_path / "oc")})
    params = load_init_params(config, exported["objective"], exported["abstract"])
    got = exported["forward"](params, exported["batch"]["image"], exported["batch"]["text"])
    assert_outputs_match(got, open_clip_outputs(model, exported["batch"], config.coca.bos_id))


def test_what_open_clip_cannot_build_is_refused_with_the_option_named():
    config = coca_config()  # the vlp layout: two poolers, a learned begin embedding
    spec = model_spec(get_objective("coca")(config).model, config.data.image_size)
    with pytest.raises(ExportError, match=r"coca.layout='vlp'"):
        open_clip_coca.check_exportable(spec)
    config = open_clip_layout_config()
    config.model.text.mlp_dim = 64
    config.model.activation = "gelu_tanh"
    spec = model_spec(get_objective("coca")(config).model, config.data.image_size)
    with pytest.raises(ExportError, match=r"(?s)model.activation='gelu_tanh'.*model.text.mlp_dim=64"):
        open_clip_coca.check_exportable(spec)
    config = open_clip_layout_config()
    config.coca.bos_id = 0
    with pytest.raises(ValueError, match=r"coca.bos_id=0"):
        get_objective("coca")(config)
