"""Interop parity: tiny vlp models with every parameter randomised, exported to Hugging Face (CLIPModel,
SiglipModel) and open_clip, loaded there with torch, give the same image and text embeddings (max abs diff < 1e-6,
fp32; measured <= 2.8e-7) on the same pixels and token ids; reading the export back gives the params bit for bit;
a random CLIPModel saved by transformers imports into vlp with the same embeddings."""

from __future__ import annotations

import jax
import numpy as np
import open_clip
import pytest
import torch
import transformers
from conftest import load_tool, tiny_config
from flax import traverse_util

from vlp import config as vlp_config
from vlp.export import interop
from vlp.export.common import ExportError, ModelSpec
from vlp.export.load import checkpoint_overrides, load_flat_params
from vlp.export.mapping import MappingError
from vlp.objectives import get_objective
from vlp.parallel.sharding import strip_boxes

ATOL = 1e-6  # measured max abs diffs 0.9e-7 .. 2.8e-7 over every parity test (fp32, CPU)
BATCH = 4


def small(arg: str = "", **updates) -> object:
    """A 32-wide, 2-deep model on 16 px images and 8 tokens (configs/clip.py:tiny or configs/siglip.py:tiny)."""
    config = tiny_config(**updates) if not arg else vlp_config.load_config_file(arg)
    config.model.image.update(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8)
    config.model.text.update(width=32, depth=2, mlp_dim=64, num_heads=2)
    config.data.image_size, config.data.max_text_len = 16, 8
    vlp_config.apply_overrides(config, {k: str(v) for k, v in updates.items()})
    if not config.model.image_projection:
        config.model.embed_dim = config.model.image.width
    return config


