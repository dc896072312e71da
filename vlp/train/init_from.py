"""`config.init_from`: start a run from the params of another vlp run, a vlp safetensors export, a Hugging Face
CLIPModel / SiglipModel folder or an open_clip checkpoint (fine-tuning, LiT). Optimizer state and step start
afresh."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from vlp.export.common import ExportError
from vlp.export.load import checkpoint_overrides, load_flat_params, model_spec
from vlp.models.layout import layout_of, stack_layers, unstack_layers


def check_config_matches(config: ml_collections.ConfigDict, fmt: str, path: str) -> None:
    """Raises if the run's model options differ from those the checkpoint was built with (options such as the
    activation or LayerNorm eps change the outputs without changing any shape)."""
    wrong = []
    for key, value in checkpoint_overrides(fmt, path).items():
        if key in ("objective", "model.image.variant", "model.text.vocab_size"):
            continue  # the objective may change (LiT); the table size is checked as a shape (unset = tokenizer's)
        node = config
        for part in key.split("."):
            node = node[part]
        if key == "model.image.patch_size" and config.model.image.variant:
            continue
        if node != value and not (isinstance(value, float) and isinstance(node, float) and np.isclose(node, value)):
            wrong.append(f"{key}={node!r} (checkpoint: {value!r})")
    if wrong:
        raise ExportError(f"init_from={path!r} ({fmt}) holds a different model than the config describes: "
                          f"{'; '.join(wrong)}. Set these keys as `python tools/import.py --format={fmt} "
                          f"--path={path} --out=...` prints them")


def load_init_params(config: ml_collections.ConfigDict, objective: Any, abstract_params: Any) -> Any:
    """Params from `config.init_from` (format vlp|safetensors|hf|open_clip), placed as `abstract_params`
    (ShapeDtypeStructs with shardings)."""
    fmt, path = config.init_from.format, config.init_from.path
    if fmt != "safetensors":
        check_config_matches(config, fmt, path)
    return load_exported_params(fmt, path, objective, abstract_params)


def load_exported_params(fmt: str, path: str, objective: Any, abstract_params: Any) -> Any:
    """Params of an export (format safetensors|hf|open_clip) for `objective`'s model, placed as `abstract_params`
    (ShapeDtypeStructs with shardings). The caller checks that the export holds the model `objective` builds."""
    model = getattr(objective, "model", None)
    spec = model_spec(model, objective.config.data.image_size)
    flat_abstract = traverse_util.flatten_dict(abstract_params, sep="/")
    # Every format holds per-layer names; a run with model.scan_layers=True stacks them after reading.
    expected = {k: tuple(v.shape) for k, v in unstack_layers(flat_abstract).items()}
    flat = load_flat_params(fmt, path, spec, expected)
    if layout_of(flat_abstract):
        flat = stack_layers(flat)
    placed = {k: jax.device_put(flat[k].astype(v.dtype), v.sharding) for k, v in flat_abstract.items()}
    return traverse_util.unflatten_dict(placed, sep="/")


def apply_checkpoint_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> None:
    """Sets the dotted keys `checkpoint_overrides` returned (typed values, None for unset placeholders)."""
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
