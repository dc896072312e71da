#!/usr/bin/env python
"""Convert image-text data into vlp's ArrayRecord shards plus a JSON manifest (train with
`--config.data.source=arrayrecord:<out>`).

  python tools/make_shards.py --captions=data/captions.csv --images_root=data/images --out=shards/mine
  python tools/make_shards.py --captions=coco_train.jsonl --images_root=coco/train2017 --out=shards/coco
  python tools/make_shards.py --tar='laion/{00000..00009}.tar' --out=shards/laion     # webdataset / img2dataset
  python tools/make_shards.py --parquet=data/pairs.parquet --out=shards/pairs
  python tools/make_shards.py --class_folders=eurosat/val --split=validation --out=shards/eurosat
  python tools/make_shards.py --verify --out=shards/mine      # shards still match the manifest's checksums?

CSV/TSV need a header row: path, caption[, caption_synthetic][, label]; JSONL objects use the same names (or
`captions: [...]`). Paths may be `gs://...`. Bad rows (missing, zero-byte or corrupt images, empty or non-UTF-8
captions) are skipped, counted in the manifest and listed in <out>/<split>-skipped.jsonl. Re-running the same
command resumes: finished shards are kept. Exits non-zero only when no valid record was written.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys


def _expand(patterns: list[str]) -> list[str]:
    """Local globs and webdataset brace ranges ('{00000..00009}'); cloud paths are taken as given."""
    out = []
    for pattern in patterns:
        match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
        if match:
            first, last = match.groups()
            names = [pattern[:match.start()] + str(i).zfill(len(first)) + pattern[match.end():]
                     for i in range(int(first), int(last) + 1)]
        else:
            names = [pattern]
        for name in names:
            local = glob.glob(name) if "://" not in name else []
            out += sorted(local) if local else [name]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kind = parser.add_mutually_exclusive_group(required=True)
    kind.add_argument("--captions", help="CSV / TSV / JSONL table of (image path, caption[s], ...)")
    kind.add_argument("--tar", nargs="+", help="webdataset tar shards (globs and {000..009} ranges)")
    kind.add_argument("--parquet", nargs="+", help="parquet files with image bytes or image paths")
    kind.add_argument("--class_folders", help="folder whose sub-folders are classes")
    kind.add_argument("--verify", action="store_true",
                      help="check the shards in --out against the manifest's checksums (exit 1 on a mismatch)")
    parser.add_argument("--images_root", default=None, help="folder that relative image paths start from")
    parser.add_argument("--out", required=True, help="output folder (local or gs://)")
    parser.add_argument("--split", default="train", help="split name (one run writes one split)")
    parser.add_argument("--shard_size", type=int, default=10_000, help="input rows per shard")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="parallel processes")
    parser.add_argument("--resize_short_side", type=int, default=0,
                        help="re-encode images whose short side is larger as JPEG of this short side (0 = keep)")
    args = parser.parse_args(argv)

    from vlp.data import ingest_inputs, shard_writer

    if args.verify:
        problems = shard_writer.verify_shards(args.out)
        print(json.dumps({"out": args.out, "intact": not problems, "problems": problems}))
        return 1 if problems else 0
    class_names = None
    if args.captions:
        source = ingest_inputs.CaptionFileInput(args.captions, args.images_root)
    elif args.tar:
        source = ingest_inputs.TarInput(_expand(args.tar))
    elif args.parquet:
        source = ingest_inputs.ParquetInput(_expand(args.parquet), args.images_root)
    else:
        source = ingest_inputs.ClassFoldersInput(args.class_folders)
        class_names = source.class_names
    entry = shard_writer.write_shards(source, args.out, args.split, args.shard_size, args.workers,
                                      args.resize_short_side, class_names)
    summary = {key: entry[key] for key in ("num_records", "num_input_rows", "skipped")}
    print(json.dumps(dict(summary, out=args.out, split=args.split, shards=len(entry["shards"]))))
    if entry["num_records"] == 0:
        print(f"make_shards: no valid record was written; see {args.out}/{entry['skipped_report']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
