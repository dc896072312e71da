#!/usr/bin/env python
"""Embed image files and/or captions with a run's checkpoint (for your own retrieval, or parity checks).

  python tools/embed.py --workdir=runs/x --images img1.jpg img2.png --texts captions.txt --out=emb.npz
  python tools/embed.py --workdir=runs/x --image_dir=photos/ --out=emb/        # a folder of .npy files

Images are resized (shorter side to the model's image size) and center-cropped, then normalised as in
training; captions (one per line of --texts) are tokenised with the run's tokenizer. Embeddings are L2-normalised
float32. `--out` ending in .npz writes one file (image_embeddings, image_paths, text_embeddings, texts); otherwise
a folder with image_embeddings.npy, image_paths.txt, text_embeddings.npy, texts.txt. Unreadable images are skipped
and listed in the printed JSON summary (and skipped_images.txt).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_config_args, quiet_library_logs, resolve_config  # noqa: E402

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CHUNK = 1024  # images decoded and embedded at a time (bounds host memory)


def add_image_args(parser: argparse.ArgumentParser) -> None:
    """--step and the three ways to name images that `image_paths` reads (shared by embed.py and caption.py)."""
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest good one)")
    parser.add_argument("--images", nargs="*", default=None, help="image files")
    parser.add_argument("--image_list", default=None, help="a text file with one image path per line")
    parser.add_argument("--image_dir", default=None, help="a folder searched recursively for images")


def image_paths(args: argparse.Namespace) -> list[str]:
    paths = list(args.images or [])
    if args.image_list:
        paths += [line.strip() for line in Path(args.image_list).read_text().splitlines() if line.strip()]
    if args.image_dir:
        root = Path(args.image_dir)
        if not root.is_dir():
            raise SystemExit(f"--image_dir={root} is not a directory")
        paths += sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return paths


def load_image(path: str, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: decoded as RGB, shorter side resized to `size`, then the central square (as eval)."""
    from PIL import Image

    from vlp.data.augment import resize_center_crop

    with Image.open(path) as image:
        return resize_center_crop(np.asarray(image.convert("RGB"), np.uint8), size)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    add_image_args(parser)
    parser.add_argument("--texts", default=None, help="a UTF-8 text file with one caption per line")
    parser.add_argument("--out", required=True, help="output .npz file, or a folder for .npy files")
    parser.add_argument("--batch_size", type=int, default=256, help="examples per device call")
    args = parser.parse_args(argv)
    paths = image_paths(args)
    texts = ([line.strip() for line in Path(args.texts).read_text(encoding="utf-8").splitlines() if line.strip()]
             if args.texts else [])
    if not paths and not texts:
        raise SystemExit("nothing to embed: give --images, --image_list, --image_dir and/or --texts")
    quiet_library_logs()

    from tqdm import tqdm

    from vlp.data.transforms import normalize_image
    from vlp.train.evaluation import make_encoders
    from vlp.train.restore import restore_run

    exp, step, state = restore_run(args.workdir, config=resolve_config(args), step=args.step)
    size = exp.config.data.image_size
    image_emb, kept, skipped = [], [], []
    with exp.context():
        encoders = make_encoders(exp.objective, exp.mesh, args.batch_size)
        progress = tqdm(total=len(paths), desc="embed images", unit="img", file=sys.stderr, dynamic_ncols=True)
        for start in range(0, len(paths), CHUNK):
            chunk = []
            for path in paths[start:start + CHUNK]:
                try:
                    chunk.append(load_image(path, size))
                    kept.append(path)
                except (OSError, ValueError) as e:  # unreadable, truncated or not an image: list it, go on
                    skipped.append(f"{path}\t{type(e).__name__}: {e}")
            if chunk:
                image_emb.append(encoders.encode_image(state.params, normalize_image(np.stack(chunk))))
            progress.update(len(paths[start:start + CHUNK]))
        progress.close()
        text_emb = encoders.encode_text(state.params, encoders.tokenize(texts)) if texts else None
    dim = next((a.shape[1] for a in (*image_emb, text_emb) if a is not None), 0)
    images = np.concatenate(image_emb).astype(np.float32) if image_emb else np.zeros((0, dim), np.float32)
    text = np.asarray(text_emb, np.float32) if text_emb is not None else np.zeros((0, dim), np.float32)

    out = Path(args.out)
    if out.suffix == ".npz":
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out, image_embeddings=images, image_paths=np.asarray(kept, dtype=str), text_embeddings=text,
                 texts=np.asarray(texts, dtype=str))
        skipped_path = out.with_name(out.stem + "_skipped_images.txt")
    else:
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "image_embeddings.npy", images)
        np.save(out / "text_embeddings.npy", text)
        (out / "image_paths.txt").write_text("".join(f"{p}\n" for p in kept))
        (out / "texts.txt").write_text("".join(f"{t}\n" for t in texts), encoding="utf-8")
        skipped_path = out / "skipped_images.txt"
    if skipped:
        skipped_path.write_text("".join(f"{s}\n" for s in skipped))
    summary = {"out": str(out), "step": step, "images": len(kept), "texts": len(texts), "dim": int(dim),
               "skipped_images": len(skipped), **({"skipped_list": str(skipped_path)} if skipped else {})}
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
