"""Model FLOPs of the transformer towers (matmuls only, as MaxText counts them), for MFU reporting.

One multiply-add = 2 FLOPs. Training FLOPs = 3 x forward (backward is twice the forward); remat is not counted.
Causal attention counts half of the score/value matmuls.
"""

from __future__ import annotations


def encoder_forward_flops(tokens: int, width: int, depth: int, mlp_dim: int, causal: bool = False) -> float:
    """Forward FLOPs of `depth` pre-LN blocks on one sequence of `tokens` tokens."""
    qkv_out = 2 * tokens * width * 4 * width  # q, k, v and the output projection
    attention = 4 * tokens * tokens * width * (0.5 if causal else 1.0)  # scores and weighted values
    mlp = 4 * tokens * width * mlp_dim
    return float(depth * (qkv_out + attention + mlp))


def vit_forward_flops(image_size: int, patch_size: int, width: int, depth: int, mlp_dim: int,
                      num_cls_tokens: int = 1) -> float:
    patches = (image_size // patch_size) ** 2
    embed = 2 * patches * patch_size * patch_size * 3 * width
    return embed + encoder_forward_flops(patches + num_cls_tokens, width, depth, mlp_dim)


def text_forward_flops(length: int, width: int, depth: int, mlp_dim: int, causal: bool) -> float:
    return encoder_forward_flops(length, width, depth, mlp_dim, causal)
