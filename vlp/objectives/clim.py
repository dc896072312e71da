"""CLIM (Wu et al., AAAI 2024, "CLIM: Contrastive Language-Image Mosaic for Region Representation"): fine-tunes a
pretrained CLIP so that regions of its dense map match texts (methods.md section 15; recipe in configs/clim.py).

Each step stitches groups of s*s images of the batch into s x s mosaics (s cycling over `clim.grid_sizes`, the
leftover images stay single), each mosaic resized to the model's input size. A mosaic's region embeddings come from
the ViT's dense map whose last block skips attention (vlp.models.regions), RoIAlign (1 x 1, aligned) on the grid
boxes; single images use the ordinary pooled embedding. Every image's embedding (region or whole) is contrasted with
its caption's frozen (no-gradient) text embedding by CLIP's InfoNCE over the global batch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlp.losses.contrastive import sharded_contrastive_loss
from vlp.models import flops
from vlp.models.regions import dense_embeddings, make_mosaics, region_embeddings
from vlp.models.two_tower import TwoTower
from vlp.objectives import register
from vlp.objectives.base import Metrics
from vlp.objectives.two_tower import TwoTowerObjective
from vlp.parallel.mesh import BATCH_AXES


def mosaic_layout(batch_size: int, grid_sizes: tuple[int, ...]) -> tuple[list[tuple[int, int]], int]:
    """([(s, first image index), ...] of each mosaic, index of the first single image): s cycles over
    `grid_sizes` taking s*s consecutive images while they fit; the rest stay single."""
    layout, start, k = [], 0, 0
    while grid_sizes and start + grid_sizes[k % len(grid_sizes)] ** 2 <= batch_size:
        s = grid_sizes[k % len(grid_sizes)]
        layout.append((s, start))
        start, k = start + s * s, k + 1
    return layout, start


@register("clim")
class ClimObjective(TwoTowerObjective):
    supports_patch_dropout = False

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        return dict(
            grid_sizes=(2, 3, 4),  # s of the s x s mosaics, cycled over the batch (paper: 2, 3, 4)
        )

    @classmethod
    def validate_config(cls, config: ml_collections.ConfigDict) -> None:
        sizes = tuple(config.clim.grid_sizes)
        if not sizes or not all(isinstance(s, int) and s >= 1 for s in sizes):
            raise ValueError(f"invalid config: clim.grid_sizes={sizes!r} must be a non-empty tuple of integers >= 1")
        if sizes[0] ** 2 > config.batch_size:
            raise ValueError(f"invalid config: batch_size={config.batch_size} cannot hold one {sizes[0]}x{sizes[0]} "
                             f"mosaic of clim.grid_sizes={sizes!r}; use batch_size >= {sizes[0] ** 2}")
        if config.model.scan_layers:
            raise ValueError("invalid config: model.scan_layers=True is not supported by objective 'clim' (its dense "
                             "map changes the last ViT block alone); use False")
        if config.accumulation.steps != 1:
            raise ValueError(f"invalid config: accumulation.steps={config.accumulation.steps} is not supported by "
                             "objective 'clim' (its mosaics are laid out over the whole batch); use 1")
        if config.loss.variant != "gather":
            raise ValueError(f"invalid config: loss.variant={config.loss.variant!r}: objective 'clim' uses 'gather'")

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.layout, self.first_single = mosaic_layout(config.batch_size, tuple(config.clim.grid_sizes))

    def encode_regions(self, params: Any, images: jax.Array, s: int) -> jax.Array:
        """images [G*s*s, H, W, 3] -> [G*s*s, D]: each image's region embedding inside its s x s mosaic."""
        dense = self.encode_dense(params, make_mosaics(images, s))
        return region_embeddings(dense, s)

    def encode_dense(self, params: Any, images: jax.Array) -> jax.Array:
        """images [B, H, W, 3] -> L2-normalised dense embeddings [B, gh, gw, D] (last block on its value path)."""
        apply = lambda x: self.model.apply({"params": params}, x, method=TwoTower.aligned_patch_tokens)  # noqa: E731
        return dense_embeddings(apply, self.model.image["depth"], images)

    def image_embeddings(self, params: Any, images: jax.Array) -> jax.Array:
        """The training batch's image side [B, D]: region embeddings of the mosaicked images (one ViT pass over all
        mosaics) and pooled embeddings of the single ones, in batch order."""
        parts, order = [], []  # embeddings, and the batch index of each of their rows
        if self.layout:
            groups = {s: [i for t, i in self.layout if t == s] for s in dict.fromkeys(s for s, _ in self.layout)}
            members = {s: np.concatenate([np.arange(i, i + s * s) for i in starts]) for s, starts in groups.items()}
            mosaics = jnp.concatenate([make_mosaics(images[members[s]], s, images.shape[1:3]) for s in groups])
            dense = self.encode_dense(params, mosaics)
            offset = 0
            for s, starts in groups.items():
                parts.append(region_embeddings(dense[offset:offset + len(starts)], s))
                order.append(members[s])
                offset += len(starts)
        if self.first_single < images.shape[0]:
            parts.append(self.encode_image(params, images[self.first_single:]))
            order.append(np.arange(self.first_single, images.shape[0]))
        return jnp.concatenate(parts)[np.argsort(np.concatenate(order))]

    def loss_fn(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, Metrics]:
        del rng
        if batch["image"].shape[0] != self.config.batch_size:
            raise ValueError(f"clim's mosaic layout is built for batch_size={self.config.batch_size}; got a batch of "
                             f"{batch['image'].shape[0]}")
        image_emb = self.image_embeddings(params, batch["image"])
        text_emb = jax.lax.stop_gradient(self.encode_text(params, batch["text"]))  # frozen text side
        scale = self.model.apply({"params": params}, method=TwoTower.logit_scale)
        loss, metrics = sharded_contrastive_loss("softmax", image_emb, text_emb, scale, None,
                                                 batch_axes=BATCH_AXES, variant=self.config.loss.variant)
        return loss, dict(metrics, mosaics=jnp.asarray(len(self.layout), jnp.float32))

    def train_flops_per_example(self) -> float:
        """Image tower on (mosaics + singles) / B images per example (fwd + bwd), text forward only."""
        image, text = self.model.image, self.model.text
        images = len(self.layout) + self.config.batch_size - self.first_single
        vit = flops.vit_forward_flops(self.config.data.image_size, image["patch_size"], image["width"],
                                      image["depth"], image["mlp_dim"], image["num_cls_tokens"], image["pool"])
        txt = flops.text_forward_flops(text["max_len"], text["width"], text["depth"], text["mlp_dim"],
                                       text["causal"])
        return 3.0 * vit * images / self.config.batch_size + txt
