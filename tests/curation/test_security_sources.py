"""What an ingest source may make the curation tier read, and where an export may write: a manifest reads only under
its own folder (or allow-listed roots and URL prefixes), a folder's links out are not followed, shard members are
capped and read in bounded memory, and a hostile id in the catalog never leads a write outside the export folder."""

from __future__ import annotations

import http.server
import io
import json
import tarfile
import threading
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image

from pony_common.blobs import BlobStore
from pony_common.catalog.db import catalog_for, upsert
from pony_common.catalog.models import ImageRow
from pony_common.config import Settings
from services.curation.export import export_selection
from services.curation.ingest import store_items
from services.curation.sources import iter_source
from services.curation.store import SelectionRow

MIB = 2**20


def _png(color: tuple[int, int, int], size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def _blobs(settings: Settings) -> dict[str, bytes]:
    store = BlobStore(settings.blob_url)
    return {key: store.get(key) for key in store.list("images")}


@dataclass
class ImageServer:
    port: int
    image: bytes
    paths: list[str] = field(default_factory=list)


@pytest.fixture
def image_server() -> Iterator[ImageServer]:
    """A loopback HTTP server: /img.png answers an image, /redirect sends to localhost (another host name)."""
    served = ImageServer(port=0, image=_png((10, 20, 30)))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            served.paths.append(self.path)
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", f"http://localhost:{served.port}/img.png")
                self.end_headers()
                return
            body = served.image if self.path == "/img.png" else b""
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    served.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _manifest(folder: Path, uris: list[str]) -> Path:
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps({"uri": u, "tags": "t"}) + "\n" for u in uris))
    return path


def test_a_manifest_reads_nothing_outside_its_folder_and_tells_nothing_of_it(
    settings: Settings, tmp_path: Path, image_server: ImageServer
) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    good = _png((1, 2, 3))
    (src / "ok.png").write_bytes(good)
    (tmp_path / "outside.png").write_bytes(_png((4, 5, 6)))
    (src / "link.png").symlink_to("/etc/passwd")
    (src / "dangling.png").symlink_to("/etc/pony-no-such-file")
    (src / "sub" / "up").symlink_to(tmp_path)
    port = image_server.port
    # Pairs: a place outside that exists, and one that does not; both must read the same.
    refused = [
        "/etc/passwd",
        "/etc/pony-no-such-file",
        "../outside.png",
        "../pony-missing.png",
        "sub/../../outside.png",
        "sub/../../pony-missing.png",
        "file:///etc/hostname",
        "file:///etc/pony-no-such-file",
        "link.png",
        "dangling.png",
        "sub/up/outside.png",
        "sub/up/pony-missing.png",
        f"http://127.0.0.1:{port}/img.png",
        f"http://127.0.0.1:{port}/missing.png",
        "s3://bucket/x.png",
    ]
    manifest = _manifest(src, ["ok.png", *refused])

    items = list(iter_source(str(manifest), settings))
    assert items[0].error is None and items[0].data == good
    reasons = {item.error.replace(item.uri, "<uri>") for item in items[1:] if item.error}
    assert all(item.data == b"" for item in items[1:])
    assert len(reasons) == 1, reasons  # one reason for all: nothing tells what exists outside
    (reason,) = reasons
    assert reason.startswith("cannot read <uri>: not under the manifest's folder")
    assert "PONY_INGEST_ALLOWED_ROOTS" in reason

    summary = store_items(settings, iter_source(str(manifest), settings))
    assert summary.new == 1 and len(summary.unreadable) == len(refused)
    assert list(_blobs(settings).values()) == [good]
    assert image_server.paths == []  # the URL was refused before any request


def test_allowed_roots_admit_more_folders_and_url_prefixes_but_no_redirect_off_them(
    settings: Settings, tmp_path: Path, image_server: ImageServer
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "a.png").write_bytes(_png((7, 7, 7)))
    base = f"http://127.0.0.1:{image_server.port}"
    manifest = _manifest(src, [str(extra / "a.png"), f"{base}/img.png", f"{base}/redirect", "/etc/passwd"])
    allowed = settings.replace(ingest_allowed_roots=(str(extra), f"{base}/"))

    items = list(iter_source(str(manifest), allowed))
    assert [item.data for item in items[:2]] == [(extra / "a.png").read_bytes(), image_server.image]
    assert "PONY_INGEST_ALLOWED_ROOTS" in (items[2].error or "")  # the redirect leads to another host
    assert "PONY_INGEST_ALLOWED_ROOTS" in (items[3].error or "")
    assert image_server.paths == ["/img.png", "/redirect"]
    # Without the setting, the same records are refused.
    assert all(item.error for item in iter_source(str(manifest), settings))


