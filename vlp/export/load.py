"""Read params from vlp safetensors, Hugging Face and open_clip checkpoints into a vlp model's param layout.

`checkpoint_overrides` says which vlp config builds the model a checkpoint holds (tools/import.py prints it;
`init_from` checks a run's config against it); `load_flat_params` maps the tensors onto the shapes the model
expects, naming any parameter whose name or shape does not fit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from vlp.export import interop, open_clip, open_clip_coca
from vlp.export.common import ExportError, ModelSpec
from vlp.export.mapping import MappingError
from vlp.export.safetensors_io import flatten_params, load_safetensors

FORMATS = ("safetensors", "hf", "open_clip")


def checkpoint_overrides(fmt: str, path: str | Path) -> dict[str, Any]:
    """vlp config keys (dotted) describing the checkpoint's architecture; {} when the checkpoint has no config."""
    if fmt == "hf":
        config, _, module = interop.read_hf(path)
        return module.config_overrides(config)
    if fmt == "open_clip":
        config, _ = interop.read_open_clip(path)
        if config and "multimodal_cfg" in config:
            overrides = open_clip_coca.config_overrides(config)
            if "bos_id" in config.get("vlp_tokens", {}):
                overrides["coca.bos_id"] = config["vlp_tokens"]["bos_id"]
            return overrides
        return open_clip.config_overrides(config) if config else {}
    if fmt == "safetensors":
        return {}
    raise ValueError(f"unknown checkpoint format {fmt!r}; valid: {FORMATS}")


def load_flat_params(fmt: str, path: str | Path, spec: ModelSpec | open_clip_coca.CocaSpec | None,
                     expected: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Flat ("/"-joined) fp32 params for a model whose params have the `expected` shapes.

    `spec` describes the vlp model (needed for hf and open_clip, whose names depend on the architecture; a
    `CocaSpec` reads open_clip's CoCa).
    """
    if fmt == "safetensors":
        params, _ = load_safetensors(path)
        return _check_flat(flatten_params(params), expected, str(path))
    if spec is None:
        raise ExportError(f"format {fmt!r} maps onto two-tower models (CLIP, SigLIP, ALIGN) and (open_clip) CoCa "
                          "only")
    if isinstance(spec, open_clip_coca.CocaSpec) and fmt != "open_clip":
        raise ExportError(f"format {fmt!r} holds no CoCa; CoCa imports from open_clip (or vlp safetensors)")
    if fmt == "hf":
        config, state, module = interop.read_hf(path)
        _check_eos(config.get("text_config", {}).get("eos_token_id"), spec, str(path))
    elif fmt == "open_clip":
        _, state = interop.read_open_clip(path)
        module = interop.open_clip_module(spec)
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}; valid: {FORMATS}")
    return interop.params_from_state_dict(module, spec, state, expected)


def model_spec(model: Any, image_size: int) -> ModelSpec | open_clip_coca.CocaSpec | None:
    """What the interop formats need to know of an objective's model: a `ModelSpec` (two-tower), a `CocaSpec`
    (CoCa / CapPa `Captioner`) or None (nothing maps)."""
    from vlp.models.coca import Captioner

    if isinstance(model, Captioner):
        return open_clip_coca.CocaSpec.from_model(model, image_size)
    return ModelSpec.from_model(model, image_size) if hasattr(model, "image_projection") else None


def _check_eos(checkpoint_eos: int | None, spec: ModelSpec, where: str) -> None:
    """An end-of-text-pooled tower must pool where the checkpoint was trained to: at its tokenizer's eos id."""
    if spec.text["pool"] != "eot" or checkpoint_eos is None:
        return
    if checkpoint_eos == 2:  # legacy CLIPModel config: pools at argmax(ids), the first eos iff eos is the top id
        if spec.text["eos_id"] != spec.text["vocab_size"] - 1:
            raise ExportError(f"{where} is a legacy CLIPModel config (eos_token_id=2: text pooled at the highest "
                              f"id), but the run's tokenizer's eos id {spec.text['eos_id']} is not its highest id "
                              f"({spec.text['vocab_size'] - 1}); set data.tokenizer to the checkpoint's tokenizer")
        return
    if checkpoint_eos != spec.text["eos_id"]:
        raise ExportError(f"{where} pools text at end-of-text id {checkpoint_eos}, but the run's tokenizer ends "
                          f"text with id {spec.text['eos_id']}; set data.tokenizer to the checkpoint's tokenizer "
                          "(its tokenizer.json or spiece.model)")


def _check_flat(flat: dict[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], where: str
                ) -> dict[str, np.ndarray]:
    missing, extra = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
    if missing or extra:
        raise MappingError(f"{where}: params do not match the model: missing {missing[:5]}, unexpected "
                           f"{extra[:5]}")
    for name, shape in expected.items():
        if tuple(flat[name].shape) != tuple(shape):
            raise MappingError(f"parameter {name}: expected shape {tuple(shape)}, found {tuple(flat[name].shape)} "
                               f"in {where}")
    return {k: np.asarray(v, np.float32) for k, v in flat.items()}
