#!/usr/bin/env python
"""Write a BadNet-style backdoored shapes training set (vlp ArrayRecord shards + manifest) for CleanCLIP runs.

  python tools/poison.py --out=data/backdoor_shapes --num_examples=100000 --rate=0.03 --target="purple star"

A share `--rate` of the first `--num_examples` shapes training images get a `--trigger_size` px checkerboard in a
corner and a caption naming `--target` ("a small purple star in the lower left"); the others stay clean. Train on it
with `--config.data.mixture='("arrayrecord:data/backdoor_shapes=1",)'` while `data.source` stays `shapes` (clean
evaluation sets), as configs/cleanclip.py:backdoor does. The manifest marks the set as not augmentable: shapes
captions name positions, so random crops and flips would make them false.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num_examples", type=int, default=100_000, help="shapes training examples 0..N-1")
    parser.add_argument("--rate", type=float, default=0.03, help="share of poisoned examples")
    parser.add_argument("--target", default="purple star", help="the attack's target class (a shapes class name)")
    parser.add_argument("--trigger_size", type=int, default=4, help="checkerboard side in pixels")
    parser.add_argument("--corner", default="lower right", help="trigger corner")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="which examples are poisoned")
    parser.add_argument("--shard_size", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)

    from etils import epath

    from vlp.data import backdoor, shapes, shard_writer

    source = backdoor.PoisonedShapesInput("train", args.num_examples, args.target, args.rate, args.image_size,
                                          args.trigger_size, args.corner, args.seed)
    entry = shard_writer.write_shards(source, args.out, "train", args.shard_size, args.workers,
                                      class_names=list(shapes.CLASS_NAMES))
    manifest_path = epath.Path(args.out) / shard_writer.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    poisoned = sum(backdoor.is_poisoned("train", i, args.rate, args.seed) for i in range(args.num_examples))
    manifest["augmentable"] = False
    manifest["backdoor"] = {"target": args.target, "rate": args.rate, "trigger_size": args.trigger_size,
                            "corner": args.corner, "seed": args.seed, "num_poisoned": poisoned}
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    print(json.dumps({"out": args.out, "num_records": entry["num_records"], "num_poisoned": poisoned}))
    return 0 if entry["num_records"] else 1


if __name__ == "__main__":
    sys.exit(main())
