"""The serialized image-text record stored in vlp's ArrayRecord shards, and image decoding.

One record = b"VLP1" + uint32 little-endian header length + UTF-8 JSON header + the encoded image bytes (JPEG,
PNG, ... as given). The header holds `key`, `captions` (list, the first is the main caption), `caption_synthetic`
(optional second caption, e.g. TIPS's), `label` (-1 = unlabelled) and optionally `signals` ({name: list of
floats}: extra modalities beyond image and text, e.g. a 1-D signal for Symile; records without it read as before).
Keeping the original image bytes makes the shards as small as the input and decoding the only image cost at
training time.
"""

from __future__ import annotations

import io
import json
import struct
from typing import Any

import numpy as np
from PIL import Image

MAGIC = b"VLP1"
_HEADER = struct.Struct("<I")


def encode_record(key: str, image_bytes: bytes, captions: list[str], label: int = -1,
                  caption_synthetic: str | None = None, signals: dict[str, Any] | None = None) -> bytes:
    """Serialize one example (see the module docstring); `captions` needs at least one caption; `signals` maps a
    modality name to a 1-D sequence of floats."""
    if not captions:
        raise ValueError(f"record {key!r} has no caption; at least one is needed")
    header = {"key": key, "captions": list(captions), "label": int(label)}
    if caption_synthetic is not None:
        header["caption_synthetic"] = caption_synthetic
    if signals:
        bad = {name: np.shape(v) for name, v in signals.items() if np.ndim(v) != 1 or not str(name).isidentifier()}
        if bad:
            raise ValueError(f"record {key!r}: signals must be 1-D float sequences under identifier names; got "
                             f"shapes {bad}")
        header["signals"] = {str(name): [float(x) for x in v] for name, v in signals.items()}
    header_bytes = json.dumps(header, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return MAGIC + _HEADER.pack(len(header_bytes)) + header_bytes + image_bytes


def decode_header(data: bytes) -> tuple[dict, memoryview]:
    """record bytes -> (header dict, image bytes); raises ValueError on anything that is not a vlp record."""
    view = memoryview(data)
    if len(view) < 8 or bytes(view[:4]) != MAGIC:
        raise ValueError(f"not a vlp record (expected magic {MAGIC!r}, got {bytes(view[:4])!r})")
    (size,) = _HEADER.unpack(view[4:8])
    if 8 + size > len(view):
        raise ValueError(f"truncated vlp record: header of {size} bytes but only {len(view) - 8} follow")
    header = json.loads(bytes(view[8:8 + size]).decode("utf-8"))
    return header, view[8 + size:]


def decode_image(image_bytes: bytes | memoryview, min_size: int | None = None) -> np.ndarray:
    """Encoded image -> uint8 [H, W, 3] RGB. With `min_size`, large JPEGs decode at a reduced scale (DCT scaling,
    several times faster) that keeps both sides >= min_size."""
    with Image.open(io.BytesIO(image_bytes)) as image:
        if min_size:
            image.draft("RGB", (min_size, min_size))
        return np.asarray(image.convert("RGB"))


def decode_record(data: bytes, index: int, min_size: int | None = None) -> dict:
    """record bytes -> the dict every vlp source yields: `image` uint8 [H, W, 3], `caption_noisy` (the main
    caption), `caption_synthetic` (the second caption, or the main one when absent), `captions` (all captions),
    `label` (int, -1 = unlabelled), `key`, `index`, and `signal_<name>` float32 [T] per extra modality."""
    header, image_bytes = decode_header(data)
    captions = header["captions"]
    signals = {f"signal_{name}": np.asarray(v, np.float32) for name, v in header.get("signals", {}).items()}
    return signals | {
        "image": decode_image(image_bytes, min_size),
        "caption_noisy": captions[0],
        "caption_synthetic": header.get("caption_synthetic", captions[0]),
        "captions": captions,
        "label": int(header["label"]),
        "key": header["key"],
        "index": int(index),
    }
