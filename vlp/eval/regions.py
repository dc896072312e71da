"""Region-level zero-shot classification (CLIM's measure): validation images stitched into s x s mosaics, each cell
classified by its region embedding (dense map with the last block on its value path, RoIAlign on the grid box)
against the class prompt embeddings. Works for any two-tower model (a CLIP before CLIM and after)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from vlp.data import pipeline, sources
from vlp.eval.zero_shot import class_embeddings, class_prompt_lists, topk_accuracy
from vlp.models.regions import dense_embeddings, make_mosaics, region_embeddings
from vlp.models.two_tower import TwoTower


def two_tower_region_encoder(model: TwoTower, s: int) -> Callable[[Any, jax.Array], jax.Array]:
    """A jitted (params, images [G*s*s, H, W, 3]) -> [G*s*s, D] region embeddings of the images' s x s mosaics."""

    @jax.jit
    def encode(params: Any, images: jax.Array) -> jax.Array:
        apply = lambda x: model.apply({"params": params}, x, method=TwoTower.aligned_patch_tokens)  # noqa: E731
        return region_embeddings(dense_embeddings(apply, model.image["depth"], make_mosaics(images, s)), s)

    return encode


def region_zero_shot(model: TwoTower, params: Any, tokenize: Callable[[list[str]], np.ndarray], *,
                     data_source: str, split: str, image_size: int, num_examples: int, s: int = 2,
                     batch_mosaics: int = 32) -> dict[str, float]:
    """`region_zeroshot_s<s>_top1` / `_top5` over the first `num_examples` (a multiple of s*s is used) images of
    `split`, and `image_zeroshot_top1` of the same images encoded whole, for reference."""
    eval_set = pipeline.load_eval_set(sources.make_source(data_source, split, image_size), num_examples)
    n = (len(eval_set.labels) // (s * s)) * (s * s)
    images, labels = jnp.asarray(eval_set.images[:n]), np.asarray(eval_set.labels[:n])
    prompts = class_prompt_lists(data_source)
    encode_text = jax.jit(lambda p, t: model.apply({"params": p}, t, method=TwoTower.encode_text))
    class_emb = class_embeddings(np.asarray(encode_text(params, tokenize([q for ps in prompts for q in ps]))),
                                 [len(p) for p in prompts])
    encode = two_tower_region_encoder(model, s)
    step = batch_mosaics * s * s
    regions = np.concatenate([np.asarray(encode(params, images[i:i + step])) for i in range(0, n, step)])
    encode_image = jax.jit(lambda p, x: model.apply({"params": p}, x, method=TwoTower.encode_image))
    whole = np.concatenate([np.asarray(encode_image(params, images[i:i + 256])) for i in range(0, n, 256)])
    out = {f"region_zeroshot_s{s}_top{k}": topk_accuracy(regions, class_emb, labels, k) for k in (1, 5)}
    out["image_zeroshot_top1"] = topk_accuracy(whole, class_emb, labels, 1)
    return out
