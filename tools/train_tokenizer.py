#!/usr/bin/env python
"""Train a sentencepiece tokenizer with vlp's special ids (pad 0, unk 1, eos = the highest id) on captions.

  python tools/train_tokenizer.py --captions=captions.txt --out=tok/my_sp --vocab_size=32000
  python tools/train_tokenizer.py --shapes --out=tok               # writes tok/shapes_sp.model (the bundled one)

`--captions` is a text file with one caption per line. Use the result with `--config.data.tokenizer=<out>.model`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--captions", help="text file, one caption per line")
    source.add_argument("--shapes", action="store_true", help="rebuild the bundled shapes tokenizer")
    parser.add_argument("--out", required=True,
                        help="output prefix: writes <out>.model and <out>.vocab (with --shapes: a directory)")
    parser.add_argument("--vocab_size", type=int, default=32000, help="number of pieces (with --captions)")
    args = parser.parse_args(argv)

    from vlp.data.tokenizer import Tokenizer, build_shapes_tokenizer, train_sentencepiece

    if args.shapes:
        model_path = build_shapes_tokenizer(args.out)
    else:
        lines = [line.strip() for line in Path(args.captions).read_text(encoding="utf-8").splitlines()]
        texts = [line for line in lines if line]
        if not texts:
            raise SystemExit(f"no captions in {args.captions}: expected one caption per line")
        model_path = train_sentencepiece(texts, args.out, args.vocab_size)
    tokenizer = Tokenizer(model_path)
    print(json.dumps({"model": str(model_path), "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
                      "pad_id": tokenizer.pad_id}))
    return str(model_path)


if __name__ == "__main__":
    main()
