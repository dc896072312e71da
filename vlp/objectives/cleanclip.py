"""CleanCLIP (Bansal et al., 2023): fine-tuning that weakens backdoors by in-modal self-supervision beside CLIP's
multimodal InfoNCE (methods.md section 18; nishadsinghi/CleanCLIP@d6e2f1d, `src/train.py`):

  loss = clip_weight * InfoNCE_sym(I, T, t) + inmodal_weight * 1/2 [CE(t I I~^T, diag) + CE(t T T~^T, diag)]

I, T: the image and caption embeddings; I~: an augmented view of the image; T~: an EDA-augmented caption. As in the
code, each in-modal term is one-directional (rows of the original view against the augmented batch) and uses CLIP's
logit scale. The views are drawn per visit in the data pipeline (`CleanClipViews`): the image's random resized crop +
flip (vlp/data/augment.py; the paper uses AutoAugment) and one EDA operation (vlp/data/eda.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from vlp.data.augment import RandomResizedCrop
from vlp.data.eda import eda
from vlp.data.transforms import visit_of, visit_rng
from vlp.losses.contrastive import sharded_contrastive_loss
from vlp.models import flops
from vlp.objectives import register
from vlp.objectives.base import Metrics
from vlp.objectives.two_tower import TwoTowerObjective
from vlp.parallel.mesh import BATCH_AXES


@dataclasses.dataclass
class CleanClipViews(grain.transforms.Map):
    """Runs `inner` (the caption choice) and adds `image_aug` (uint8, a random resized crop of `crop_scale` of the
    area, mirrored half the time) and `caption_aug` (one EDA operation on the chosen caption), both drawn from
    (seed, visit): new views every epoch, the same ones after a resume. The batch transform turns them into
    `image_aug` float32 [B, H, W, 3] and `text_aug` int32 [B, L]."""

    inner: grain.transforms.Map
    seed: int
    crop_scale: tuple[float, float] = (0.5, 1.0)
    flip: bool = True
    eda_alpha: float = 0.1

    def map(self, example: dict) -> dict:
        out = self.inner.map(example)
        visit = visit_of(example)
        crop = RandomResizedCrop(out["image"].shape[0], tuple(self.crop_scale), self.flip)
        view = crop.random_map({"image": out["image"]}, visit_rng(self.seed, visit, "cleanclip_image"))
        out["image_aug"] = view["image"]
        a = self.eda_alpha
        out["caption_aug"] = eda(str(out["caption"]), visit_rng(self.seed, visit, "cleanclip_text"), a, a, a, a)
        return out


def inmodal_loss(image_emb: jax.Array, image_aug_emb: jax.Array, text_emb: jax.Array, text_aug_emb: jax.Array,
                 logit_scale: jax.Array, variant: str = "gather") -> tuple[jax.Array, Metrics]:
    """1/2 [CE(t I I~^T, diag) + CE(t T T~^T, diag)] over the global batch (all [B, D], L2-normalised), sharded on
    the batch axes: each term is the first direction (`loss_i2t`) of the sharded InfoNCE of (view, augmented view)."""
    _, image_metrics = sharded_contrastive_loss("softmax", image_emb, image_aug_emb, logit_scale,
                                                batch_axes=BATCH_AXES, variant=variant)
    _, text_metrics = sharded_contrastive_loss("softmax", text_emb, text_aug_emb, logit_scale,
                                               batch_axes=BATCH_AXES, variant=variant)
    image_term, text_term = image_metrics["loss_i2t"], text_metrics["loss_i2t"]
    return 0.5 * (image_term + text_term), {"loss_inmodal_image": image_term, "loss_inmodal_text": text_term,
                                            "acc_inmodal_image": image_metrics["acc_i2t"],
                                            "acc_inmodal_text": text_metrics["acc_i2t"]}


@register("cleanclip")
class CleanClipObjective(TwoTowerObjective):
    """CLIP's two towers trained on clip_weight * InfoNCE + inmodal_weight * in-modal InfoNCE (module docstring)."""

    loss_kind = "softmax"
    supports_patch_dropout = False

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        return dict(
            clip_weight=1.0,  # the paper's / code's defaults (methods.md section 18)
            inmodal_weight=1.0,
            crop_scale=(0.5, 1.0),  # the augmented image view: random resized crop area range, then a flip
            flip=True,
            eda_alpha=0.1,  # EDA's alpha_sr = alpha_ri = alpha_rs = p_rd, as CleanCLIP calls it
        )

    @classmethod
    def validate_config(cls, config: ml_collections.ConfigDict) -> None:
        block = config.cleanclip
        for key in ("clip_weight", "inmodal_weight"):
            if not block[key] >= 0:
                raise ValueError(f"invalid config: cleanclip.{key}={block[key]} must be >= 0")
        low, high = block.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"invalid config: cleanclip.crop_scale={tuple(block.crop_scale)} must satisfy "
                             f"0 < low <= high <= 1")
        if not 0 <= block.eda_alpha <= 1:
            raise ValueError(f"invalid config: cleanclip.eda_alpha={block.eda_alpha} must be in [0, 1]")

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        batch = super().example_batch(batch_size)
        return dict(batch, image_aug=np.zeros_like(batch["image"]), text_aug=np.zeros_like(batch["text"]))

    def train_example_transform(self, default: Any) -> Any:
        block = self.config.cleanclip
        return CleanClipViews(default, self.config.seed, tuple(block.crop_scale), block.flip, block.eda_alpha)

    def embed(self, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """`TwoTowerObjective.embed` plus `image_aug_emb`, `text_aug_emb` [B, D] of the augmented views (so gradient
        accumulation's embed / loss_from_embeddings split covers the in-modal terms too)."""
        out = super().embed(params, batch)
        out["image_aug_emb"] = self.encode_image(params, batch["image_aug"])
        out["text_aug_emb"] = self.encode_text(params, batch["text_aug"])
        return out

    def loss_from_embeddings(self, out: dict[str, jax.Array]) -> tuple[jax.Array, Metrics]:
        block = self.config.cleanclip
        clip, metrics = super().loss_from_embeddings(out)
        inmodal, inmodal_metrics = inmodal_loss(out["image_emb"], out["image_aug_emb"], out["text_emb"],
                                                out["text_aug_emb"], out["logit_scale"], self.config.loss.variant)
        metrics = dict(metrics, **inmodal_metrics, loss_clip=clip, loss_inmodal=inmodal)
        return block.clip_weight * clip + block.inmodal_weight * inmodal, metrics

    def train_flops_per_example(self) -> float:
        """Two forward + backward passes of both towers (original and augmented views) and two more [B, B] logit
        rows (the in-modal terms)."""
        extra_logits = 3.0 * 2 * flops.contrastive_logits_forward_flops(self.config.batch_size,
                                                                        self.model.embed_dim or 1)
        return 2.0 * super().train_flops_per_example() + extra_logits
