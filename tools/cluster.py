#!/usr/bin/env python
"""MLCD's offline step: embed a split's images with a trained model, k-means them into K centres, and write each
record's k nearest centres as its labels (a side file keyed by record index, read by configs/mlcd.py).

  python tools/cluster.py --workdir=runs/clip --split=test --num_centres=64 --positives=3 --out=runs/clusters/labels.npy

The model is any vlp workdir (an imported HF / open_clip checkpoint becomes one by training 0 steps from it with
`init_from`, see tools/import.py). Writes <out> (int32 [N, k], row i = record i of --split of the run's
data.source, nearest centre first), <out>.json (what was clustered, how), <out>.centres.npy [K, D] and
<out>.embeddings.npy [N, D] (a memory map, so N is bounded by disk, not RAM). k-means is spherical (cosine),
jitted JAX with the centres sharded over all devices (vlp/data/kmeans.py), initialised from K random records.
Prints a progress line per pass and a JSON summary with the throughputs (embeddings/s).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_config_args, quiet_library_logs, resolve_config  # noqa: E402


def embed_split(exp, params, split: str, num_records: int | None, batch_size: int, out: Path) -> np.ndarray:
    """The split's image embeddings [N, D] in a memory-mapped .npy at `out` (row i = record i)."""
    from tqdm import tqdm

    from vlp.data.sources import make_source
    from vlp.data.transforms import normalize_image
    from vlp.train.evaluation import make_encoders

    config = exp.config
    source = make_source(config.data.source, split, config.data.image_size, num_records)
    encoders = make_encoders(exp.objective, exp.mesh, batch_size)
    n = len(source)
    emb = None
    chunk = batch_size * 4
    with tqdm(total=n, desc=f"embed {split}", unit="img", file=sys.stderr, dynamic_ncols=True) as progress:
        for start in range(0, n, chunk):
            images = np.stack([source[i]["image"] for i in range(start, min(start + chunk, n))])
            x = np.asarray(encoders.encode_image(params, normalize_image(images)), np.float32)
            if emb is None:
                emb = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(n, x.shape[1]))
            emb[start:start + len(x)] = x
            progress.update(len(x))
    emb.flush()
    return emb


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest good one)")
    parser.add_argument("--split", default="train", help="the split of the run's data.source to label")
    parser.add_argument("--num_records", type=int, default=None, help="label only the first N records")
    parser.add_argument("--num_centres", type=int, required=True, help="K (a multiple of the device count)")
    parser.add_argument("--positives", type=int, default=10, help="k nearest centres written per record")
    parser.add_argument("--iterations", type=int, default=20, help="Lloyd iterations")
    parser.add_argument("--batch_size", type=int, default=1024, help="images per encoder call / rows per k-means "
                                                                    "chunk x 16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output .npy of labels")
    args = parser.parse_args(argv)
    if args.num_centres < 2 or args.positives < 1 or args.positives > args.num_centres:
        raise SystemExit(f"need --num_centres >= 2 and 1 <= --positives <= --num_centres; got "
                         f"{args.num_centres} and {args.positives}")
    quiet_library_logs()

    from vlp.data.cluster_labels import write_cluster_labels
    from vlp.data.kmeans import KMeans
    from vlp.train.restore import restore_run

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    exp, step, state = restore_run(args.workdir, config=resolve_config(args), step=args.step)
    t0 = time.perf_counter()
    with exp.context():
        emb = embed_split(exp, state.params, args.split, args.num_records, args.batch_size,
                          Path(f"{out}.embeddings.npy"))
    embed_seconds = time.perf_counter() - t0
    n, dim = emb.shape
    if n < args.num_centres:
        raise SystemExit(f"--num_centres={args.num_centres} exceeds the {n} records of split {args.split!r}")

    rng = np.random.default_rng(args.seed)
    rows = 16 * args.batch_size

    def chunks():
        for start in range(0, n, rows):
            yield np.asarray(emb[start:start + rows])

    def reseed():
        return np.asarray(emb[np.sort(rng.choice(n, args.num_centres, replace=False))])

    def report(it: int, mean_cos: float, empty: int) -> None:
        print(f"k-means pass {it + 1}/{args.iterations} | mean cosine to nearest centre {mean_cos:.4f} | "
              f"empty clusters re-seeded {empty}", file=sys.stderr, flush=True)

    kmeans = KMeans(args.num_centres, dim)
    kmeans.init_from(reseed())
    t1 = time.perf_counter()
    history = kmeans.fit(chunks, args.iterations, reseed, report)
    fit_seconds = time.perf_counter() - t1
    labels = np.concatenate([kmeans.assign(x, args.positives)[0] for x in chunks()])
    np.save(f"{out}.centres.npy", np.asarray(kmeans.centres))
    meta = {"num_centres": args.num_centres, "source": exp.config.data.source, "split": args.split,
            "workdir": str(args.workdir), "step": int(step), "iterations": args.iterations, "seed": args.seed,
            "mean_cosine": history[-1] if history else None}
    write_cluster_labels(str(out), labels, meta)
    sizes = np.bincount(labels[:, 0], minlength=args.num_centres)
    summary = {"out": str(out), "records": int(n), "dim": int(dim), "num_centres": args.num_centres,
               "positives": args.positives, "step": int(step), "mean_cosine": meta["mean_cosine"],
               "cluster_size_min": int(sizes.min()), "cluster_size_max": int(sizes.max()),
               "embed_per_second": n / embed_seconds,
               "kmeans_embeddings_per_second": n * args.iterations / max(fit_seconds, 1e-9)}
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
