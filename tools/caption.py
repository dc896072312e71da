#!/usr/bin/env python
"""Caption a folder of images with a run of a captioning objective (coca, cappa).

  python tools/caption.py --workdir=runs/coca --image_dir=photos/ --out=captions.jsonl
  python tools/caption.py --workdir=runs/coca --image_dir=photos/ --decode=beam --beams=4 --out=captions.jsonl
  python tools/caption.py --workdir=runs/coca --images a.jpg b.png --decode=sample --top_p=0.9 --temperature=0.7

Images are resized (shorter side) and center-cropped to the model's image size, as in evaluation. Decoding is
jitted and KV-cached; one JSON line per image: {"image": path, "caption": text}. Unreadable images are skipped and
listed in the printed JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_config_args, quiet_library_logs, resolve_config  # noqa: E402
from embed import add_image_args, image_paths, load_image  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    add_image_args(parser)
    parser.add_argument("--out", required=True, help="output .jsonl file")
    parser.add_argument("--decode", default="greedy", choices=("greedy", "beam", "sample"))
    parser.add_argument("--beams", type=int, default=4, help="beam search: beams")
    parser.add_argument("--length_penalty", type=float, default=0.6, help="beam search: GNMT alpha (0 = none)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--top_k", type=int, default=0, help="sampling: keep the k most likely tokens (0 = all)")
    parser.add_argument("--top_p", type=float, default=1.0, help="sampling: nucleus mass (1 = all)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--max_len", type=int, default=None, help="tokens per caption incl. eos (<= data.max_text_len)")
    parser.add_argument("--batch_size", type=int, default=64, help="images per device call")
    args = parser.parse_args(argv)
    paths = image_paths(args)
    if not paths:
        raise SystemExit("no images: give --images, --image_list or --image_dir")
    quiet_library_logs()

    import jax
    from tqdm import tqdm

    from vlp.data.transforms import normalize_image
    from vlp.train.evaluation import batched_apply
    from vlp.train.restore import restore_run

    exp, step, state = restore_run(args.workdir, config=resolve_config(args), step=args.step)
    objective = exp.objective
    if not hasattr(objective, "caption_tokens"):
        raise SystemExit(f"objective {exp.config.objective!r} does not write captions; use a coca or cappa run")
    options = dict(method=args.decode, max_len=args.max_len, beams=args.beams, length_penalty=args.length_penalty,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    decode = jax.jit(lambda p, x, rng: objective.caption_tokens(p, x, rng=rng, **options))  # compiled once
    size = exp.config.data.image_size
    written, skipped = 0, []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with exp.context(), out.open("w", encoding="utf-8") as f:
        progress = tqdm(total=len(paths), desc="caption", unit="img", file=sys.stderr, dynamic_ncols=True)
        for start in range(0, len(paths), args.batch_size):
            chunk, kept = [], []
            for path in paths[start:start + args.batch_size]:
                try:
                    chunk.append(load_image(path, size))
                    kept.append(path)
                except (OSError, ValueError) as e:
                    skipped.append(f"{path}\t{type(e).__name__}: {e}")
            if chunk:
                rng = jax.random.fold_in(jax.random.key(args.seed), start)  # sampling: a different draw per batch
                ids = batched_apply(lambda p, x: decode(p, x, rng), state.params, normalize_image(np.stack(chunk)),
                                    args.batch_size, exp.mesh)
                for path, row in zip(kept, ids):
                    f.write(json.dumps({"image": path, "caption": objective.tokenizer.decode(row)}) + "\n")
                    written += 1
            progress.update(len(paths[start:start + args.batch_size]))
        progress.close()
    summary = {"step": step, "captions": written, "out": str(out), "decode": args.decode, "skipped": skipped}
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
