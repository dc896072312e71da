"""An offline stand-in for a Google Cloud Storage bucket, for tests of gs:// workdirs.

One local folder holds the objects (`<root>/<bucket>/<name>`) and two fronts serve it:
- `LocalGcsBackend`: etils.epath's backend for `gs://` paths (what vlp's own files and orbax's directory handling go
  through; normally fsspec's gcsfs or tf.io.gfile);
- `serve`: a minimal GCS JSON API over HTTP (object read with ranges, upload, metadata, list, delete) that
  tensorstore's `gcs` kvstore driver talks to when TENSORSTORE_GCS_HTTP_URL points at it: the array data of
  orbax checkpoints goes there, through the same driver as on a real bucket.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import threading
import urllib.parse
from pathlib import Path
from typing import Iterator

from etils.epath import backend, gpath


class LocalGcsBackend(backend._OsPathBackend):  # noqa: SLF001 - the os backend does the work on mapped paths
    """gs://<bucket>/<name> is the file <root>/<bucket>/<name>."""

    def __init__(self, root: Path):
        self.root = str(root)

    def _local(self, path) -> str:
        path = os.fspath(path)
        assert path.startswith("gs://"), path
        return os.path.join(self.root, path[len("gs://"):])

    def _url(self, path: str) -> str:
        return "gs://" + os.path.relpath(path, self.root)

    def open(self, path, mode):
        return backend.os_backend.open(self._local(path), mode)

    def exists(self, path):
        return backend.os_backend.exists(self._local(path))

    def isdir(self, path):
        return backend.os_backend.isdir(self._local(path))

    def listdir(self, path):
        return backend.os_backend.listdir(self._local(path))

    def glob(self, path):
        return [self._url(p) for p in backend.os_backend.glob(self._local(path))]

    def walk(self, top, *, top_down=True, on_error=None):
        for folder, dirs, files in backend.os_backend.walk(self._local(top), top_down=top_down, on_error=on_error):
            yield self._url(folder), dirs, files

    def makedirs(self, path, *, exist_ok=False, mode=None):
        return backend.os_backend.makedirs(self._local(path), exist_ok=exist_ok)

    def mkdir(self, path, *, exist_ok=False, mode=None):
        return backend.os_backend.mkdir(self._local(path), exist_ok=exist_ok)

    def rmtree(self, path):
        return backend.os_backend.rmtree(self._local(path))

    def remove(self, path):
        return backend.os_backend.remove(self._local(path))

    def rename(self, path, dst):
        return backend.os_backend.rename(self._local(path), self._local(dst))

    def replace(self, path, dst):
        return backend.os_backend.replace(self._local(path), self._local(dst))

    def copy(self, path, dst, overwrite):
        return backend.os_backend.copy(self._local(path), self._local(dst), overwrite)

    def stat(self, path):
        return backend.os_backend.stat(self._local(path))


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    root: Path

    def log_message(self, *args) -> None:
        pass

    def _reply(self, code: int, body: bytes = b"{}", headers: dict | None = None,
               content_type: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _request(self) -> tuple[str, dict[str, str]]:
        url = urllib.parse.urlparse(self.path)
        return url.path, {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}

    def _metadata(self, bucket: str, name: str, path: Path) -> dict:
        stat = path.stat()
        return {"kind": "storage#object", "bucket": bucket, "name": name, "size": str(stat.st_size),
                "generation": str(stat.st_mtime_ns), "metageneration": "1"}

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path, query = self._request()
        if match := re.fullmatch(r"/storage/v1/b/([^/]+)/o/(.+)", path):
            bucket, name = match.group(1), urllib.parse.unquote(match.group(2))
            file = self.root / bucket / name
            if not file.is_file():
                return self._reply(404, b'{"error": {"code": 404, "message": "No such object"}}')
            metadata = self._metadata(bucket, name, file)
            if query.get("alt") != "media":
                return self._reply(200, json.dumps(metadata).encode())
            data, headers = file.read_bytes(), {"x-goog-generation": metadata["generation"]}
            if byte_range := self.headers.get("Range"):
                first, last = byte_range.split("=")[1].split("-")
                first, last = int(first), int(last) if last else len(data) - 1
                headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
                return self._reply(206, data[first:last + 1], headers, "application/octet-stream")
            return self._reply(200, data, headers, "application/octet-stream")
        if match := re.fullmatch(r"/storage/v1/b/([^/]+)/o", path):
            bucket, prefix = match.group(1), query.get("prefix", "")
            base = self.root / bucket
            items = [self._metadata(bucket, f.relative_to(base).as_posix(), f) for f in sorted(base.rglob("*"))
                     if f.is_file() and f.relative_to(base).as_posix().startswith(prefix)] if base.is_dir() else []
            return self._reply(200, json.dumps({"kind": "storage#objects", "items": items}).encode())
        self._reply(404)

    def do_POST(self) -> None:  # noqa: N802
        path, query = self._request()
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if match := re.fullmatch(r"/upload/storage/v1/b/([^/]+)/o", path):
            bucket, name = match.group(1), query["name"]
            file = self.root / bucket / name
            if query.get("ifGenerationMatch") == "0" and file.exists():
                return self._reply(412)
            file.parent.mkdir(parents=True, exist_ok=True)
            partial = file.with_name(file.name + ".uploading")
            partial.write_bytes(body)
            os.replace(partial, file)  # an object appears whole, as on GCS
            return self._reply(200, json.dumps(self._metadata(bucket, name, file)).encode())
        self._reply(404)

    def do_DELETE(self) -> None:  # noqa: N802
        path, _ = self._request()
        if match := re.fullmatch(r"/storage/v1/b/([^/]+)/o/(.+)", path):
            file = self.root / match.group(1) / urllib.parse.unquote(match.group(2))
            if file.is_file():
                file.unlink()
                return self._reply(204, b"")
        self._reply(404)


def serve(root: Path) -> http.server.ThreadingHTTPServer:
    """Starts the JSON API for the buckets under `root` on a free localhost port (a daemon thread)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_Handler,), {"root": Path(root)}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@contextlib.contextmanager
def fake_gcs(root: Path, monkeypatch) -> Iterator[Path]:
    """gs:// paths (epath) and tensorstore's gcs driver both read and write under `root` while active."""
    from orbax.checkpoint._src.path import gcs_utils

    server = serve(root)
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "offline")
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", LocalGcsBackend(root))  # noqa: SLF001
    # Orbax asks google-cloud-storage whether a bucket has a hierarchical namespace; this one has not.
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    try:
        yield root
    finally:
        server.shutdown()
        server.server_close()
