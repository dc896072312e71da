#!/usr/bin/env python
"""The same CLIP train step in open_clip + torch, for a side-by-side with benchmarks/train_step.py, as one JSON line.

The open_clip model is built from the vlp config's own model (`vlp.export.open_clip.model_config`, the mapping the
exporter uses, so both sides are the same architecture; the parameter counts are checked equal), trained with
open_clip's `ClipLoss` (symmetric InfoNCE with the learned logit scale), global-norm clipping and torch AdamW with
vlp's hyperparameters, on a fixed synthetic batch (images uniform in [-1, 1], tokens from every vocabulary row) kept
in memory, fp32. Reports samples/s and the model TFLOP/s by vlp's own analytic count (`vlp/models/flops.py`, the
figure train_step.py divides by), so the two JSON lines compare directly.

  python benchmarks/open_clip_step.py [--config=configs/clip.py:bench] [--set KEY=VALUE ...] [--steps 10]
      [--warmup 2] [--threads 2]

Like benchmarks/train_step.py it runs under vlp's glibc malloc settings on CPU (`vlp/host_malloc.py`; torch gains
from them too), so both sides use the same allocator; `VLP_HOST_MALLOC=default` runs either with glibc's own.

Needs torch and open_clip (`pip install -e .[interop]`); without them it prints why and exits 0 with a JSON line
`{"skipped": "..."}`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any


def _say(message: str) -> None:
    print(f"[open_clip_step] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/clip.py:bench", help="config file[:variant,key=value,...]")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: one per CPU core)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.threads < 0:
        raise SystemExit(f"--steps={args.steps} must be >= 1, --warmup={args.warmup} and --threads={args.threads} "
                         f">= 0")
    try:
        import open_clip
        import torch
    except ImportError as e:
        result = {"skipped": f"open_clip_step.py needs torch and open_clip ({e}); pip install -e .[interop]"}
        _say(result["skipped"])
        print(json.dumps(result), flush=True)
        return result
    import os

    from vlp import config as vlp_config
    from vlp.export.common import ModelSpec
    from vlp.export.open_clip import check_exportable, model_config
    import jax

    from vlp.objectives import get_objective

    config = vlp_config.load_config_file(args.config)
    vlp_config.apply_overrides(config, vlp_config.parse_overrides(args.set))
    if config.objective != "clip":
        raise SystemExit(f"--config objective={config.objective!r}: open_clip_step.py compares the 'clip' objective")
    objective = get_objective(config.objective)(config)
    spec = ModelSpec.from_model(objective.model, config.data.image_size)
    check_exportable(spec)
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)

    cfg = model_config(spec)
    model = open_clip.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"],
                           quick_gelu=cfg["quick_gelu"]).train()
    loss_fn = open_clip.ClipLoss()
    optim = config.optim
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "positional_embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "positional_embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": optim.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=optim.lr, betas=(optim.b1, optim.b2), eps=optim.eps)
    batch = config.batch_size
    generator = torch.Generator().manual_seed(config.seed)
    images = torch.rand(batch, 3, config.data.image_size, config.data.image_size, generator=generator) * 2 - 1
    text = torch.randint(1, spec.text["vocab_size"], (batch, spec.text["max_len"]), generator=generator)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        image_features, text_features, logit_scale = model(images, text)
        loss = loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        if optim.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip_norm)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # open_clip's training loop clamps log(scale) to log(100)
        return float(loss)

    _say(f"{args.config} {' '.join(args.set)}: batch {batch}, torch {torch.__version__} on {threads} threads, "
         f"open_clip {open_clip.__version__}")
    for i in range(args.warmup):
        step()
        _say(f"warm-up {i + 1}/{args.warmup}")
    step_seconds, loss = [], float("nan")
    for i in range(args.steps):
        start = time.perf_counter()
        loss = step()
        step_seconds.append(time.perf_counter() - start)
        _say(f"step {i + 1}/{args.steps}: {step_seconds[-1]:.4f}s")

    mean_seconds = statistics.fmean(step_seconds)
    model_flops_per_step = objective.train_flops_per_example() * batch
    vlp_params = sum(int(x.size) for x in jax.tree.leaves(jax.eval_shape(objective.init, jax.random.key(0))))
    torch_params = sum(p.numel() for p in model.parameters())
    result = {
        "config": args.config, "overrides": args.set, "framework": f"open_clip {open_clip.__version__} / torch "
        f"{torch.__version__}", "threads": threads, "batch_size": batch, "warmup_steps": args.warmup,
        "steps": len(step_seconds), "step_seconds_mean": round(mean_seconds, 5),
        "step_seconds_median": round(statistics.median(step_seconds), 5),
        "samples_per_second": round(batch / mean_seconds, 1),
        "samples_per_second_median": round(batch / statistics.median(step_seconds), 1),
        "model_flops_per_step": model_flops_per_step,
        "model_tflops_per_second": round(model_flops_per_step / mean_seconds / 1e12, 4),
        "params": torch_params, "vlp_params": vlp_params, "loss": loss,
    }
    if torch_params != vlp_params:
        _say(f"WARNING: open_clip has {torch_params} parameters, vlp {vlp_params}: not the same model")
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    from vlp.host_malloc import reexec_with_malloc_tunables

    reexec_with_malloc_tunables()  # on CPU: freed buffers reused, no page faults per step (vlp/host_malloc.py)
    main()
