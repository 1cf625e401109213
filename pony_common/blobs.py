"""Blob store (images, embeddings, cached latents, checkpoints) on fsspec: a local folder by default, s3:// or gs://."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import BinaryIO

import fsspec
from fsspec.core import url_to_fs

CHUNK_BYTES = 1 << 16


class TooLarge(ValueError):
    """A read stopped at its byte cap: the source holds more than `limit` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"larger than {limit} bytes")


def read_capped(fh: BinaryIO, max_bytes: int | None) -> bytes:
    """Reads `fh` to its end, or raises TooLarge once more than `max_bytes` have come (never holding more than
    `max_bytes` plus one chunk). `max_bytes` None = no cap."""
    if max_bytes is None:
        return fh.read()
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = fh.read(min(CHUNK_BYTES, max_bytes + 1 - size))
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise TooLarge(max_bytes)
        chunks.append(chunk)


class BlobStore:
    """Keys are relative paths ("images/ab/abcdef.png"); writes are atomic (temp name, then rename)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.fs, self.root = url_to_fs(self.url)
        if self.fs.protocol in ("file", ("file", "local")) or "file" in self.fs.protocol:
            os.makedirs(self.root, exist_ok=True)

    def path(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/") or "\x00" in key:
            raise ValueError(f"blob key must be relative and stay inside the store: {key!r}")
        return f"{self.root}/{key}"

    def uri(self, key: str) -> str:
        """A URI other processes can open (file path for local stores)."""
        return self.fs.unstrip_protocol(self.path(key)) if "file" not in self.fs.protocol else self.path(key)

    def exists(self, key: str) -> bool:
        return self.fs.exists(self.path(key))

    def put(self, key: str, data: bytes) -> str:
        """Writes `data` under `key` atomically; returns the key. Re-putting the same key overwrites."""
        target = self.path(key)
        parent = target.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        with self.fs.open(tmp, "wb") as fh:
            fh.write(data)
        self.fs.mv(tmp, target)
        return key

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Content-addressed write: True when written, False when the key existed."""
        if self.exists(key):
            return False
        self.put(key, data)
        return True

    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        """The blob's bytes; TooLarge when it holds more than `max_bytes` (None = no cap)."""
        with self.fs.open(self.path(key), "rb") as fh:
            return read_capped(fh, max_bytes)

    def delete(self, key: str) -> None:
        if self.exists(key):
            self.fs.rm(self.path(key))

    def list(self, prefix: str = "") -> Iterator[str]:
        base = self.path(prefix) if prefix else self.root
        if not self.fs.exists(base):
            return
        for full in sorted(self.fs.find(base)):
            rel = full[len(self.root) + 1 :] if full.startswith(self.root) else full
            if not rel.rsplit("/", 1)[-1].startswith(".tmp-"):
                yield rel


def open_uri(uri: str, max_bytes: int | None = None) -> bytes:
    """Reads any fsspec URI or local path, for locations the platform itself chose (a manifest's images, an
    operator's ingest source). A location a caller names goes through `pony_common.access` instead."""
    with fsspec.open(uri, "rb") as fh:
        return read_capped(fh, max_bytes)


def image_key(image_id: str, ext: str = "bin") -> str:
    return f"images/{image_id[:2]}/{image_id}.{ext}"
