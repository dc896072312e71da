#!/usr/bin/env python
"""Write a K-shot labelled subset of shapes (vlp ArrayRecord shards + manifest) for prompt learning.

  python tools/few_shot.py --out=data/shapes_16shot --shots=16

The first `--shots` training examples of each of the 64 classes. Train prompt learning on it with
`--config.data.mixture='("arrayrecord:data/shapes_16shot=1",)'` (configs/prompt.py does), evaluation staying on
shapes' validation split. The manifest marks the set as not augmentable (shapes captions name positions).
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--shots", type=int, default=16, help="examples per class")
    parser.add_argument("--split", default="train", help="shapes split to draw from")
    parser.add_argument("--start", type=int, default=0, help="first index considered")
    parser.add_argument("--image_size", type=int, default=32)
    args = parser.parse_args(argv)

    from etils import epath

    from vlp.data import few_shot, shapes, shard_writer

    source = few_shot.FewShotShapesInput(args.split, args.shots, args.image_size, args.start)
    entry = shard_writer.write_shards(source, args.out, "train", class_names=list(shapes.CLASS_NAMES))
    manifest_path = epath.Path(args.out) / shard_writer.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["augmentable"] = False
    manifest["few_shot"] = {"shots": args.shots, "split": args.split, "start": args.start}
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    print(json.dumps({"out": args.out, "num_records": entry["num_records"]}))
    return 0 if entry["num_records"] else 1


if __name__ == "__main__":
    sys.exit(main())
