"""CapPa (Tschannen et al., 2023, "Image Captioners Are Scalable Vision Learners Too"): captioning only.

loss = teacher-forced CE of the caption (padding ignored). With `cappa.masked_pred_prob` > 0 (big_vision's
`masked_pred_prob`, paper: 0.75) that share of the examples is trained by parallel prediction: every decoder input
is replaced by a learned mask embedding and the decoder attends bidirectionally, so each token is predicted from the
image alone. The decoder (depth = model.text.depth, all layers cross-attend) reads the ViT tokens (`gen_queries` 0)
or a pooler's queries. Which examples are masked is drawn from the step's key (fold_in(seed, step)), so a resumed
run masks the same examples.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from vlp.losses.captioning import caption_loss
from vlp.models.coca import Captioner
from vlp.models.two_tower import l2_normalize
from vlp.objectives import register
from vlp.objectives.base import Metrics
from vlp.objectives.coca import CaptioningObjective, _check, _check_common


@register("cappa")
class CappaObjective(CaptioningObjective):
    contrastive = False
    block_name = "cappa"

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        return dict(
            masked_pred_prob=0.75,  # share of examples trained by parallel prediction (big_vision CapPa: 0.75)
            gen_queries=0,  # 0: the decoder cross-attends every ViT token (CapPa); > 0: an attentional pooler
            pooler_heads=8,
            tied_embedding=False,
        )

    @classmethod
    def validate_config(cls, config: ml_collections.ConfigDict) -> None:
        _check_common(config.cappa, "cappa")
        p = config.cappa.masked_pred_prob
        _check(0 <= p <= 1, f"cappa.masked_pred_prob={p} must be in [0, 1]")

    def masked_rows(self, rng: jax.Array, batch_size: int) -> jax.Array | None:
        """Which examples [B] bool are trained by parallel prediction this step (None when the share is 0): each
        with probability `cappa.masked_pred_prob`, drawn from the step's key."""
        p = self.config.cappa.masked_pred_prob
        return jax.random.uniform(rng, (batch_size,)) < p if p > 0 else None

    def loss_fn(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, Metrics]:
        masked = self.masked_rows(rng, batch["text"].shape[0])
        out = self.apply(params, batch["image"], batch["text"], masked)
        loss, metrics = caption_loss(out["logits"], batch["text"], self.tokenizer.pad_id)
        if masked is not None:
            metrics["masked_share"] = masked.mean()
        return loss, metrics

    def encode_image(self, params: Any, images: jax.Array) -> jax.Array:
        """images -> L2-normalised mean of the ViT tokens [B, width] (for linear probes and kNN)."""
        return l2_normalize(self.apply(params, images, method=Captioner.image_tokens).mean(axis=1))

    def train_flops_per_example(self) -> float:
        return 3.0 * (self._vit_flops() + self._decoder_flops())
