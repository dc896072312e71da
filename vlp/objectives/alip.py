"""ALIP (Yang et al., ICCV 2023): a two-tower model trained on two text paths per image, the raw caption and a
synthetic caption, each through ALIP's adaptive contrastive loss whose weights come from the language and
description consistency gates (vlp/losses/adaptive.py; recipe and code notes in configs/alip.py).

One image embedding and one shared text tower serve both paths (deepglint/ALIP encodes both captions with the same
text transformer). The gates' three running mean similarities are state outside the optimizer (`TrainState.extra`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlp.data.transforms import SelectBothCaptions
from vlp.losses.adaptive import MOMENTUM_NAMES, consistency_gates, sharded_weighted_contrastive_loss
from vlp.models import flops
from vlp.models.two_tower import TwoTower
from vlp.objectives import register
from vlp.objectives.base import Metrics
from vlp.objectives.two_tower import TwoTowerObjective
from vlp.parallel.mesh import BATCH_AXES

TEXT_PATHS = ("raw", "caption")  # raw caption = the record's caption_noisy, synthetic = caption_synthetic


@register("alip")
class AlipObjective(TwoTowerObjective):
    has_extra = True
    supports_patch_dropout = False

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        return dict(
            momentum_rate=0.01,  # update rate of the gates' running mean similarities (deepglint/ALIP train.py)
            momentum_init=1.0,  # their value at step 0 (ALIP: 1, so the first steps' gates are mostly closed)
        )

    @classmethod
    def validate_config(cls, config: ml_collections.ConfigDict) -> None:
        block = config.alip
        if not 0.0 < block.momentum_rate <= 1.0:
            raise ValueError(f"invalid config: alip.momentum_rate={block.momentum_rate} must be in (0, 1]")
        if not -1.0 <= block.momentum_init <= 1.0:
            raise ValueError(f"invalid config: alip.momentum_init={block.momentum_init} must be a cosine in [-1, 1]")
        if config.loss.variant != "gather":
            raise ValueError(f"invalid config: loss.variant={config.loss.variant!r} is not supported by objective "
                             "'alip' (its per-example weighted loss has the gather form only); use 'gather'")
        if config.loss.label_smoothing:
            raise ValueError(f"invalid config: loss.label_smoothing={config.loss.label_smoothing} is not supported "
                             "by objective 'alip'; use 0.0")

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        batch = super().example_batch(batch_size)
        text = batch.pop("text")
        return dict(batch, text_noisy=text, text_synthetic=np.zeros_like(text))

    def train_example_transform(self, default: Any) -> Any:
        del default  # ALIP trains on both captions of every example
        return SelectBothCaptions()

    def init(self, rng: jax.Array) -> Any:
        batch = self.example_batch(1)
        return self.model.init(rng, jnp.asarray(batch["image"]), jnp.asarray(batch["text_noisy"]))["params"]

    def init_extra(self, params: Any) -> Any:
        return {"momenta": jnp.full((len(MOMENTUM_NAMES),), self.config.alip.momentum_init, jnp.float32)}

    def loss_fn(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, Metrics]:
        raise NotImplementedError("ALIP's gates need their running means: the trainer calls loss_fn_with_extra")

    def loss_fn_with_extra(self, params: Any, extra: Any, batch: dict[str, jax.Array], rng: jax.Array,
                           step: jax.Array) -> tuple[jax.Array, tuple[Metrics, Any]]:
        del rng, step
        out = self.model.apply({"params": params}, batch["image"], batch["text_noisy"])
        image_emb, scale = out["image_emb"], out["logit_scale"]
        texts = {"raw": out["text_emb"],
                 "caption": self.model.apply({"params": params}, batch["text_synthetic"], method=TwoTower.encode_text)}
        weights, momenta = consistency_gates(image_emb, texts["raw"], texts["caption"], extra["momenta"],
                                             self.config.alip.momentum_rate)
        loss, metrics = jnp.zeros((), jnp.float32), {"logit_scale": scale}
        for path in TEXT_PATHS:
            term, m = sharded_weighted_contrastive_loss(image_emb, texts[path], scale,
                                                        weights["sample"] * weights[path], batch_axes=BATCH_AXES)
            loss += term
            metrics.update({f"loss_{path}": term, **{f"{k}_{path}": v for k, v in m.items()}})
        metrics.update({f"gate_{k}_mean": w.mean() for k, w in weights.items()})
        metrics.update({f"momentum_{name}": momenta[i] for i, name in enumerate(MOMENTUM_NAMES)})
        return loss, (metrics, {"momenta": momenta})

    def update_extra(self, extra: Any, params: Any, aux: Any, step: jax.Array) -> Any:
        return aux

    def train_flops_per_example(self) -> float:
        """CLIP's count plus the second text path (its forward + backward, and its row of the logits)."""
        text = self.model.text
        second = flops.text_forward_flops(text["max_len"], text["width"], text["depth"], text["mlp_dim"],
                                          text["causal"])
        embed_dim = self.model.embed_dim or self.model.image["width"]
        second += 2 * embed_dim * text["width"] * self.model.text_projection
        second += flops.contrastive_logits_forward_flops(self.config.batch_size, embed_dim)
        return super().train_flops_per_example() + 3.0 * second
