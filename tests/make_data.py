"""Generated image-text data for the ingestion and source tests: tiny JPEG/PNG images, caption tables, tar and
parquet files, class folders, and ArrayRecord shards (some deliberately broken)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(i: int, fmt: str = "JPEG", size: tuple[int, int] = (20, 24)) -> bytes:
    """A distinct smooth image per i (smooth, so JPEG keeps it recognisable)."""
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    pixels = np.stack([(x * 9 + i * 37) % 256, (y * 7 + i * 53) % 256, np.full_like(x, (i * 91) % 256)], -1)
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, fmt)
    return out.getvalue()


def truncated_jpeg() -> bytes:
    data = image_bytes(999, size=(64, 64))
    return data[:len(data) // 2]


def good_rows(n: int) -> list[dict]:
    return [{"path": f"img{i}.{'png' if i % 3 == 0 else 'jpg'}", "caption": f"a photo number {i}",
             "caption_synthetic": f"a detailed synthetic caption of photo {i}", "label": i % 4} for i in range(n)]


def write_images(folder: Path, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(rows):
        (folder / row["path"]).write_bytes(image_bytes(i, "PNG" if row["path"].endswith(".png") else "JPEG"))


BROKEN_ROWS = [  # (path, caption bytes, expected reason)
    ("truncated.jpg", b"a truncated jpeg", "corrupt_image"),
    ("zero.jpg", b"a zero-byte file", "empty_image"),
    ("img1.jpg", b"   ", "empty_caption"),
    ("does_not_exist.jpg", b"a missing file", "missing_file"),
    ("img2.jpg", b"latin-1 caf\xe9", "non_utf8_caption"),
]


def write_caption_folder(root: Path, n_good: int = 12, broken: bool = True) -> Path:
    """images/ + captions.csv (header path,caption,caption_synthetic,label); broken rows go last."""
    rows = good_rows(n_good)
    write_images(root / "images", rows)
    (root / "images" / "truncated.jpg").write_bytes(truncated_jpeg())
    (root / "images" / "zero.jpg").write_bytes(b"")
    lines = [b"path,caption,caption_synthetic,label"]
    lines += [f"{r['path']},{r['caption']},{r['caption_synthetic']},{r['label']}".encode() for r in rows]
    if broken:
        lines += [path.encode() + b"," + caption + b",synthetic,0" for path, caption, _ in BROKEN_ROWS]
    (root / "captions.csv").write_bytes(b"\n".join(lines) + b"\n")
    return root / "captions.csv"


def write_tar(path: Path, rows: list[dict], first: int = 0) -> None:
    """webdataset layout: <key>.jpg|png, <key>.txt, <key>.json (synthetic caption and label); rows are numbered
    from `first`."""
    with tarfile.open(path, "w") as tar:
        for i, row in enumerate(rows, start=first):
            key, ext = f"{i:06d}", row["path"].rsplit(".", 1)[1]
            members = {ext: image_bytes(i, "PNG" if ext == "png" else "JPEG"), "txt": row["caption"].encode(),
                       "json": json.dumps({"caption_synthetic": row["caption_synthetic"],
                                           "label": row["label"]}).encode()}
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_record_shards(out: Path, n: int, size: tuple[int, int] = (40, 48), corrupt: tuple[int, ...] = (),
                        shard_size: int = 16, split: str = "train", synthetic: bool = True,
                        label_offset: int = 0) -> str:
    """ArrayRecord shards through the real writer; indices in `corrupt` get garbage bytes as their record."""
    from vlp.data import shard_writer

    class Rows:
        def rows(self):
            return list(range(n))

        def describe(self, i):
            return str(i)

        def load(self, i):
            from vlp.data.ingest_inputs import RawExample

            return RawExample(f"k{i}", image_bytes(i, size=size), [f"caption {i}"],
                              f"synthetic caption {i}" if synthetic else None, i % 5 + label_offset)

    shard_writer.write_shards(Rows(), str(out), split, shard_size)
    if corrupt:  # rewrite the shards with garbage in place of the chosen records
        from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

        manifest = json.loads((out / "manifest.json").read_text())
        index = 0
        for shard in manifest["splits"][split]["shards"]:
            path = str(out / shard["file"])
            reader = ArrayRecordReader(path)
            data = reader.read_all()
            reader.close()
            writer = ArrayRecordWriter(path, shard_writer.WRITER_OPTIONS)
            for record in data:
                writer.write(b"\x00garbage\xff" * 3 if index in corrupt else record)
                index += 1
            writer.close()
    return f"arrayrecord:{out}"