def test_a_folder_source_does_not_follow_links_out_of_the_folder(settings: Settings, tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    pool.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "c.png").write_bytes(_png((3, 3, 3)))
    png = _png((9, 8, 7))
    (pool / "a.png").write_bytes(png)
    (pool / "a.txt").symlink_to("/etc/passwd")  # a sidecar linking out gives no tags
    (pool / "b.png").symlink_to(pool / "a.png")  # a link inside the folder is fine
    (pool / "passwd.png").symlink_to("/etc/passwd")
    (pool / "linked").symlink_to(elsewhere)  # a linked folder is not walked

    items = {Path(item.uri).name: item for item in iter_source(str(pool), settings)}
    assert set(items) == {"a.png", "b.png", "passwd.png"}
    assert items["a.png"].data == png and items["a.png"].tags == []
    assert items["b.png"].data == png
    assert items["passwd.png"].data == b""
    assert (items["passwd.png"].error or "").endswith("a link out of the source folder: not followed")

    summary = store_items(settings, iter_source(str(pool), settings))
    assert summary.ids and len(summary.unreadable) == 1
    assert list(_blobs(settings).values()) == [png]


def test_a_folder_of_shards_does_not_read_a_shard_linking_out(settings: Settings, tmp_path: Path) -> None:
    inside, outside = _png((1, 0, 0)), _png((0, 1, 0))
    for path, data in ((tmp_path / "outside.tar", outside), (tmp_path / "shards" / "shard-0.tar", inside)):
        path.parent.mkdir(exist_ok=True)
        with tarfile.open(path, "w") as tar:
            _member(tar, "k.png", data)
    (tmp_path / "shards" / "shard-1.tar").symlink_to(tmp_path / "outside.tar")

    items = list(iter_source(str(tmp_path / "shards"), settings))
    assert [i.data for i in items] == [inside, b""]
    assert (items[1].error or "").endswith("a link out of the source folder: not followed")


