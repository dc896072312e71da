"""Region features for CLIM-style training: mosaics of s x s images, their grid boxes, RoIAlign, and the ViT dense
map whose last block skips attention (MaskCLIP's value path).

All pure functions of arrays (no config). RoIAlign is written here because no maintained JAX version exists (jax,
flax, scenic-free environments); it follows torchvision.ops.roi_align's sampling and border rules.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlp.models.layers import EncoderBlock
from vlp.models.vit import ViT


def grid_boxes(s: int) -> np.ndarray:
    """The s x s cells of the unit square as normalised (x1, y1, x2, y2) boxes [s*s, 4], row-major (cell r*s + c is
    row r, column c). The cells tile [0, 1]^2 exactly: edges are k / s."""
    edges = np.arange(s + 1, dtype=np.float64) / s
    rows, cols = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    return np.stack([edges[cols], edges[rows], edges[cols + 1], edges[rows + 1]], axis=1).astype(np.float32)


def make_mosaics(images: jax.Array, s: int, size: tuple[int, int] | None = None) -> jax.Array:
    """images [G*s*s, H, W, C] -> [G, h, w, C]: each group of s*s consecutive images stitched row-major into an
    s x s grid (image g*s*s + r*s + c at row r, column c), then resized (bicubic, antialiased) to `size` = (h, w)
    (default: (H, W), the model's input size)."""
    n, height, width, channels = images.shape
    if n % (s * s):
        raise ValueError(f"{n} images do not split into groups of s*s = {s * s}")
    grid = images.reshape(n // (s * s), s, s, height, width, channels).transpose(0, 1, 3, 2, 4, 5)
    grid = grid.reshape(n // (s * s), s * height, s * width, channels)
    h, w = size or (height, width)
    if (h, w) == grid.shape[1:3]:
        return grid
    return jax.image.resize(grid, (grid.shape[0], h, w, channels), "bicubic")


def _bilinear(features: jax.Array, y: jax.Array, x: jax.Array) -> jax.Array:
    """torchvision's bilinear_interpolate: features [H, W, C] at points y, x [...] -> [..., C]; points more than one
    cell outside the map read 0, points within a cell of the border are clamped onto it."""
    height, width = features.shape[:2]
    outside = (y < -1.0) | (y > height) | (x < -1.0) | (x > width)
    y, x = jnp.maximum(y, 0.0), jnp.maximum(x, 0.0)
    y_low, x_low = jnp.floor(y).astype(jnp.int32), jnp.floor(x).astype(jnp.int32)
    y_top, x_top = y_low >= height - 1, x_low >= width - 1
    y_low, x_low = jnp.where(y_top, height - 1, y_low), jnp.where(x_top, width - 1, x_low)
    y_high, x_high = jnp.where(y_top, height - 1, y_low + 1), jnp.where(x_top, width - 1, x_low + 1)
    y, x = jnp.where(y_top, y_low.astype(y.dtype), y), jnp.where(x_top, x_low.astype(x.dtype), x)
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    value = ((hy * hx)[..., None] * features[y_low, x_low] + (hy * lx)[..., None] * features[y_low, x_high]
             + (ly * hx)[..., None] * features[y_high, x_low] + (ly * lx)[..., None] * features[y_high, x_high])
    return jnp.where(outside[..., None], 0.0, value)


def roi_align(features: jax.Array, boxes: jax.Array, output_size: tuple[int, int] = (1, 1),
              sampling_ratio: int = 2, aligned: bool = True) -> jax.Array:
    """RoIAlign (Mask R-CNN; torchvision.ops.roi_align semantics) on one feature map.

    Args:
      features: [H, W, C].
      boxes: [K, 4] (x1, y1, x2, y2) in feature-map cells (multiply normalised boxes by (W, H, W, H)).
      output_size: (ph, pw) bins per box.
      sampling_ratio: bilinear samples per bin along each axis (static; torchvision's adaptive -1 is
        ceil(box size / bins), which callers with static boxes can compute).
      aligned: shift the box by -0.5 cell so that cell centres sit at integer + 0.5 (torchvision `aligned=True`).
    Returns:
      [K, ph, pw, C]: each bin is the mean of its sampling_ratio^2 bilinear samples.
    """
    ph, pw = output_size
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (boxes[:, i] - offset for i in range(4))
    box_w, box_h = x2 - x1, y2 - y1
    if not aligned:  # torchvision forces malformed boxes to 1 x 1 only in the legacy mode
        box_w, box_h = jnp.maximum(box_w, 1.0), jnp.maximum(box_h, 1.0)
    bin_w, bin_h = box_w / pw, box_h / ph
    frac = (jnp.arange(sampling_ratio) + 0.5) / sampling_ratio  # sample positions inside a bin, [n]
    # [K, ph, n] and [K, pw, n] sample coordinates, then every (y, x) pair of a bin.
    ys = y1[:, None, None] + (jnp.arange(ph)[None, :, None] + frac[None, None, :]) * bin_h[:, None, None]
    xs = x1[:, None, None] + (jnp.arange(pw)[None, :, None] + frac[None, None, :]) * bin_w[:, None, None]
    y = jnp.broadcast_to(ys[:, :, None, :, None], (ys.shape[0], ph, pw, sampling_ratio, sampling_ratio))
    x = jnp.broadcast_to(xs[:, None, :, None, :], y.shape)
    return _bilinear(features, y, x).mean(axis=(3, 4))


def value_path_last_block(depth: int) -> Callable:
    """A flax method interceptor under which the ViT's last encoder block (`block_{depth-1}`) skips attention:
    each token attends only to itself, so the block computes x + out(v(ln_1 x)) and then its MLP (MaskCLIP's and
    CLIM's dense features). Use as `with nn.intercept_methods(value_path_last_block(depth)): model.apply(...)`.
    Needs per-layer blocks (`model.scan_layers=False`)."""
    last = f"block_{depth - 1}"

    def interceptor(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        module = context.module
        if (context.method_name != "__call__" or not isinstance(module, EncoderBlock) or module.name != last
                or module.parent is None or not isinstance(module.parent.parent, ViT)):  # only the image tower
            return next_fun(*args, **kwargs)
        x = args[0]
        eye = jnp.eye(x.shape[1], dtype=bool)[None, None]  # [1, 1, T, T]: a token sees only itself
        return next_fun(x, eye, *args[2:], **kwargs)

    return interceptor


def dense_embeddings(apply_aligned_tokens: Callable[[jax.Array], jax.Array], depth: int,
                     images: jax.Array) -> jax.Array:
    """images [B, H, W, C] -> L2-normalised patch embeddings [B, gh, gw, D] of the image-text space, the last block
    on its value path. `apply_aligned_tokens` maps images to patch tokens after ln_post and the projection
    ([B, N, D], e.g. TwoTower.aligned_patch_tokens)."""
    with nn.intercept_methods(value_path_last_block(depth)):
        tokens = apply_aligned_tokens(images)
    tokens = tokens.astype(jnp.float32)
    tokens = tokens / jnp.maximum(jnp.linalg.norm(tokens, axis=-1, keepdims=True), 1e-6)
    side = int(round(np.sqrt(tokens.shape[1])))
    if side * side != tokens.shape[1]:
        raise ValueError(f"{tokens.shape[1]} patch tokens do not form a square grid")
    return tokens.reshape(tokens.shape[0], side, side, tokens.shape[-1])


def region_embeddings(dense: jax.Array, s: int) -> jax.Array:
    """dense [G, gh, gw, D] maps of s x s mosaics -> [G*s*s, D] L2-normalised cell embeddings (RoIAlign 1 x 1,
    aligned, on each grid box; row-major cells, so row g*s*s + k is image k of mosaic g)."""
    _, gh, gw, _ = dense.shape
    boxes = jnp.asarray(grid_boxes(s) * np.array([gw, gh, gw, gh], np.float32))
    # torchvision's adaptive sampling (ceil of the bin size in cells): with gh divisible by s the samples sit on
    # the cell centres and each region is the mean of its cells' tokens.
    ratio = int(np.ceil(max(gh, gw) / s))
    regions = jax.vmap(lambda f: roi_align(f, boxes, (1, 1), ratio, aligned=True))(dense)  # [G, s*s, 1, 1, D]
    regions = regions.reshape(-1, dense.shape[-1])
    return regions / jnp.maximum(jnp.linalg.norm(regions, axis=-1, keepdims=True), 1e-6)
