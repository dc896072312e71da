"""What the interop writers and readers share: the description of a vlp two-tower model (`ModelSpec`),
activation names in Hugging Face / vlp, and the error raised when a model cannot be represented."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

# Hugging Face `hidden_act` (transformers.activations.ACT2FN) <-> vlp `model.activation`.
ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu", "relu": "relu"}
HF_TO_ACT = {**{v: k for k, v in ACT_TO_HF.items()}, "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh"}

BUFFERS = ("position_ids", "attn_mask")  # torch buffers some state dicts carry; no params


class ExportError(ValueError):
    """A vlp model (or a checkpoint) uses an option the other format cannot represent."""


def require(checks: Sequence[tuple[bool, str]], target: str) -> None:
    """Raises one ExportError listing every failed check (each message names the vlp option and what is valid)."""
    failed = [message for ok, message in checks if not ok]
    if failed:
        raise ExportError(f"this vlp model cannot be represented as {target}:\n  - " + "\n  - ".join(failed))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The options of a vlp TwoTower model that an exported architecture must reproduce.

    `image` / `text`: the ViT / TextTransformer keyword arguments (as `TwoTower.image` / `.text`, with
    `vocab_size`, `max_len`, `eos_id` and `pad_id` in `text`); `logit_bias`: its init value or None.
    """

    image: dict[str, Any]
    text: dict[str, Any]
    image_size: int
    embed_dim: int | None
    image_projection: bool
    text_projection: bool
    projection_bias: bool
    scale_parameterization: str
    logit_bias: float | None

    @classmethod
    def from_model(cls, model: Any, image_size: int) -> ModelSpec:
        """From a `vlp.models.two_tower.TwoTower` (unbound is fine) and the training image size."""
        return cls(dict(model.image), dict(model.text), image_size, model.embed_dim, model.image_projection,
                   model.text_projection, model.projection_bias, model.logit_scale_parameterization,
                   model.logit_bias_init)
