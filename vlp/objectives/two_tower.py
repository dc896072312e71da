"""Shared construction of the two-tower model from a config (CLIP, ALIGN and the later sigmoid objectives)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlp.data.tokenizer import Tokenizer, load_tokenizer
from vlp.losses.contrastive import sharded_contrastive_loss
from vlp.models import flops
from vlp.models.two_tower import TwoTower
from vlp.models.vit import num_kept_patches, patch_dropout_keep, vit_shape
from vlp.objectives.base import Metrics, Objective, image_text_batch, resolve_compute_dtype
from vlp.parallel.mesh import BATCH_AXES


def image_tower_kwargs(model: ml_collections.ConfigDict) -> dict[str, Any]:
    """ViT keyword arguments; `variant` (e.g. "B/16") sets the size fields."""
    image = model.image
    sizes = dict(width=image.width, depth=image.depth, mlp_dim=image.mlp_dim, num_heads=image.num_heads,
                 patch_size=image.patch_size)
    if image.variant:
        shape = vit_shape(image.variant)
        sizes = dict(width=shape.width, depth=shape.depth, mlp_dim=shape.mlp_dim, num_heads=shape.num_heads,
                     patch_size=shape.patch_size)
    return dict(sizes, pool=image.pool, posemb=image.posemb, num_cls_tokens=image.num_cls_tokens,
                ln_pre=image.ln_pre, patch_bias=image.patch_bias, activation=model.activation,
                ln_eps=model.ln_eps, fused_qkv=model.fused_qkv, **stacking_kwargs(model))


def stacking_kwargs(model: ml_collections.ConfigDict) -> dict[str, Any]:
    """How every transformer stack of the model is compiled: `model.remat_policy`, `model.scan_layers`,
    `model.attention` (none of them changes the params)."""
    return dict(remat_policy=model.remat_policy, scan_layers=model.scan_layers, attention=model.attention)


def text_tower_kwargs(model: ml_collections.ConfigDict, tokenizer: Tokenizer, max_len: int) -> dict[str, Any]:
    """TextTransformer keyword arguments; `model.text.vocab_size` (if set) widens the embedding table."""
    text = model.text
    vocab_size = text.get("vocab_size") or tokenizer.vocab_size
    if vocab_size < tokenizer.vocab_size:
        raise ValueError(f"invalid config: model.text.vocab_size={vocab_size} is smaller than the vocab size "
                         f"{tokenizer.vocab_size} of tokenizer {tokenizer.model_path}; use >= "
                         f"{tokenizer.vocab_size} or leave it unset")
    return dict(vocab_size=vocab_size, max_len=max_len, width=text.width, depth=text.depth,
                mlp_dim=text.mlp_dim, num_heads=text.num_heads, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                causal=text.causal, padding_mask=text.padding_mask, pool=text.pool, activation=model.activation,
                ln_eps=model.ln_eps, fused_qkv=model.fused_qkv, **stacking_kwargs(model))


def build_two_tower(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> TwoTower:
    m = config.model
    return TwoTower(
        image=image_tower_kwargs(m),
        text=text_tower_kwargs(m, tokenizer, config.data.max_text_len),
        embed_dim=m.embed_dim,
        image_projection=m.image_projection,
        text_projection=m.text_projection,
        projection_bias=m.projection_bias,
        logit_scale_init=m.logit_scale_init,
        logit_scale_max=m.logit_scale_max,
        logit_scale_parameterization=m.logit_scale_parameterization,
        logit_bias_init=m.logit_bias_init,
        dtype=resolve_compute_dtype(config.precision.compute_dtype),
    )


class TwoTowerObjective(Objective):
    """Base of the dual-encoder objectives: builds the model, the tokenizer and the encoders for evaluation.

    Subclasses set `loss_kind`, a kind of `vlp.losses.contrastive.LOSS_VARIANTS` ("softmax" or "sigmoid").
    """

    loss_kind: str = "softmax"
    supports_patch_dropout = True

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.tokenizer = load_tokenizer(config.data.tokenizer or None)
        self.model = build_two_tower(config, self.tokenizer)
        image = config.model.image
        self.patch_dropout = image.patch_dropout
        self.patch_dropout_until_step = image.patch_dropout_until_step if image.patch_dropout else None
        num_patches = (config.data.image_size // self.model.image["patch_size"]) ** 2
        self.num_patches, self.num_kept_patches = num_patches, num_kept_patches(num_patches, image.patch_dropout)

    def add_step_inputs(self, batch: dict[str, jax.Array], rng: jax.Array,
                        patch_dropout: bool) -> dict[str, jax.Array]:
        """Adds `patch_keep` [B, K] (the patches each image keeps, drawn from the step's rng and the example's row
        in the global batch) while patch dropout is on; evaluation paths never see it."""
        if not (patch_dropout and self.patch_dropout):
            return batch
        keep = patch_dropout_keep(rng, batch["image"].shape[0], self.num_patches, self.num_kept_patches)
        return dict(batch, patch_keep=keep)

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        return image_text_batch(self.config, batch_size)

    def init(self, rng: jax.Array) -> Any:
        batch = self.example_batch(1)
        return self.model.init(rng, jnp.asarray(batch["image"]), jnp.asarray(batch["text"]))["params"]

    def embed(self, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """image_emb, text_emb [B, D] (L2-normalised fp32), logit_scale and logit_bias (scalars); the image tower
        sees only the patches in `batch["patch_keep"]` when present (`add_step_inputs`)."""
        return self.model.apply({"params": params}, batch["image"], batch["text"], batch.get("patch_keep"))

    def loss_from_embeddings(self, out: dict[str, jax.Array]) -> tuple[jax.Array, Metrics]:
        """The `loss_kind` contrastive loss of `embed`'s output over the global batch (sharded on the batch axes).

        Split from `loss_fn` so gradient accumulation can compute it once on the embeddings of all micro-batches.
        """
        return sharded_contrastive_loss(
            self.loss_kind, out["image_emb"], out["text_emb"], out["logit_scale"], out["logit_bias"],
            label_smoothing=self.config.loss.label_smoothing, batch_axes=BATCH_AXES,
            variant=self.config.loss.variant)

    def loss_fn(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, Metrics]:
        del rng  # deterministic forward (no dropout)
        return self.loss_from_embeddings(self.embed(params, batch))

    def encode_image(self, params: Any, images: jax.Array) -> jax.Array:
        """images [B, H, W, 3] -> L2-normalised [B, D]."""
        return self.model.apply({"params": params}, images, method=TwoTower.encode_image)

    def encode_patches(self, params: Any, images: jax.Array) -> jax.Array:
        """images [B, H, W, 3] -> frozen patch tokens [B, N, width] (for the dense probe)."""
        return self.model.apply({"params": params}, images, method=TwoTower.patch_tokens)

    def encode_aligned_patches(self, params: Any, images: jax.Array) -> jax.Array:
        """images [B, H, W, 3] -> patch tokens in the image-text space [B, N, D] (ln_post, then the image
        projection; not normalised): EVA's regression targets."""
        return self.model.apply({"params": params}, images, method=TwoTower.aligned_patch_tokens)

    def encode_text(self, params: Any, tokens: jax.Array) -> jax.Array:
        """tokens [B, L] -> L2-normalised [B, D]."""
        return self.model.apply({"params": params}, tokens, method=TwoTower.encode_text)

    def train_flops_per_example(self) -> float:
        """Model FLOPs (MaxText's matmul count, x3 for forward + backward) per example: both towers, the
        projections and the example's row of the [B, B] logits (which grows with the global batch). With patch
        dropout the image blocks count the kept patches (the steps of a final unmasked phase cost more)."""
        model, image, text = self.model, self.model.image, self.model.text
        forward = flops.vit_forward_flops(self.config.data.image_size, image["patch_size"], image["width"],
                                          image["depth"], image["mlp_dim"], image["num_cls_tokens"], image["pool"],
                                          kept_patches=self.num_kept_patches)
        forward += flops.text_forward_flops(text["max_len"], text["width"], text["depth"], text["mlp_dim"],
                                            text["causal"])
        embed_dim = model.embed_dim or image["width"]  # no projections: the towers' own width
        forward += 2 * embed_dim * (image["width"] * model.image_projection + text["width"] * model.text_projection)
        forward += flops.contrastive_logits_forward_flops(self.config.batch_size, embed_dim)
        return 3.0 * forward

    def model_config(self) -> dict[str, Any]:
        out = super().model_config()
        out["tokenizer"] = {"vocab_size": self.tokenizer.vocab_size, "eos_id": self.tokenizer.eos_id,
                            "pad_id": self.tokenizer.pad_id, "max_len": self.config.data.max_text_len}
        # Exported weights are always per-layer; remat and the attention kernel are compile choices: none of them
        # belongs to the architecture.
        compile_only = ("remat_policy", "scan_layers", "attention")
        out["image_tower"] = {k: v for k, v in self.model.image.items() if k not in compile_only}
        out["text_tower"] = {k: v for k, v in self.model.text.items() if k not in compile_only}
        out["image_size"] = self.config.data.image_size
        return out
