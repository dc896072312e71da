"""Model FLOPs (vlp.models.flops, MaxText's matmul count) against hand counts and against the FLOPs that XLA
counts in the compiled train step."""

import flax.linen as nn
import jax
import pytest
from conftest import tiny_config

from vlp.models import flops
from vlp.objectives import get_objective
from vlp.train.trainer import build_experiment, jit_train_step


def test_encoder_forward_flops_hand_count():
    # 10 tokens, width 8, MLP 16, per block: q, k, v, out 2*10*8*32 = 5120; scores and values 4*10*10*8 = 3200;
    # MLP 2 * 2*10*8*16 = 5120. Causal attention counts half of the scores and values.
    assert flops.encoder_forward_flops(10, 8, 2, 16) == 2 * (5120 + 3200 + 5120)
    assert flops.encoder_forward_flops(10, 8, 2, 16, causal=True) == 2 * (5120 + 1600 + 5120)


def test_vit_forward_flops_hand_count():
    # 16 px / patch 8: 4 patches of 8*8*3 values into width 8; a CLS token only with pool="cls".
    embed = 2 * 4 * (8 * 8 * 3) * 8
    assert flops.vit_forward_flops(16, 8, 8, 2, 16) == embed + flops.encoder_forward_flops(5, 8, 2, 16)
    assert flops.vit_forward_flops(16, 8, 8, 2, 16, pool="gap") == embed + flops.encoder_forward_flops(4, 8, 2, 16)
    # MAP head on 4 tokens: q and out 2*8*8 each; k, v 2*4*8*8 each; attention 4*4*8; MLP 4*8*16.
    head = 2 * 128 + 2 * 512 + 128 + 512
    assert flops.vit_forward_flops(16, 8, 8, 2, 16, pool="map") == (
        embed + flops.encoder_forward_flops(4, 8, 2, 16) + head)


def test_train_flops_within_10_percent_of_compiled_step():
    """Towers 128 wide so matmuls dominate; the compiled count adds elementwise ops, softmax, LayerNorm, GELU,
    the loss and AdamW (about 5% here, 2% for configs/clip.py:bench)."""
    width = {"width": 128, "depth": 1, "mlp_dim": 512, "num_heads": 4}
    config = tiny_config(**{f"model.{tower}.{k}": v for tower in ("image", "text") for k, v in width.items()},
                         **{"model.embed_dim": 128, "model.text.vocab_size": 2048})
    exp = build_experiment(config)
    shardings = exp.batch_shardings()
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
             for k, v in exp.objective.example_batch(config.batch_size).items()}
    with exp.context():
        compiled = jit_train_step(exp).lower(exp.abstract_state, batch).compile()
    cost = compiled.cost_analysis()
    compiled_flops = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]  # one device: the whole step
    analytic = exp.objective.train_flops_per_example() * config.batch_size
    assert 0.9 <= analytic / compiled_flops <= 1.1, (analytic, compiled_flops)


def test_text_vocab_size_sets_embedding_rows_and_must_cover_the_tokenizer():
    objective = get_objective("clip")(tiny_config(**{"model.text.vocab_size": 1000}))
    params = nn.unbox(jax.eval_shape(objective.init, jax.random.key(0)))
    assert params["text"]["token_embed"]["embedding"].shape == (1000, 32)
    with pytest.raises(ValueError, match=r"model.text.vocab_size=100 is smaller than the vocab size 384"):
        get_objective("clip")(tiny_config(**{"model.text.vocab_size": 100}))
