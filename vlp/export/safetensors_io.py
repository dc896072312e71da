"""vlp's own weight format: a safetensors file of the params (flat `/`-joined names, fp32) plus a JSON model config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from vlp.models.layout import unstack_layers


def flatten_params(params: Any) -> dict[str, np.ndarray]:
    """{"image": {"patch_embed": {"kernel": a}}} -> {"image/patch_embed/kernel": a} (numpy, contiguous), with
    per-layer names (`encoder/block_{i}/...`) whether or not the run scanned its layers: every export and import
    speaks this layout."""
    flat = unstack_layers(traverse_util.flatten_dict(params, sep="/"))
    return {k: np.array(v, order="C") for k, v in flat.items()}  # (ascontiguousarray makes scalars 1-d)


def unflatten_params(flat: dict[str, np.ndarray]) -> dict:
    return traverse_util.unflatten_dict(flat, sep="/")


def save_safetensors(params: Any, model_config: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Writes `<out_dir>/model.safetensors` and `<out_dir>/model_config.json`; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights, config_path = out / "model.safetensors", out / "model_config.json"
    flat = flatten_params(params)
    save_file(flat, str(weights), metadata={"format": "vlp", "num_tensors": str(len(flat))})
    config_path.write_text(json.dumps(model_config, indent=2, default=str))
    return weights, config_path


def load_safetensors(path: str | Path) -> tuple[dict, dict]:
    """Reads what `save_safetensors` wrote: (nested params, model config)."""
    path = Path(path)
    weights = path / "model.safetensors" if path.is_dir() else path
    config_path = weights.with_name("model_config.json")
    if not weights.is_file():
        raise FileNotFoundError(f"no safetensors weights at {weights}")
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    return unflatten_params(load_file(str(weights))), config
