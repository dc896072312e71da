"""One path type for everything a run writes: etils.epath.Path, so a workdir may be local or any URL epath knows
(`gs://`, `s3://`, ...). Orbax takes the same paths and writes checkpoints to the URL directly."""

from __future__ import annotations

import os

from etils import epath


def is_local(path: epath.PathLike) -> bool:
    """False for a URL (`gs://bucket/run`, `s3://...`): an object store, where each object is written whole."""
    return "://" not in os.fspath(path)


def as_path(path: epath.PathLike) -> epath.Path:
    """An epath.Path; a local one made absolute (orbax requires it; a URL is absolute already)."""
    path = epath.Path(path)
    return path.absolute() if is_local(path) else path


def write_text_atomic(path: epath.Path, text: str) -> None:
    """Writes `text` so that readers see the old file or the new one, never a part: locally through a temporary
    file in the same directory and a rename; an object store replaces an object whole anyway."""
    path = epath.Path(path)
    if not is_local(path):
        path.write_text(text)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # opened normally: the file mode follows the umask
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
