"""Masked-image models: SimMIM (ViT with a mask token + linear pixel head) and MAE (encoder on visible tokens +
light decoder). `patch_tokens` gives the frozen patch features the dense probe reads."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp.models.mim_heads import MaeDecoder, PixelHead
from vlp.models.vit import ViT


def num_cls(image: dict[str, Any]) -> int:
    """CLS tokens in front of the patch tokens of a ViT built with these keyword arguments."""
    return image.get("num_cls_tokens", 1) if image.get("pool", "cls") == "cls" else 0


class SimMim(nn.Module):
    """images [B, H, W, 3], mask [B, N] bool -> predicted pixels [B, N, p*p*3] (fp32) for every patch.

    With `out_dim` set the linear head predicts `out_dim` features per patch instead (EVA's regression head)."""

    image: dict[str, Any]
    out_dim: int | None = None
    dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        self.image_tower = ViT(**self.image, mask_token=True, dtype=self.dtype, name="image")
        self.head = PixelHead(self.out_dim or self.image["patch_size"] ** 2 * 3, dtype=self.dtype, name="head")

    def patch_tokens(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, 3] -> final patch tokens [B, N, width] (no mask)."""
        return self.image_tower(images)[1][:, num_cls(self.image):]

    def __call__(self, images: jax.Array, mask: jax.Array) -> jax.Array:
        tokens = self.image_tower(images, mask=mask)[1]
        return self.head(tokens[:, num_cls(self.image):])


class Mae(nn.Module):
    """images [B, H, W, 3], keep [B, N_vis] (visible patch positions) -> predicted pixels [B, N, p*p*3] (fp32)."""

    image: dict[str, Any]
    decoder: dict[str, Any]  # MaeDecoder's width, depth, num_heads, mlp_dim
    grid: tuple[int, int]
    dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        self.image_tower = ViT(**self.image, dtype=self.dtype, name="image")
        self.decoder_module = MaeDecoder(**self.decoder, grid=self.grid, patch_pixels=self.image["patch_size"] ** 2 * 3,
                                         num_cls=num_cls(self.image), dtype=self.dtype, name="decoder")

    def patch_tokens(self, images: jax.Array) -> jax.Array:
        return self.image_tower(images)[1][:, num_cls(self.image):]

    def __call__(self, images: jax.Array, keep: jax.Array) -> jax.Array:
        tokens = self.image_tower(images, keep=keep)[1]
        return self.decoder_module(tokens, keep)
