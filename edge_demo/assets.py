"""Static files as a phone on a slow network wants them: compressed once, named by content.

* Each file is identified by the sha256 of its bytes (hashed once per size and mtime): that
  is its ETag, and the version in its URL (``?v=`` or a path segment).
* gzip and brotli copies are made once per content hash, by one low-priority background
  thread, and kept on disk (``<state>/compressed/<sha256>.<enc><level>``): a restart or a
  second server on the same state folder compresses nothing again. A request never waits
  for compression; until a copy exists the file is sent as it is.
* ``Accept-Encoding`` picks the copy (brotli, then gzip, by the client's q-values), always
  with ``Vary: Accept-Encoding``; each copy has its own ETag (``"<sha256>"``,
  ``"<sha256>-br"``, ``"<sha256>-gz"``) and ``If-None-Match`` with any of them is a 304.
* A URL that carries the current version is cached for a year (``immutable``); any other URL
  is revalidated (``no-cache``): a stale version never poisons a cache under a new name.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

from dermedge.files import write_bytes

log = logging.getLogger("edge_demo.assets")

IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"
MIN_SIZE = 1024  # smaller files gain nothing worth a header
WORTH = 0.95  # a copy is used only when it is at most this fraction of the original
COMPRESSIBLE = frozenset({
    "text/html", "text/css", "text/javascript", "text/plain", "application/javascript",
    "application/json", "application/manifest+json", "application/wasm", "image/svg+xml",
    "application/octet-stream",  # the .tflite model
})
# brotli quality and gzip level: "best" is made once per content and is worth its minute on a
# 9 MB runtime (brotli 11: 2.0 MB, brotli 5: 2.4 MB, gzip 9: 2.85 MB); "fast" for slow
# machines and the test suite
EFFORTS = {"best": {"br": 11, "gz": 9}, "fast": {"br": 5, "gz": 6}, "off": {}}
VERSION_CHARS = 16
SMALL = 256 * 1024  # files up to this size are read into memory; larger ones are streamed


@dataclass(frozen=True)
class Asset:
    """One file's bytes (on disk, or in memory for the model) and their identity."""

    sha256: str
    size: int
    mimetype: str
    path: Path | None = None
    data: bytes | None = None

    @property
    def version(self) -> str:
        """What a versioned URL carries."""
        return self.sha256[:VERSION_CHARS]

    def is_version(self, version: str | None) -> bool:
        """Whether a URL's version names these bytes (the URL's prefix of the sha256, at
        least the 16 characters :attr:`version` has)."""
        return (version is not None and len(version) >= VERSION_CHARS
                and self.sha256.startswith(version.lower()))

    def etag(self, enc: str | None) -> str:
        return self.sha256 if enc is None else f"{self.sha256}-{enc}"

    def read(self) -> bytes:
        return self.data if self.data is not None else self.path.read_bytes()

    @property
    def compressible(self) -> bool:
        return self.size >= MIN_SIZE and self.mimetype in COMPRESSIBLE


def _brotli():
    try:
        import brotli
    except ImportError:  # the demo extra installs it; without it gzip only
        return None
    return brotli


