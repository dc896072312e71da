"""Writers and readers of the Hugging Face (CLIPModel / SiglipModel) and open_clip folders.

No torch needed: weights go through `safetensors.numpy`. A Hugging Face folder holds config.json,
model.safetensors, the sentencepiece tokenizer (spiece.model + tokenizer_config.json) and
preprocessor_config.json; an open_clip folder holds open_clip_config.json and open_clip_model.safetensors (what
`open_clip.create_model("local-dir:<folder>")` reads).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from safetensors.numpy import load_file, save_file

from vlp.export import hf_clip, hf_siglip, mapping, open_clip, open_clip_coca
from vlp.export.common import BUFFERS, ExportError, ModelSpec

# vlp feeds images in [-1, 1]: pixel / 255 normalised with mean 0.5 and std 0.5 per channel.
IMAGE_MEAN, IMAGE_STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
TOKENIZER_NOTE = (
    "The tokenizer in this folder (spiece.model) is the sentencepiece model the vlp run was trained with, NOT the "
    "OpenAI CLIP BPE tokenizer that CLIPTokenizer expects. Encode text with it as vlp does: pieces, then the "
    "end-of-text id {eos} ('</s>'), then padding id {pad} up to {max_len} tokens, e.g.\n"
    "  sp = sentencepiece.SentencePieceProcessor(model_file='spiece.model')\n"
    "  ids = sp.encode(text)[:{trunc}] + [{eos}]; ids += [{pad}] * ({max_len} - len(ids))\n")


def hf_module(spec: ModelSpec) -> Any:
    """hf_siglip for MAP-pooled (SigLIP-style) models, else hf_clip."""
    return hf_siglip if spec.image["pool"] == "map" else hf_clip


def write_hf(flat_params: Mapping[str, np.ndarray], spec: ModelSpec, out_dir: str | Path,
             tokenizer_model: bytes | None = None, max_text_len: int | None = None) -> Path:
    """Writes a transformers CLIPModel or SiglipModel folder; raises ExportError if the model does not fit.

    `tokenizer_model`: the serialized sentencepiece model the run used (written as spiece.model)."""
    module = hf_module(spec)
    module.check_exportable(spec)
    state_dict = mapping.to_state_dict(module.rules(spec), flat_params)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(module.hf_config(spec), indent=2))
    size = spec.image_size
    is_siglip = module is hf_siglip
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SiglipImageProcessor" if is_siglip else "CLIPImageProcessor",
        "do_resize": True, "size": {"height": size, "width": size} if is_siglip else {"shortest_edge": size},
        "do_center_crop": not is_siglip, "crop_size": {"height": size, "width": size}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": IMAGE_MEAN, "image_std": IMAGE_STD,
        **({"processor_class": "SiglipProcessor"} if is_siglip else {}),
    }, indent=2))
    if tokenizer_model is not None:
        _write_tokenizer(out, tokenizer_model, spec, max_text_len or spec.text["max_len"], is_siglip)
    return out


def _write_tokenizer(out: Path, model_proto: bytes, spec: ModelSpec, max_len: int, is_siglip: bool) -> None:
    (out / "spiece.model").write_bytes(model_proto)
    text = spec.text
    (out / "TOKENIZER.md").write_text(TOKENIZER_NOTE.format(eos=text["eos_id"], pad=text["pad_id"], max_len=max_len,
                                                            trunc=max_len - 1))
    if is_siglip:
        # SiglipTokenizer appends '</s>' and pads with '<pad>' as vlp does (its text cleaning only lower-cases and
        # strips punctuation, which vlp's case-folding tokenizer mostly matches).
        (out / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "SiglipTokenizer", "processor_class": "SiglipProcessor", "model_max_length": max_len,
            "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "do_lower_case": True,
        }, indent=2))


def open_clip_module(spec: ModelSpec | open_clip_coca.CocaSpec) -> Any:
    """open_clip_coca for a CoCa (`CocaSpec`), else open_clip (CLIP)."""
    return open_clip_coca if isinstance(spec, open_clip_coca.CocaSpec) else open_clip


def write_open_clip(flat_params: Mapping[str, np.ndarray], spec: ModelSpec | open_clip_coca.CocaSpec,
                    out_dir: str | Path, tokens: dict[str, int] | None = None) -> Path:
    """Writes open_clip_config.json + open_clip_model.safetensors; raises ExportError if the model does not fit.

    `tokens`: the run's special token ids (bos_id, eos_id, pad_id), stored beside `model_cfg` (open_clip ignores
    them; `generate` needs them as sot/eos/pad_token_id, and init_from reads bos_id back)."""
    module = open_clip_module(spec)
    module.check_exportable(spec)
    state_dict = mapping.to_state_dict(module.rules(spec), flat_params)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(out / "open_clip_model.safetensors"), metadata={"format": "pt"})
    preprocess = {"size": spec.image_size, "mean": IMAGE_MEAN, "std": IMAGE_STD, "interpolation": "bicubic",
                  "resize_mode": "shortest"}
    (out / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": module.model_config(spec), "preprocess_cfg": preprocess,
         **({"vlp_tokens": tokens} if tokens else {})}, indent=2))
    return out


def _load_tensors(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {path} (a torch pickle) needs torch: pip install 'vlp[interop]', or convert "
                          "it to .safetensors") from e
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    # Checkpoints saved from DistributedDataParallel prefix every name with "module.".
    return {k.removeprefix("module."): v.float().numpy() for k, v in state.items()}


def _find_file(path: Path, names: tuple[str, ...], what: str) -> Path:
    if path.is_file():
        return path
    for name in names:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"no {what} in {path}; expected one of {list(names)}")


def read_hf(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray], Any]:
    """A transformers CLIPModel / SiglipModel folder -> (config.json, state dict, hf_clip or hf_siglip)."""
    folder = Path(path)
    folder = folder.parent if folder.is_file() else folder
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {folder}: give a Hugging Face model folder (save_pretrained)")
    config = json.loads(config_path.read_text())
    module = {"clip": hf_clip, "siglip": hf_siglip}.get(config.get("model_type"))
    if module is None:
        raise ExportError(f"{config_path}: model_type={config.get('model_type')!r}; vlp imports 'clip' "
                          "(CLIPModel) and 'siglip' (SiglipModel)")
    weights = _find_file(Path(path), ("model.safetensors", "pytorch_model.bin"), "Hugging Face weights")
    state = _load_tensors(weights)
    return config, state, module


def read_open_clip(path: str | Path) -> tuple[dict[str, Any] | None, dict[str, np.ndarray]]:
    """An open_clip folder (open_clip_config.json + weights) or state dict file -> (model config or None, state).

    A bare state dict file takes its config from an open_clip_config.json beside it, if any.
    """
    path = Path(path)
    weights = _find_file(path, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors"),
                         "open_clip weights")
    config_path = weights.parent / "open_clip_config.json"
    config = None
    if config_path.is_file():
        raw = json.loads(config_path.read_text())
        config = dict(raw.get("model_cfg", raw))
        if "vlp_tokens" in raw:  # a vlp export's special token ids (see write_open_clip)
            config["vlp_tokens"] = raw["vlp_tokens"]
    return config, _load_tensors(weights)


def params_from_state_dict(module: Any, spec: ModelSpec, state_dict: Mapping[str, np.ndarray],
                           expected: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Flat vlp params for the model `spec` describes; ExportError if it cannot hold this checkpoint."""
    module.check_exportable(spec)
    return mapping.from_state_dict(module.rules(spec), state_dict, expected, ignore=BUFFERS)