def random_param(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    noise = rng.normal(0.0, 1.0, shape).astype(np.float32)
    if name.endswith("/scale"):  # LayerNorm
        return 1.0 + 0.2 * noise
    if name.endswith("/kernel") or name.endswith("/embedding"):
        in_axes = 3 if "patch_embed" in name else 2 if name.endswith("out/kernel") else 1
        return (noise / np.sqrt(np.prod(shape[:in_axes]))).astype(np.float32)
    return 0.2 * noise


class Model:
    """A vlp objective with randomised params (every leaf: LayerNorm scales and biases, logit scale/bias too)."""

    def __init__(self, config, seed: int = 0):
        self.config = config
        self.objective = get_objective(config.objective)(config)
        shapes = traverse_util.flatten_dict(strip_boxes(jax.eval_shape(self.objective.init, jax.random.key(0))),
                                            sep="/")
        rng = np.random.default_rng(seed)
        # Random values of every param at a scale that keeps activations O(1) (no init compile needed).
        self.params = traverse_util.unflatten_dict(
            {k: random_param(rng, k, tuple(v.shape)) for k, v in sorted(shapes.items())}, sep="/")
        self.flat = traverse_util.flatten_dict(self.params, sep="/")
        self.spec = ModelSpec.from_model(self.objective.model, config.data.image_size)

    def embed(self, images: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return embed(self.objective, self.params, images, tokens)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.flat.items()}


def embed(objective, params, images: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """vlp's L2-normalised image and text embeddings, [B, D] each (one jitted call)."""
    fn = jax.jit(lambda p, i, t: (objective.encode_image(p, i), objective.encode_text(p, t)))
    return tuple(np.asarray(x) for x in fn(params, images, tokens))


def inputs(spec: ModelSpec, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Pixels in [-1, 1] [B, H, W, 3] and token ids [B, L]: random pieces, eos at varied positions (last one
    without padding), then padding."""
    rng = np.random.default_rng(seed)
    size, text = spec.image_size, spec.text
    images = rng.uniform(-1, 1, (BATCH, size, size, 3)).astype(np.float32)
    length = text["max_len"]
    tokens = np.full((BATCH, length), text["pad_id"], np.int32)
    for row, eos_at in zip(tokens, (1, 3, length - 3, length - 1), strict=True):
        row[:eos_at] = rng.integers(2, text["eos_id"], eos_at)
        row[eos_at] = text["eos_id"]
    return images, tokens


def normalized(x: torch.Tensor) -> np.ndarray:
    x = getattr(x, "pooler_output", x)  # transformers 5 returns a model output from get_*_features
    return torch.nn.functional.normalize(x, dim=-1).numpy()


def torch_embeddings(model, images: np.ndarray, tokens: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    ids = torch.from_numpy(tokens.astype(np.int64))
    model.eval()
    with torch.no_grad():
        if kind == "open_clip":
            return normalized(model.encode_image(pixels)), normalized(model.encode_text(ids))
        return normalized(model.get_image_features(pixel_values=pixels)), normalized(model.get_text_features(
            input_ids=ids))


@pytest.fixture(scope="module")
def clip_model() -> Model:
    return Model(small())


@pytest.fixture(scope="module")
def siglip_model() -> Model:
    return Model(small("configs/siglip.py:tiny"))


def assert_embeddings_match(got_image, got_text, want_image, want_text) -> None:
    diffs = float(np.abs(got_image - want_image).max()), float(np.abs(got_text - want_text).max())
    assert diffs[0] < ATOL and diffs[1] < ATOL, diffs


def assert_parity(model: Model, torch_model, kind: str) -> None:
    images, tokens = inputs(model.spec)
    want_image, want_text = model.embed(images, tokens)
    got_image, got_text = torch_embeddings(torch_model, images, tokens, kind)
    assert_embeddings_match(got_image, got_text, want_image, want_text)
    # The comparison is not vacuous: the rows differ from each other.
    assert np.abs(want_text[0] - want_text[1]).max() > 1e-2


def assert_round_trip(model: Model, fmt: str, path) -> None:
    back = load_flat_params(fmt, path, model.spec, model.expected_shapes())
    assert sorted(back) == sorted(model.flat)
    for name, value in model.flat.items():
        np.testing.assert_array_equal(back[name], np.asarray(value), err_msg=name)


def test_clip_exports_to_hf_clipmodel_with_equal_embeddings(clip_model, tmp_path):
    out = interop.write_hf(clip_model.flat, clip_model.spec, tmp_path / "hf")
    hf = transformers.CLIPModel.from_pretrained(out)
    assert hf.config.text_config.eos_token_id == clip_model.spec.text["eos_id"]  # first-eos pooling, not argmax
    assert_parity(clip_model, hf, "hf")
    assert_round_trip(clip_model, "hf", out)


def test_siglip_exports_to_hf_siglipmodel_with_equal_embeddings(siglip_model, tmp_path):
    out = interop.write_hf(siglip_model.flat, siglip_model.spec, tmp_path / "hf")
    hf = transformers.SiglipModel.from_pretrained(out)
    assert_parity(siglip_model, hf, "hf")
    np.testing.assert_allclose(hf.logit_bias.item(), siglip_model.flat["logit_bias"], rtol=1e-6)
    assert_round_trip(siglip_model, "hf", out)


def test_clip_exports_to_open_clip_with_equal_embeddings(clip_model, tmp_path):
    out = interop.write_open_clip(clip_model.flat, clip_model.spec, tmp_path / "oc")
    model = open_clip.create_model(f"local-dir:{out}")
    assert_parity(clip_model, model, "open_clip")
    assert_round_trip(clip_model, "open_clip", out)


def test_unfused_qkv_tanh_gelu_and_eps_1e6_export_to_open_clip(tmp_path):
    model = Model(small(**{"model.fused_qkv": False, "model.activation": "gelu_tanh", "model.ln_eps": 1e-6}), seed=3)
    out = interop.write_open_clip(model.flat, model.spec, tmp_path / "oc")
    assert_parity(model, open_clip.create_model(f"local-dir:{out}"), "open_clip")
    assert_round_trip(model, "open_clip", out)


def test_a_random_hf_clipmodel_saved_to_disk_imports_with_equal_embeddings(tmp_path):
    from vlp.train.init_from import apply_checkpoint_overrides, load_init_params
    from vlp.train.trainer import build_experiment

    torch.manual_seed(0)
    hf_config = transformers.CLIPConfig(
        text_config=dict(vocab_size=384, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=8, hidden_act="quick_gelu",
                         pad_token_id=0, eos_token_id=383, bos_token_id=383),
        vision_config=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=16, patch_size=4, hidden_act="quick_gelu"),
        projection_dim=24)
    hf = transformers.CLIPModel(hf_config)
    with torch.no_grad():
        for p in hf.parameters():  # LayerNorm scales and biases too
            p.add_(torch.randn_like(p) * 0.2)
    hf.save_pretrained(tmp_path / "hf")
    config = tiny_config()
    apply_checkpoint_overrides(config, checkpoint_overrides("hf", tmp_path / "hf"))
    vlp_config.apply_overrides(config, {"init_from.format": "hf", "init_from.path": str(tmp_path / "hf")})
    exp = build_experiment(config)
    params = load_init_params(config, exp.objective, exp.abstract_state.params)
    spec = ModelSpec.from_model(exp.objective.model, config.data.image_size)
    images, tokens = inputs(spec)
    got_image, got_text = embed(exp.objective, params, images, tokens)
    want_image, want_text = torch_embeddings(hf, images, tokens, "hf")
    assert_embeddings_match(got_image, got_text, want_image, want_text)


def test_the_clip_and_siglip_configs_are_exportable():
    for arg, module in (("configs/clip.py:tiny", "hf_clip"), ("configs/clip.py:B/16", "hf_clip"),
                        ("configs/siglip.py:tiny", "hf_siglip"), ("configs/siglip.py:B/16", "hf_siglip"),
                        ("configs/siglip.py:So400m/14", "hf_siglip")):
        config = vlp_config.load_config_file(arg)
        objective = get_objective(config.objective)(config)
        spec = ModelSpec.from_model(objective.model, config.data.image_size)
        assert interop.hf_module(spec).__name__.endswith(module)
        interop.hf_module(spec).check_exportable(spec)
    clip_spec = ModelSpec.from_model(get_objective("clip")(vlp_config.load_config_file("configs/clip.py:tiny")).model,
                                     32)
    interop.open_clip.check_exportable(clip_spec)


def test_unrepresentable_options_are_refused_with_the_option_named(siglip_model, clip_model, tmp_path):
    with pytest.raises(ExportError, match=r"model.image.pool='map'.*use 'cls'"):
        interop.write_open_clip(siglip_model.flat, siglip_model.spec, tmp_path / "oc")
    spec = ModelSpec.from_model(get_objective("clip")(small(**{"model.image.patch_bias": True})).model, 16)
    with pytest.raises(ExportError, match=r"model.image.patch_bias=True: CLIPModel's patch embedding has no bias"):
        interop.write_hf({}, spec, tmp_path / "hf")


def test_a_wrong_shape_names_the_parameter_and_both_shapes(clip_model, tmp_path):
    out = interop.write_hf(clip_model.flat, clip_model.spec, tmp_path / "hf")
    expected = clip_model.expected_shapes()
    expected["text/pos_embed"] = (16, 32)  # a model reading 16 tokens
    with pytest.raises(MappingError, match=r"parameter text_model.embeddings.position_embedding.weight: expected "
                                           r"shape \(16, 32\).*found \(8, 32\)"):
        load_flat_params("hf", out, clip_model.spec, expected)


def run_tool(name: str, argv: list[str]):
    return load_tool(name).main(argv)


def test_export_and_import_tools_round_trip_a_run(tmp_path, capsys):
    from vlp.train.checkpoint import Checkpointer
    from vlp.train.trainer import build_experiment
    from vlp.train.workdir import prepare_workdir, write_run_files

    workdir, config = prepare_workdir(tmp_path / "run"), tiny_config()
    exp = build_experiment(config)  # a run's workdir at step 0, without the cost of training it
    write_run_files(workdir, config)
    checkpointer = Checkpointer(workdir / "checkpoints", max_to_keep=1, async_save=False)
    state = exp.init_state()
    checkpointer.save(0, state, None, force=True)
    checkpointer.close()
    run_tool("export", [f"--workdir={workdir}", "--format=hf", f"--out={tmp_path / 'hf'}"])
    assert (tmp_path / "hf" / "spiece.model").is_file() and (tmp_path / "hf" / "TOKENIZER.md").is_file()
    run_tool("import", ["--format=hf", f"--path={tmp_path / 'hf'}", f"--out={tmp_path / 'back'}"])
    assert "--config.init_from.format=safetensors" in capsys.readouterr().out
    back = load_flat_params("safetensors", tmp_path / "back", None,
                            {k: v.shape for k, v in traverse_util.flatten_dict(state.params, sep="/").items()})
    for name, value in traverse_util.flatten_dict(state.params, sep="/").items():
        np.testing.assert_array_equal(back[name], np.asarray(value), err_msg=name)


def test_a_hf_tokenizer_json_encodes_as_the_file_says_in_vlps_layout(tmp_path):
    import pickle

    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from vlp.data.tokenizer import load_tokenizer

    words = ["red", "circle", "blue", "square", "left", "a"]
    vocab = {w: i for i, w in enumerate(words)} | {"<|startoftext|>": 6, "<|endoftext|>": 7, "[UNK]": 8}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])  # marked special, as in CLIP's file
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(  # CLIP's template: <|startoftext|> $A <|endoftext|>
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 6), ("<|endoftext|>", 7)])
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = pickle.loads(pickle.dumps(load_tokenizer(str(tmp_path / "tokenizer.json"))))  # as grain workers get it
    assert (hf.vocab_size, hf.eos_id, hf.pad_id) == (9, 7, 7)  # no pad token in the file: pad with eos (CLIP)
    ids = hf.encode(["red circle", "a blue square left left left"], max_len=6)
    np.testing.assert_array_equal(ids, [[6, 0, 1, 7, 7, 7], [6, 5, 2, 3, 4, 7]])  # truncated: eos stays last
    assert ids.dtype == np.int32
    assert hf.decode(ids[0]) == "red circle"


def test_init_from_a_checkpoint_of_another_architecture_names_the_keys(clip_model, tmp_path):
    from vlp.train.init_from import check_config_matches

    out = interop.write_hf(clip_model.flat, clip_model.spec, tmp_path / "hf")
    with pytest.raises(ExportError, match=r"model.image.pool='map' \(checkpoint: 'cls'\).*model.ln_eps=1e-06 "
                                          r"\(checkpoint: 1e-05\)"):
        check_config_matches(vlp_config.load_config_file("configs/siglip.py:tiny"), "hf", str(out))
    config = tiny_config(**{"init_from.format": "onnx"})
    with pytest.raises(ValueError, match=r"init_from.format='onnx'; valid: \('vlp', 'safetensors', 'hf', "
                                         r"'open_clip'\)"):
        vlp_config.validate(config)


def test_a_random_open_clip_state_dict_file_imports_with_equal_embeddings(clip_model, tmp_path):
    import shutil

    exported = interop.write_open_clip(clip_model.flat, clip_model.spec, tmp_path / "oc")
    torch.manual_seed(0)
    oc = open_clip.create_model(f"local-dir:{exported}", load_weights=False)  # open_clip's own random init
    with torch.no_grad():
        for p in oc.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path / "native"
    folder.mkdir()
    shutil.copy(exported / "open_clip_config.json", folder)
    torch.save(oc.state_dict(), folder / "open_clip_pytorch_model.bin")  # a torch pickle, as open_clip saves
    flat = load_flat_params("open_clip", folder / "open_clip_pytorch_model.bin", clip_model.spec,
                            clip_model.expected_shapes())
    images, tokens = inputs(clip_model.spec)
    got_image, got_text = embed(clip_model.objective, traverse_util.unflatten_dict(flat, sep="/"), images, tokens)
    want_image, want_text = torch_embeddings(oc, images, tokens, "open_clip")
    assert_embeddings_match(got_image, got_text, want_image, want_text)


def test_a_legacy_hf_clip_config_pooling_at_argmax_imports(clip_model, tmp_path):
    import json

    out = interop.write_hf(clip_model.flat, clip_model.spec, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    config["text_config"]["eos_token_id"] = 2  # as OpenAI's CLIP configs: HF pools at argmax(input_ids)
    (out / "config.json").write_text(json.dumps(config))
    assert_parity(clip_model, transformers.CLIPModel.from_pretrained(out), "hf")  # eos 383 is the highest id
    assert_round_trip(clip_model, "hf", out)
