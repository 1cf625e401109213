"""Ingest sources: a folder of images with sidecar tag files, a JSONL/Parquet manifest, or WebDataset tar shards.

Every reader yields `SourceItem`s (bytes plus metadata) in a deterministic order; nothing here touches the catalog.
What a source may make ingest read is bounded: a folder's links out of the folder are not followed, a manifest names
files under its own folder (or under `PONY_INGEST_ALLOWED_ROOTS`, which alone admits URLs), every file and shard
member is read in chunks up to `PONY_INGEST_MAX_MEMBER_BYTES` and a shard up to `PONY_INGEST_MAX_SHARD_BYTES`
decompressed. What is refused is reported as an unreadable item with its reason; the rest of the source goes on.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import json
import logging
import lzma
import os
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pony_common.access import HTTP_SCHEMES, Hosts, Roots, fetch, read_file
from pony_common.blobs import CHUNK_BYTES, TooLarge, open_uri, read_capped
from pony_common.config import Settings
from pony_common.errors import InvalidArgument

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
MANIFEST_EXTENSIONS = (".jsonl", ".ndjson", ".parquet")


@dataclass
class SourceItem:
    """One image from a source, with the metadata the source gave for it."""

    uri: str
    data: bytes
    tags: list[str] = field(default_factory=list)
    characters: list[str] = field(default_factory=list)
    artist: str | None = None
    category: str | None = None
    source_site: str | None = None
    # Why the bytes could not be read (the item is still reported, never silently dropped).
    error: str | None = None


def split_tags(value: Any) -> list[str]:
    """Tags from a list or a comma-separated string, stripped, de-duplicated in order.

    Booru underscores become spaces (`long_hair` -> `long hair`) except in short emoticon tags such as `^_^`."""
    if value is None:
        return []
    raw = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    out: list[str] = []
    seen: set[str] = set()
    for tag in raw:
        tag = " ".join(tag.strip().split())
        if len(tag) > 3 and any(c.isalpha() for c in tag):
            tag = tag.replace("_", " ")
        if tag and tag not in seen:
            seen.add(tag)
            out.append(tag)
    return out


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """SourceItem fields from a sidecar/manifest record (tags, characters, artist, category, source/source_site)."""
    return {
        "tags": split_tags(meta.get("tags")),
        "characters": split_tags(meta.get("characters")),
        "artist": _text(meta.get("artist")),
        "category": _text(meta.get("category")),
        "source_site": _text(meta.get("source_site") or meta.get("source") or meta.get("site")),
    }


class Unreadable(Exception):
    """A file, URL or member ingest will not read; the message is the reason, safe to show."""


REFUSED = (
    "not under the manifest's folder or PONY_INGEST_ALLOWED_ROOTS: not read (move it under the manifest's folder "
    "or add its folder or URL prefix to PONY_INGEST_ALLOWED_ROOTS)"
)
LINK_OUT = "a link out of the source folder: not followed"


def _over_cap(cap: int) -> Unreadable:
    return Unreadable(f"larger than {cap} bytes (PONY_INGEST_MAX_MEMBER_BYTES)")


class SourceAccess:
    """What a source may make ingest read: files (links and `..` resolved) under its own folder or a folder of
    `PONY_INGEST_ALLOWED_ROOTS`, URLs under a URL prefix there (http(s) fetched with the shared policy's timeout
    and redirects only to the prefixes' hosts); everything at most `PONY_INGEST_MAX_MEMBER_BYTES`. The policy is
    `pony_common.access`; a refusal reads the same whether or not the thing exists."""

    def __init__(self, settings: Settings, folder: Path, *, allow_more: bool = True) -> None:
        entries = [str(folder), *(settings.ingest_allowed_roots if allow_more else ())]
        self.folder = folder
        self.roots = Roots(entries, setting="PONY_INGEST_ALLOWED_ROOTS")
        self.hosts = Hosts(p.netloc for p in self.roots.prefixes if p.scheme in HTTP_SCHEMES)
        self.cap = settings.ingest_max_member_bytes
        self.timeout_s = settings.image_fetch_timeout_s

    def confine(self, path: Path) -> str | None:
        """The real path of `path` when it lies under the roots, else None."""
        return self.roots.path(str(path.absolute()))

    def read(self, uri: str) -> bytes:
        """The bytes `uri` names: a URL, an absolute path or a path relative to the source's folder."""
        try:
            if "://" in uri and not uri.lower().startswith("file:"):
                return self._read_url(uri)
            local = uri if uri.lower().startswith("file:") or uri.startswith("/") else str(self.folder / uri)
            real = self.roots.path(local)
            if real is None:
                raise Unreadable(REFUSED)
            return read_file(real, self.roots, "uri", self.cap, REFUSED)
        except InvalidArgument as exc:
            if exc.message.startswith("larger than"):
                raise _over_cap(self.cap) from None
            raise Unreadable(exc.message) from None

    def _read_url(self, uri: str) -> bytes:
        if not self.roots.url(uri):
            raise Unreadable(REFUSED)
        if uri.split("://", 1)[0].lower() in HTTP_SCHEMES:
            return fetch(uri, self.hosts, "uri", max_bytes=self.cap, timeout_s=self.timeout_s, refused=REFUSED)
        try:
            return open_uri(uri, self.cap)
        except TooLarge:
            raise _over_cap(self.cap) from None
        except (OSError, ValueError, ImportError):
            raise Unreadable("could not be read from its store") from None


# --- folders ---


def _read_sidecar(access: SourceAccess, image: Path) -> dict[str, Any]:
    """The `.json` (preferred) or `.txt` next to an image (`a.png` -> `a.json` / `a.txt`, or `a.png.txt`);
    a sidecar that links out of the folder or is over the cap is ignored (with a warning)."""
    for kind, candidates in (
        ("json", (image.with_suffix(".json"), Path(f"{image}.json"))),
        ("txt", (image.with_suffix(".txt"), Path(f"{image}.txt"))),
    ):
        for candidate in candidates:
            if not candidate.is_file():
                continue
            try:
                real = access.confine(candidate)
                if real is None:
                    raise Unreadable(LINK_OUT)
                text = access.read(real).decode("utf-8", errors="strict" if kind == "json" else "replace")
                if kind == "txt":
                    return _metadata({"tags": text})
                meta = json.loads(text)
            except (Unreadable, json.JSONDecodeError, UnicodeDecodeError) as exc:
                log.warning("bad sidecar", extra={"path": str(candidate), "error": str(exc)})
                return _metadata({})
            return _metadata(meta if isinstance(meta, dict) else {"tags": meta})
    return _metadata({})


def read_folder(root: Path, settings: Settings | None = None) -> Iterator[SourceItem]:
    """Images under `root` (recursively, sorted by path) with their sidecar tag files. A link pointing out of
    `root` is not followed: it is reported unreadable."""
    access = SourceAccess(settings or Settings(), root, allow_more=False)
    images = (p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    for path in sorted(p for p in images if p.is_file() or p.is_symlink()):
        uri = str(path.absolute())
        try:
            real = access.confine(path)
            if real is None:
                raise Unreadable(LINK_OUT)
            data = access.read(real)
        except Unreadable as exc:
            yield SourceItem(uri=uri, data=b"", error=f"cannot read {uri}: {exc}")
            continue
        yield SourceItem(uri=uri, data=data, **_read_sidecar(access, path))


# --- manifests ---


def _manifest_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        for i, record in enumerate(pq.read_table(path).to_pylist()):
            yield i, record
        return
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidArgument("source", f"{path}:{i + 1}: not a JSON object: {exc.msg}") from None
            if not isinstance(record, dict):
                raise InvalidArgument("source", f"{path}:{i + 1}: not a JSON object")
            yield i, record


def read_manifest(path: Path, settings: Settings | None = None) -> Iterator[SourceItem]:
    """A JSONL or Parquet manifest: one record per image with `uri` (relative paths are relative to the manifest)
    and optional tags, characters, artist, category, source/source_site.

    A record may name a file under the manifest's folder (links and `..` resolved first) or under a folder or URL
    prefix of `PONY_INGEST_ALLOWED_ROOTS`; any other is reported unreadable with the same reason whether or not
    it exists."""
    access = SourceAccess(settings or Settings(), path.parent)
    for i, record in _manifest_records(path):
        uri = _text(record.get("uri") or record.get("path") or record.get("image"))
        if not uri:
            raise InvalidArgument("source", f"{path}: record {i} has no uri")
        shown = uri if "://" in uri or uri.startswith("/") else str((path.parent / uri).absolute())
        meta = _metadata(record)
        try:
            data = access.read(uri)
        except Unreadable as exc:
            yield SourceItem(uri=shown, data=b"", error=f"cannot read {shown}: {exc}", **meta)
            continue
        yield SourceItem(uri=shown, data=data, **meta)


# --- WebDataset shards ---


class _ShardTooLarge(Exception):
    """The shard decompresses past the cap, or holds one header record bigger than a member may be."""


class _BoundedStream:
    """A shard's decompressed bytes for `tarfile` (read/seek/tell) that refuses to go past `limit` bytes, or to
    hand out one read bigger than `max_read` (a pax or long-name header is read whole by tarfile)."""

    def __init__(self, inner: BinaryIO, limit: int, max_read: int) -> None:
        self._inner = inner
        self._limit = limit
        self._max_read = max_read

    def tell(self) -> int:
        return self._inner.tell()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence not in (os.SEEK_SET, os.SEEK_CUR):
            raise OSError("a shard stream cannot seek from its end")
        target = offset if whence == os.SEEK_SET else self.tell() + offset
        if target > self._limit:
            raise _ShardTooLarge(f"it decompresses to more than {self._limit} bytes (PONY_INGEST_MAX_SHARD_BYTES)")
        return self._inner.seek(target)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > self._max_read:
            raise _ShardTooLarge(f"it holds a record over the {self._max_read}-byte cap (PONY_INGEST_MAX_MEMBER_BYTES)")
        if self.tell() + size > self._limit:
            raise _ShardTooLarge(f"it decompresses to more than {self._limit} bytes (PONY_INGEST_MAX_SHARD_BYTES)")
        return self._inner.read(size)


def _decompressed(raw: BinaryIO) -> BinaryIO:
    """`raw` itself (a plain tar) or a decompressing reader, by the magic bytes."""
    head = raw.read(6)
    raw.seek(0)
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if head.startswith(b"BZh"):
        return bz2.BZ2File(raw, mode="rb")  # type: ignore[return-value]
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(raw, mode="rb")  # type: ignore[return-value]
    return raw


_KINDS = {
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO",
}


def _group_items(shard_uri: str, key: str, parts: dict[str, bytes]) -> Iterator[SourceItem]:
    """The image of one WebDataset key with its `.json` and/or `.txt` (tags) metadata, if it has an image."""
    image_ext = next((e for e in parts if f".{e}" in IMAGE_EXTENSIONS), None)
    if image_ext is None:
        return
    meta: dict[str, Any] = {}
    if "json" in parts:
        try:
            loaded = json.loads(parts["json"].decode("utf-8"))
            meta = loaded if isinstance(loaded, dict) else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = {}
    if "txt" in parts and not meta.get("tags"):
        meta["tags"] = parts["txt"].decode("utf-8", errors="replace")
    yield SourceItem(uri=f"{shard_uri}#{key}.{image_ext}", data=parts[image_ext], **_metadata(meta))


def read_shard(shard: Path, settings: Settings | None = None) -> Iterator[SourceItem]:
    """One WebDataset shard, streamed: members grouped by key (name up to the first dot of the base name; a key's
    members are consecutive, as WebDataset writes them), the image plus an optional `.json`/`.txt` per key.

    Only one key's members are held at a time. A member over `PONY_INGEST_MAX_MEMBER_BYTES` and a member that is
    no regular file (link, device) are reported unreadable and the shard goes on; past
    `PONY_INGEST_MAX_SHARD_BYTES` decompressed bytes the rest of the shard is reported unreadable.
    InvalidArgument("source") when it is not a readable tar archive."""
    s = settings or Settings()
    cap = s.ingest_max_member_bytes
    shard_uri = str(shard.absolute())
    key: str | None = None
    parts: dict[str, bytes] = {}
    try:
        with shard.open("rb") as raw, _decompressed(raw) as stream:
            bounded = _BoundedStream(stream, s.ingest_max_shard_bytes, max(cap, CHUNK_BYTES) + tarfile.BLOCKSIZE)
            with tarfile.open(fileobj=bounded, mode="r:") as tar:  # type: ignore[call-overload]
                while (member := tar.next()) is not None:
                    tar.members.clear()  # the members seen so far are not needed again: hold none
                    name = member.name
                    base = name.rsplit("/", 1)[-1]
                    if member.isdir():
                        continue
                    if not member.isfile():
                        kind = _KINDS.get(member.type, "not a regular file")
                        yield SourceItem(uri=f"{shard_uri}#{name}", data=b"", error=f"{kind}: skipped")
                        continue
                    if "." not in base or base.startswith("."):
                        continue
                    member_key = name[: len(name) - len(base)] + base.split(".", 1)[0]
                    ext = base.split(".", 1)[1].lower()
                    if member_key != key:
                        if key is not None:
                            yield from _group_items(shard_uri, key, parts)
                        key, parts = member_key, {}
                    try:
                        parts[ext] = _read_member(tar, member, cap)
                    except Unreadable as exc:
                        yield SourceItem(uri=f"{shard_uri}#{name}", data=b"", error=str(exc))
        if key is not None:
            yield from _group_items(shard_uri, key, parts)
    except _ShardTooLarge as exc:
        if key is not None:
            yield from _group_items(shard_uri, key, parts)
        yield SourceItem(uri=shard_uri, data=b"", error=f"the rest of the shard was not read: {exc}")
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(": ")
        raise InvalidArgument(
            "source", f"{shard}: not a readable tar shard ({reason}); re-create it or leave it out of the source"
        ) from None


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, cap: int) -> bytes:
    """A regular member's bytes, refused unread when its header says it is over `cap` and read in chunks."""
    if member.size > cap:
        raise _over_cap(cap)
    fh = tar.extractfile(member)
    if fh is None:
        raise Unreadable("not a regular file: skipped")
    with fh:
        try:
            return read_capped(fh, cap)  # type: ignore[arg-type]
        except TooLarge:
            raise _over_cap(cap) from None


def read_shards(shards: list[Path], settings: Settings | None = None) -> Iterator[SourceItem]:
    """WebDataset tar shards, one after another (see `read_shard`)."""
    for shard in shards:
        yield from read_shard(shard, settings)


# --- any source ---


def _folder_shards(folder: Path, shards: list[Path], settings: Settings | None) -> Iterator[SourceItem]:
    """A folder's shards; a shard that links out of the folder is reported unreadable, not read."""
    access = SourceAccess(settings or Settings(), folder, allow_more=False)
    for shard in shards:
        if access.confine(shard) is None:
            uri = str(shard.absolute())
            yield SourceItem(uri=uri, data=b"", error=f"cannot read {uri}: {LINK_OUT}")
            continue
        yield from read_shard(shard, settings)


def iter_source(source: str, settings: Settings | None = None) -> Iterator[SourceItem]:
    """Items of any supported source: a folder (images + sidecars, or only .tar shards), a manifest file,
    a .tar shard or a glob of shards. Raises InvalidArgument("source") when `source` is none of these.
    `settings` gives the caps and allow-list (the defaults when None)."""
    path = Path(source)
    if path.is_dir():
        has_images = any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.rglob("*") if p.is_file())
        shards = sorted(path.glob("*.tar"))
        if not has_images and shards:
            return _folder_shards(path, shards, settings)
        return read_folder(path, settings)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in MANIFEST_EXTENSIONS:
            return read_manifest(path, settings)
        if suffix == ".tar" or path.name.endswith((".tar.gz", ".tgz")):
            return read_shards([path], settings)
        raise InvalidArgument("source", f"{source}: not a folder, a .jsonl/.parquet manifest or a .tar shard")
    matches = sorted(Path(p) for p in glob.glob(source))
    if matches and all(p.name.endswith(".tar") for p in matches):
        return read_shards(matches, settings)
    raise InvalidArgument("source", f"{source}: no such folder, manifest or shard")
