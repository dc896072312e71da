#!/usr/bin/env python
"""Train a sentencepiece tokenizer with vlp's special ids (pad 0, unk 1, eos = the highest id) on captions.

  python tools/train_tokenizer.py --source=arrayrecord:shards/mine --out=tok/mine --vocab_size=32000
  python tools/train_tokenizer.py --source=tfds:coco_captions --split=train --limit=200000 --out=tok/coco
  python tools/train_tokenizer.py --captions=captions.txt --out=tok/my_sp --vocab_size=32000
  python tools/train_tokenizer.py --shapes --out=tok               # writes tok/shapes_sp.model (the bundled one)

`--source` is any data source spec (`shapes`, `arrayrecord:<dir>`, `tfds:<name>`): all captions of the split,
synthetic ones included, read the same way as the bundled shapes tokenizer is built. `--captions` is a text file
with one caption per line. Use the result with `--config.data.tokenizer=<out>.model`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--captions", help="text file, one caption per line")
    source.add_argument("--source", help="data source spec, e.g. arrayrecord:shards/mine (see vlp/data/sources.py)")
    source.add_argument("--shapes", action="store_true", help="rebuild the bundled shapes tokenizer")
    parser.add_argument("--split", default="train", help="split of --source")
    parser.add_argument("--limit", type=int, default=None, help="read the first N records of --source only")
    parser.add_argument("--out", required=True,
                        help="output prefix: writes <out>.model and <out>.vocab (with --shapes: a directory)")
    parser.add_argument("--vocab_size", type=int, default=32000,
                        help="number of pieces (with --captions / --source)")
    args = parser.parse_args(argv)

    from vlp.data.tokenizer import Tokenizer, build_shapes_tokenizer, train_sentencepiece

    if args.shapes:
        model_path = build_shapes_tokenizer(args.out)
    else:
        if args.source:
            from vlp.data import sources

            texts, where = sources.all_captions(args.source, args.split, args.limit), f"{args.source} {args.split}"
        else:
            lines = [line.strip() for line in Path(args.captions).read_text(encoding="utf-8").splitlines()]
            texts, where = [line for line in lines if line], f"{args.captions} (expected one caption per line)"
        if not texts:
            raise SystemExit(f"no captions in {where}")
        print(f"training a {args.vocab_size}-piece tokenizer on {len(texts)} captions of {where}", file=sys.stderr)
        model_path = train_sentencepiece(texts, args.out, args.vocab_size)
    tokenizer = Tokenizer(model_path)
    print(json.dumps({"model": str(model_path), "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
                      "pad_id": tokenizer.pad_id}))
    return str(model_path)


if __name__ == "__main__":
    main()