class AssetStore:
    """Hashes, compresses (in the background) and serves static files; see the module doc."""

    def __init__(self, cache_dir: str | Path | None, effort: str = "best"):
        if effort not in EFFORTS:
            raise ValueError(f"compression effort must be one of {sorted(EFFORTS)};"
                             f" received {effort!r}")
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.levels = dict(EFFORTS[effort]) if self.cache_dir else {}
        if "br" in self.levels and _brotli() is None:
            del self.levels["br"]
        self._hashes: dict[Path, tuple[tuple[int, int], str]] = {}
        self._ready: dict[tuple[str, str], tuple[Path, int]] = {}
        self._queued: set[str] = set()
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None

    # --- identity ------------------------------------------------------------------------
    def file(self, path: str | Path, mimetype: str) -> Asset:
        """The asset for a file, hashed again only when its size or mtime changed."""
        path = Path(path)
        st = path.stat()
        stamp = (st.st_size, st.st_mtime_ns)
        hit = self._hashes.get(path)
        if hit is None or hit[0] != stamp:
            h = hashlib.sha256()
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            hit = self._hashes[path] = (stamp, h.hexdigest())
        return Asset(hit[1], st.st_size, mimetype, path=path)

    @staticmethod
    def blob(data: bytes, sha256: str, mimetype: str) -> Asset:
        """An asset held in memory whose sha256 is already known (the served model)."""
        return Asset(sha256, len(data), mimetype, data=data)

    # --- compressed copies ---------------------------------------------------------------
    def _copy_path(self, asset: Asset, enc: str) -> Path:
        return self.cache_dir / f"{asset.sha256}.{enc}{self.levels[enc]}"

    def copy(self, asset: Asset, enc: str) -> tuple[Path, int] | None:
        """The compressed copy ``enc`` of ``asset`` when it exists and is worth sending."""
        if enc not in self.levels:  # --compress off, or no brotli installed
            return None
        key = (asset.sha256, enc)
        hit = self._ready.get(key)
        if hit is not None:
            return hit if hit[1] <= asset.size * WORTH else None
        path = self._copy_path(asset, enc)
        try:
            size = path.stat().st_size
        except OSError:
            return None
        self._ready[key] = (path, size)
        return (path, size) if size <= asset.size * WORTH else None

    def missing(self, asset: Asset) -> list[str]:
        """The encodings ``asset`` has no copy of yet (a copy too large to be worth sending
        counts as made)."""
        if not asset.compressible:
            return []
        out = []
        for enc in self.levels:
            self.copy(asset, enc)  # notes a copy another process made meanwhile
            if (asset.sha256, enc) not in self._ready:
                out.append(enc)
        return out

    def compress_soon(self, assets) -> int:
        """Queue the assets that lack a compressed copy; returns how many were queued."""
        n = 0
        for asset in assets:
            if not self.missing(asset):
                continue
            with self._lock:
                if asset.sha256 in self._queued:
                    continue
                self._queued.add(asset.sha256)
                if self._worker is None:
                    self._worker = threading.Thread(target=self._work, daemon=True,
                                                    name="edge-demo-compress")
                    self._worker.start()
            self._queue.put(asset)
            n += 1
        return n

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every queued asset is compressed (for start-up reports and tests)."""
        if self._worker is None:
            return True
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def _work(self) -> None:
        try:  # below the request workers: compressing must not slow the answers
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):
            pass
        while True:
            item = self._queue.get()
            if isinstance(item, threading.Event):
                item.set()
                continue
            try:
                self._compress(item)
            except Exception:  # noqa: BLE001 - the file is still served uncompressed
                log.exception("could not compress %s", item.path or item.sha256)
            finally:
                with self._lock:
                    self._queued.discard(item.sha256)

    def _compress(self, asset: Asset) -> None:
        data = None
        for enc, level in self.levels.items():
            path = self._copy_path(asset, enc)
            if path.exists():
                continue
            if data is None:
                data = asset.read()
                if hashlib.sha256(data).hexdigest() != asset.sha256:
                    return  # changed on disk since it was hashed: the next request hashes anew
            out = (_brotli().compress(data, quality=level) if enc == "br"
                   else gzip.compress(data, compresslevel=level, mtime=0))
            write_bytes(path, out)
            self._ready.pop((asset.sha256, enc), None)

    # --- responses -----------------------------------------------------------------------
    def respond(self, request, asset: Asset, version: str | None = None,
                extra_headers: dict[str, str] | None = None):
        """The response for ``asset``: the best copy the client accepts, its ETag, a 304 when
        the client has it, and a year of caching when ``version`` is the asset's own."""
        from flask import current_app
        from werkzeug.wsgi import wrap_file

        encodings = []
        if asset.compressible:
            self.compress_soon([asset])
            accepts = request.accept_encodings
            ranked = sorted(((accepts.quality(name), -i, enc) for i, (enc, name) in
                             enumerate((("br", "br"), ("gz", "gzip")))), reverse=True)
            encodings = [enc for q, _, enc in ranked if q > 0]
        chosen, copy = None, None
        for enc in encodings:
            copy = self.copy(asset, enc)
            if copy is not None:
                chosen = enc
                break
        headers = {"ETag": f'"{asset.etag(chosen)}"',
                   "Cache-Control": IMMUTABLE if asset.is_version(version) else REVALIDATE,
                   **(extra_headers or {})}
        if asset.compressible:
            headers["Vary"] = "Accept-Encoding"
        tags = {asset.etag(e) for e in (None, "br", "gz")}
        if request.if_none_match and (request.if_none_match.star_tag or any(
                request.if_none_match.contains_weak(t) for t in tags)):
            return current_app.response_class(status=304, headers=headers)
        if chosen is not None:
            path, length = copy
            headers["Content-Encoding"] = {"br": "br", "gz": "gzip"}[chosen]
        else:
            path, length = asset.path, asset.size
        if asset.data is not None and chosen is None:
            body = asset.data
        elif length <= SMALL:
            body = path.read_bytes()
        else:  # waitress sends it from the file, in its I/O thread
            body = wrap_file(request.environ, path.open("rb"))
        resp = current_app.response_class(body, mimetype=asset.mimetype, headers=headers,
                                           direct_passthrough=not isinstance(body, bytes))
        resp.content_length = length
        return resp
