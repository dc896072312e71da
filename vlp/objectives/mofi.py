"""MOFI (Wu et al., 2023, "MOFI: Learning Image Representations from Noisy Entity Annotated Images"): CLIP's
two towers trained jointly on (i) entity classification of the image embedding over all entities and (ii) the
contrastive loss between images and their entity names as free-form text (the paper's multi-task recipe).

loss = w_con * InfoNCE_sym(image_emb, text_emb(entity names), t) + w_ent * CE_multilabel(image_emb @ W, entities)
with W [D, E] sharded on its entity axis (`classes` -> fsdp; the paper's I2E has 2M entities). Entities come from
each record's label (`vlp.data.entities`: one per record, or colour + shape on shapes).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlp.data import sources
from vlp.data.entities import ENTITIES_KEY, ENTITY_MODES, AddEntities, entity_names
from vlp.losses.entity import multilabel_softmax_loss
from vlp.models import layers
from vlp.objectives import register
from vlp.objectives.base import Metrics
from vlp.objectives.clip import ClipObjective

HEAD = "entity_head"


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"invalid config: {message}")


@register("mofi")
class MofiObjective(ClipObjective):

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        return dict(
            entities="label",  # vlp.data.entities.ENTITY_MODES
            names_as_text=True,  # train the text tower on the entity names instead of the caption
            contrastive_weight=1.0,  # the paper's multi-task loss sums both terms [paper; no training code released]
            entity_weight=1.0,
        )

    @classmethod
    def validate_config(cls, config: ml_collections.ConfigDict) -> None:
        block = config.mofi
        _check(block.entities in ENTITY_MODES, f"mofi.entities={block.entities!r}; valid: {ENTITY_MODES}")
        _check(block.entities != "shapes_attributes" or config.data.source == "shapes",
               f"mofi.entities='shapes_attributes' needs data.source='shapes', got {config.data.source!r}; use "
               f"'label' for other sources")
        for key in ("contrastive_weight", "entity_weight"):
            _check(block[key] >= 0, f"mofi.{key}={block[key]} must be >= 0")
        _check(config.accumulation.steps == 1 or config.accumulation.mode == "plain",
               "objective 'mofi' with accumulation.mode='gradcache': the entity loss is not a function of the "
               "contrastive embeddings alone; use accumulation.mode='plain'")

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        block = config.mofi
        self.entity_names = entity_names(block.entities, sources.class_names(config.data.source)
                                         if block.entities == "label" else ())
        self.max_entities = 1 if block.entities == "label" else 2
        embed_dim = config.model.embed_dim or self.model.image["width"]
        self.head = layers.Linear((len(self.entity_names),), (None, "classes"), use_bias=False,
                                  kernel_init=nn.initializers.lecun_normal())
        self.embed_dim = embed_dim

    def train_example_transform(self, default: Any) -> Any:
        block = self.config.mofi
        return AddEntities(default, block.entities, self.entity_names, self.max_entities, block.names_as_text)

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        return dict(super().example_batch(batch_size),
                    **{ENTITIES_KEY: np.zeros((batch_size, self.max_entities), np.int32)})

    def init(self, rng: jax.Array) -> Any:
        tower_rng, head_rng = jax.random.split(rng)
        params = dict(super().init(tower_rng))
        params[HEAD] = self.head.init(head_rng, jnp.zeros((1, self.embed_dim)))["params"]
        return params

    def embed(self, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        towers = {k: v for k, v in params.items() if k != HEAD}
        return super().embed(towers, batch)

    def encode_image(self, params: Any, images: jax.Array) -> jax.Array:
        return super().encode_image({k: v for k, v in params.items() if k != HEAD}, images)

    def encode_text(self, params: Any, tokens: jax.Array) -> jax.Array:
        return super().encode_text({k: v for k, v in params.items() if k != HEAD}, tokens)

    def encode_patches(self, params: Any, images: jax.Array) -> jax.Array:
        return super().encode_patches({k: v for k, v in params.items() if k != HEAD}, images)

    def entity_logits(self, params: Any, image_emb: jax.Array) -> jax.Array:
        """image_emb [B, D] (L2-normalised) -> logits over the entities [B, E]."""
        return self.head.apply({"params": params[HEAD]}, image_emb)

    def loss_fn(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, Metrics]:
        del rng
        block = self.config.mofi
        out = self.embed(params, batch)
        loss_con, metrics = self.loss_from_embeddings(out)
        loss_ent, ent_metrics = multilabel_softmax_loss(self.entity_logits(params, out["image_emb"]),
                                                        batch[ENTITIES_KEY])
        loss = block.contrastive_weight * loss_con + block.entity_weight * loss_ent
        metrics = {**{k: v for k, v in metrics.items() if k != "loss"}, "loss_contrastive": loss_con, **ent_metrics}
        return loss, metrics

    def train_flops_per_example(self) -> float:
        return super().train_flops_per_example() + 3.0 * 2 * self.embed_dim * len(self.entity_names)

    def model_config(self) -> dict[str, Any]:
        out = super().model_config()
        out.update(mofi=self.config.mofi.to_dict(), entity_names=list(self.entity_names))
        return out
