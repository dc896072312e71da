"""Captioning speed: captions/s and tokens/s of greedy and beam decoding, KV-cached vs uncached (same outputs).

  python benchmarks/decode.py --config=configs/coca.py:tiny [--workdir=runs/coca] [--batch=64] [--beams=4]

Without --workdir the model has random weights (decoding then usually runs to max_len, the slowest case). Prints
one JSON line per (method, cached) and whether cached and uncached outputs are equal. Never asserts on time.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/coca.py:tiny")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import jax

    from vlp import config as vlp_config
    from vlp.data import pipeline, sources
    from vlp.train.trainer import build_experiment

    if args.workdir:
        from vlp.train.restore import restore_run

        exp, _, state = restore_run(args.workdir)
    else:
        config = vlp_config.load_config_file(args.config)
        config.mesh.num_devices = 1
        exp = build_experiment(config)
        state = exp.init_state()
    images = pipeline.load_eval_set(sources.make_source(exp.config.data.source, "validation",
                                                        exp.config.data.image_size), args.batch).images
    rows, outputs = [], {}
    with exp.context():
        for method in ("greedy", "beam"):
            for cached in (True, False):
                fn = exp.objective.caption_fn(method=method, beams=args.beams, cached=cached)
                ids = np.asarray(fn(state.params, images))  # compile
                start = time.perf_counter()
                for _ in range(args.repeats):
                    ids = np.asarray(jax.block_until_ready(fn(state.params, images)))
                seconds = (time.perf_counter() - start) / args.repeats
                outputs[(method, cached)] = ids
                tokens = int((ids != exp.objective.tokenizer.pad_id).sum())
                rows.append({"method": method, "beams": args.beams if method == "beam" else 1, "cached": cached,
                             "captions_per_s": round(len(images) / seconds, 1),
                             "tokens_per_s": round(tokens / seconds, 1), "batch": len(images)})
                print(json.dumps(rows[-1]), flush=True)
            print(json.dumps({"method": method, "cached_equals_uncached":
                              bool((outputs[(method, True)] == outputs[(method, False)]).all())}), flush=True)
    return rows


if __name__ == "__main__":
    main()
