"""Model FLOPs of the two-tower models (matmuls only, as MaxText counts them), for MFU reporting.

One multiply-add = 2 FLOPs: a [m, k] x [k, n] matmul is 2mkn (XLA's `cost_analysis()` counts dots the same way).
Training FLOPs = 3 x forward (the backward pass is two matmuls per forward matmul); remat is not counted; the
token-embedding gather counts 0; causal attention counts half of the score/value matmuls (MaxText's definition,
although XLA computes the full masked product).

What the compiled step counts on top (measured for `configs/clip.py:bench` on XLA:CPU, 1 device: the model
FLOPs are 97.7% of `cost_analysis()['flops']`): elementwise ops, softmax, LayerNorm, GELU, the loss and the
optimizer update (~2%), the masked half of causal attention, and the second logits matrix of the `gather`
softmax loss; and the patch embedding's backward needs no input gradient (2x forward, not 3x).
"""

from __future__ import annotations


def encoder_forward_flops(tokens: int, width: int, depth: int, mlp_dim: int, causal: bool = False) -> float:
    """Forward FLOPs of `depth` pre-LN blocks on one sequence of `tokens` tokens.

    Per block: q, k, v and output projections 2 * T * D * 4D; scores and weighted values 4 * T^2 * D (halved
    when causal); MLP 2 * T * D * mlp_dim * 2.
    """
    projections = 2 * tokens * width * 4 * width
    attention = 4 * tokens * tokens * width * (0.5 if causal else 1.0)
    mlp = 4 * tokens * width * mlp_dim
    return float(depth * (projections + attention + mlp))


def map_head_forward_flops(tokens: int, width: int, mlp_dim: int) -> float:
    """SigLIP's attention-pooling head: one learned query over `tokens` keys, then an MLP on one token."""
    projections = 2 * width * width * 2 + 2 * tokens * width * width * 2  # q and out on 1 token; k, v on T
    attention = 4 * tokens * width
    mlp = 4 * width * mlp_dim
    return float(projections + attention + mlp)


def vit_forward_flops(image_size: int, patch_size: int, width: int, depth: int, mlp_dim: int,
                      num_cls_tokens: int = 1, pool: str = "cls", kept_patches: int | None = None) -> float:
    """Forward FLOPs of the ViT image tower on one image: patch embedding, blocks and (for `map`) the head.

    CLS tokens exist only with `pool="cls"` (as in `vlp.models.vit.ViT`). `kept_patches`: the patch tokens the
    blocks see under FLIP patch dropout (every patch is still embedded).
    """
    patches = (image_size // patch_size) ** 2
    tokens = (patches if kept_patches is None else kept_patches) + (num_cls_tokens if pool == "cls" else 0)
    embed = 2 * patches * patch_size * patch_size * 3 * width
    head = map_head_forward_flops(tokens, width, mlp_dim) if pool == "map" else 0.0
    return embed + encoder_forward_flops(tokens, width, depth, mlp_dim) + head


def text_forward_flops(length: int, width: int, depth: int, mlp_dim: int, causal: bool) -> float:
    """Forward FLOPs of the text tower on one sequence of `length` tokens (the embedding lookup counts 0)."""
    return encoder_forward_flops(length, width, depth, mlp_dim, causal)


def contrastive_logits_forward_flops(global_batch: int, dim: int) -> float:
    """Forward FLOPs per example of the [B, B] image-text similarity matrix (2 * B * D per row).

    Counted once, as the model defines it: the `gather` softmax loss computes both directions ([b, B] rows of
    the matrix and of its transpose on each device), which is implementation overhead like remat.
    """
    return float(2 * global_batch * dim)