class _Zeros:
    """A file object of `size` zero bytes, handed out in the pieces asked for (never whole)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return bytes(n)


def _member(tar: tarfile.TarFile, name: str, data: bytes = b"", **attrs: object) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if data else None)


def test_a_shard_member_over_the_cap_is_skipped_in_bounded_memory_and_the_rest_ingested(
    settings: Settings, tmp_path: Path
) -> None:
    big = 200 * MIB
    shard = tmp_path / "shard-000000.tar.gz"
    first, second = _png((1, 1, 1)), _png((2, 2, 2))
    with tarfile.open(shard, "w:gz", compresslevel=9) as tar:  # zeros compress ~1000:1: a ~200 KB file
        _member(tar, "k1.png", first)
        _member(tar, "k1.json", json.dumps({"tags": ["first"]}).encode())
        info = tarfile.TarInfo("bomb.png")
        info.size = big
        tar.addfile(info, _Zeros(big))  # written streamed, never held whole
        _member(tar, "evil.png", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        _member(tar, "hard.png", type=tarfile.LNKTYPE, linkname="k1.png")
        _member(tar, "dev.png", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        _member(tar, "k2.png", second)
        _member(tar, "k2.txt", b"second, tag")
    assert shard.stat().st_size < 2 * MIB
    capped = settings.replace(ingest_max_member_bytes=MIB)
    store_items(capped, [])  # the catalog is created before memory is measured

    tracemalloc.start()
    try:
        summary = store_items(capped, iter_source(str(shard), capped))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    print(f"ingest peak traced memory {peak / MIB:.1f} MiB (member {big // MIB} MiB, cap 1 MiB)")
    assert peak < 32 * MIB, f"peak {peak / MIB:.1f} MiB while skipping a {big // MIB} MiB member"
    uri = str(shard.absolute())
    assert summary.unreadable == {
        f"{uri}#bomb.png": f"larger than {MIB} bytes (PONY_INGEST_MAX_MEMBER_BYTES)",
        f"{uri}#evil.png": "a symbolic link: skipped",
        f"{uri}#hard.png": "a hard link: skipped",
        f"{uri}#dev.png": "a character device: skipped",
    }
    assert [i.uri.rsplit("#", 1)[1] for i in summary.images] == ["k1.png", "k2.png"]
    assert sorted(_blobs(capped).values()) == sorted([first, second])
    with catalog_for(capped.database_url).session() as s:
        assert sorted(r.tags for r in s.query(ImageRow)) == [["first"], ["second", "tag"]]


def test_a_shard_stops_at_its_decompressed_byte_cap_and_reports_the_rest(settings: Settings, tmp_path: Path) -> None:
    shard = tmp_path / "shard.tar"
    images = [_png((i, i, i), size=64) for i in range(3)]
    with tarfile.open(shard, "w") as tar:
        for i, data in enumerate(images):
            _member(tar, f"k{i}.png", data)
    first_member = tarfile.BLOCKSIZE + -(-len(images[0]) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    cap = first_member + tarfile.BLOCKSIZE + 16  # the first member and the second's header, not its data
    items = list(iter_source(str(shard), settings.replace(ingest_max_shard_bytes=cap)))
    assert [i.data for i in items[:1]] == images[:1]
    assert items[1].uri == str(shard.absolute()) and len(items) == 2
    assert "PONY_INGEST_MAX_SHARD_BYTES" in (items[1].error or "")

    # A header that claims a terabyte: the member is refused unread and the shard stops at the cap, no crash.
    liar = tmp_path / "liar.tar"
    with tarfile.open(liar, "w") as tar:
        _member(tar, "k0.png", images[0])
    raw = bytearray(liar.read_bytes())
    header = tarfile.TarInfo("huge.png")
    header.size = 10**12
    raw[1024:1024] = header.tobuf()  # after k0's header block and its one data block
    liar.write_bytes(bytes(raw))
    items = list(iter_source(str(liar), settings))
    assert items[0].data == images[0]
    assert "PONY_INGEST_MAX_MEMBER_BYTES" in (items[1].error or "")
    assert "PONY_INGEST_MAX_SHARD_BYTES" in (items[2].error or "")


def test_an_export_skips_a_hostile_catalog_id_and_writes_nothing_outside_its_folder(
    settings: Settings, tmp_path: Path
) -> None:
    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "a.png").write_bytes(_png((5, 6, 7)))
    summary = store_items(settings, iter_source(str(pool), settings))
    (good,) = summary.ids
    catalog = catalog_for(settings.database_url)
    with catalog.session() as s:
        key = s.get(ImageRow, good).blob_key
    hostile = {
        "../../x": key,  # a real blob under a path-like id
        "a" * 64: "images/aa/x.png/../../../../../escape",  # a good id with a key whose "extension" climbs out
        "B" * 64: key,  # upper-case: no content hash this platform writes
    }
    with catalog.session() as s:
        rows = [{"id": i, "blob_key": k, "status": "done", "tags": [], "characters": []} for i, k in hostile.items()]
        upsert(s, ImageRow, rows, keys=("id",))
        s.add_all(
            SelectionRow(name="default", image_id=i, rank=n, category="other") for n, i in enumerate([*hostile, good])
        )
    out = tmp_path / "deep" / "export"
    (out / "images").mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (out / "images" / f"{good}.png").symlink_to(victim)  # links planted in DIR are replaced, not written through
    (out / "manifest.parquet").symlink_to(tmp_path / "planted.parquet")
    before = {p for p in tmp_path.rglob("*")}

    result = export_selection(settings, out, webdataset=True, assign_missing_styles=False)

    created = {p for p in tmp_path.rglob("*")} - before
    assert created and all(p == out or p.is_relative_to(out) for p in created), sorted(created)
    assert result.rows == 1 and sorted(result.skipped) == sorted(repr(i) for i in hostile)
    assert all("content hash" in r or "extension" in r for r in result.skipped.values())
    assert not (tmp_path / "deep" / "x.png").exists() and not (tmp_path / "planted.parquet").exists()
    assert victim.read_text() == "keep" and not (out / "images" / f"{good}.png").is_symlink()
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == sorted([f"{good}.png", f"{good}.txt", "metadata.jsonl"])  # the image, its caption, imagefolder
    with tarfile.open(result.shards[0]) as tar:
        assert sorted(tar.getnames()) == sorted(f"{good}.{ext}" for ext in ("png", "json", "txt"))
