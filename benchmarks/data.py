#!/usr/bin/env python
"""Input pipeline throughput: images/s of the training stream (ArrayRecord read, JPEG decode, random resized crop
+ flip to 224 px, normalise, tokenise, batch) from generated JPEG shards, with 1 and 2 grain worker processes.
Prints one JSON line.

  python benchmarks/data.py [--images=512] [--source_size=320x256] [--batch=64] [--batches=20]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image


class _Generated:
    """Smooth random JPEGs (realistic JPEG sizes and decode cost) with captions."""

    def __init__(self, n: int, size: tuple[int, int]):
        self.n, self.size = n, size

    def rows(self) -> list[int]:
        return list(range(self.n))

    def describe(self, i: int) -> str:
        return str(i)

    def load(self, i: int):
        from vlp.data.ingest_inputs import RawExample

        rng = np.random.default_rng(i)
        small = rng.integers(0, 256, (self.size[1] // 16, self.size[0] // 16, 3), np.uint8)
        image = Image.fromarray(small).resize(self.size, Image.Resampling.BICUBIC)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=90)
        return RawExample(f"{i:06d}", out.getvalue(), [f"a generated photo number {i}"], None, i % 10)


def measure(spec: str, workers: int, batch: int, batches: int, size: int) -> float:
    from vlp.data import augment, sources
    from vlp.data.pipeline import SourceStream, TrainStreamSpec, make_train_dataset
    from vlp.data.tokenizer import Tokenizer
    from vlp.data.transforms import SelectCaption, TokenizeBatch

    streams = [SourceStream(sources.make_source(spec, "train", size), 1.0, augment.RandomResizedCrop(size))]
    iterator = iter(make_train_dataset(streams, SelectCaption("noisy"), TokenizeBatch(Tokenizer(), 32),
                                       TrainStreamSpec(batch, seed=0, worker_count=workers)))
    for _ in range(3):  # warm-up: worker start, first reads
        next(iterator)
    start = time.perf_counter()
    for i in range(batches):
        next(iterator)
        print(f"\rworkers={workers}: batch {i + 1}/{batches}", end="", file=sys.stderr)
    seconds = time.perf_counter() - start
    print(file=sys.stderr)
    if hasattr(iterator, "close"):
        iterator.close()
    return batch * batches / seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512, help="generated images in the shards")
    parser.add_argument("--source_size", default="320x256", help="stored JPEG size WxH")
    parser.add_argument("--image_size", type=int, default=224, help="training image size")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per worker count")
    parser.add_argument("--workers", default="1,2", help="worker counts to measure")
    args = parser.parse_args(argv)

    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
        flags.FLAGS.mark_as_parsed()
    from vlp.data import shard_writer

    width, height = (int(v) for v in args.source_size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        shard_writer.write_shards(_Generated(args.images, (width, height)), tmp, "train", shard_size=128,
                                  workers=min(4, os.cpu_count() or 1))
        shard_bytes = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp) if f.endswith("record"))
        result = {"benchmark": "data", "image_size": args.image_size, "source_size": args.source_size,
                  "mean_jpeg_kib": round(shard_bytes / args.images / 1024, 1), "batch": args.batch,
                  "cpu_count": os.cpu_count()}
        for workers in (int(w) for w in args.workers.split(",")):
            result[f"images_per_second_workers_{workers}"] = round(
                measure(f"arrayrecord:{tmp}", workers, args.batch, args.batches, args.image_size), 1)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
