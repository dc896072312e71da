"""A short CPU run learns: the loss falls below 0.7 ln(B) and validation zero-shot reaches >= 3x chance."""

import math

from conftest import tiny_config

from vlp.data.shapes import CLASS_NAMES
from vlp.train.metrics import read_jsonl
from vlp.train.trainer import train_and_evaluate


def test_short_run_learns(tmp_path):
    config = tiny_config(total_steps=300, batch_size=64, log_every=50)
    config.model.image.update(width=64, depth=2, mlp_dim=128, num_heads=4)
    config.model.text.update(width=64, depth=1, mlp_dim=128, num_heads=4)
    config.model.embed_dim = 64
    config.optim.update(lr=2e-3, warmup_steps=30)
    config.evals.zeroshot.num_examples = 500
    final = train_and_evaluate(config, tmp_path)
    last_losses = [r["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r][-2:]
    assert max(last_losses) < 0.7 * math.log(64)
    assert final["zeroshot_top1"] >= 3.0 / len(CLASS_NAMES)
