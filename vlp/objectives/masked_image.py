"""Shared parts of the masked-image objectives (simmim, mae, tips): the mask transform of the training stream,
the image grid, and the frozen patch tokens the dense probe reads."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from vlp.data.tokenizer import Tokenizer
from vlp.data.transforms import AddPatchMask
from vlp.objectives.base import Objective
from vlp.objectives.two_tower import image_tower_kwargs


class MaskedImageMixin:
    """Needs `self.config`, `self.patch_size` and `self.model` (with a `patch_tokens` method)."""

    config: ml_collections.ConfigDict
    patch_size: int
    model: Any

    @property
    def grid(self) -> tuple[int, int]:
        side = self.config.data.image_size // self.patch_size
        return side, side

    def train_example_transform(self, default: Any) -> Any:
        mim = self.config.mim
        return AddPatchMask(default, mim.mask_kind, self.grid, mim.mask_ratio, mim.min_block, self.config.seed,
                            mim.masked_image_fraction)

    def encode_patches(self, params: Any, images: jax.Array) -> jax.Array:
        """images [B, H, W, 3] -> frozen patch tokens [B, N, width] (N = grid_h * grid_w, row-major)."""
        return self.model.apply({"params": params}, images, method=type(self.model).patch_tokens)


class ImageOnlyObjective(MaskedImageMixin, Objective):
    """An image-only masked-image objective: no text tower (evaluated with the dense probe, not zero-shot)."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.image_kwargs = image_tower_kwargs(config.model)
        self.patch_size = self.image_kwargs["patch_size"]
        self.tokenizer = Tokenizer(config.data.tokenizer or None)  # the shared pipeline tokenises captions

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        size = self.config.data.image_size
        return {"image": np.zeros((batch_size, size, size, 3), np.float32),
                "label": np.zeros((batch_size,), np.int32),
                "mim_mask": np.zeros((batch_size, self.grid[0] * self.grid[1]), bool)}
