"""The access policy: what a caller can make a service read, in one place.

An image reference is a blob key (or inline bytes); a local path or a URL only under a folder or on a host that
settings allow-list (`PONY_IMAGE_ROOTS`, `PONY_IMAGE_HOSTS`), read with a byte cap and a timeout, redirects followed
only to allowed hosts, paths checked after symlinks and `..` are resolved. `LoadVersion` and training specs use the
same confinement with their own roots. A refusal reads the same whether or not the thing exists, so an error never
tells a caller what lies outside the allowed places.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import socket
import stat
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

from pony_common.blobs import CHUNK_BYTES, BlobStore, TooLarge, read_capped
from pony_common.config import ConfigError, Settings
from pony_common.errors import InvalidArgument

MAX_REDIRECTS = 5
MAX_KEY_CHARS = 1024
MAX_URI_CHARS = 4096
HTTP_SCHEMES = ("http", "https")
REDIRECTS = (301, 302, 303, 307, 308)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_CONTROL = re.compile(r"[\x00-\x20\x7f\\]")
# A container image reference as Docker writes it (registry[:port]/path[:tag][@digest]), nothing else.
_IMAGE_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:-]{0,254}(?:@[A-Za-z0-9_+.-]+:[0-9a-fA-F]{32,})?")

IMAGE_REFUSED = (
    "not an allowed image location: send the bytes or a blob key; a path or URL must be under PONY_IMAGE_ROOTS or "
    "on PONY_IMAGE_HOSTS"
)
MODEL_REFUSED = (
    "not an allowed model location: name a pipeline folder under models_dir or the trainer's runs folder, or add "
    "its root to PONY_SAMPLER_MODEL_ROOTS"
)


# --- where things live by default ---


def runs_root(settings: Settings) -> str:
    """The folder training runs write into: `PONY_TRAINER_OUTPUT_DIR`, else `<state_dir>/runs`."""
    return settings.trainer.output_dir or str(Path(settings.state_dir) / "runs")


def export_root(settings: Settings) -> str:
    """Where the demo (and by convention `ponyctl export`) writes training manifests: `<state_dir>/export`."""
    return str(Path(settings.state_dir) / "export")


# --- roots: folders and URL prefixes ---


def _scheme(value: str) -> str:
    m = _SCHEME.match(value)
    return m.group(1).lower() if m else ""


def _under(real: str, folder: str) -> bool:
    return real == folder or real.startswith(folder.rstrip("/") + "/")


def _local_path(value: str) -> str | None:
    """The absolute local path `value` names (`/x` or `file:///x`), else None (relative, another scheme, NUL)."""
    if "\x00" in value:
        return None
    if _scheme(value) == "file":
        value = value[len("file:") :]
        if not value.startswith("///"):
            return None  # file:relative, file:/x or file://host/x
        value = value[2:]
    elif _scheme(value):
        return None
    return value if value.startswith("/") else None


@dataclass(frozen=True)
class _Prefix:
    scheme: str
    netloc: str
    path: str


class Roots:
    """Folders and URL prefixes a value may be under. A path matches when its real path (symlinks and `..` resolved)
    is a folder or inside one; a URL matches a prefix (`s3://bucket/exports`) of its scheme and host when its path
    is under the prefix's and has no `.`/`..` segment. Relative paths match nothing."""

    def __init__(self, entries: Iterable[str], *, urls: bool = True, setting: str = "") -> None:
        self.folders: list[str] = []
        self.prefixes: list[_Prefix] = []
        for entry in (e.strip() for e in entries):
            if not entry:
                continue
            scheme = _scheme(entry)
            if scheme and scheme != "file":
                if not urls:
                    raise ConfigError(f"{setting}: {entry!r} is not a folder; name local folders only")
                parts = urlsplit(entry)
                self.prefixes.append(_Prefix(scheme, parts.netloc.lower(), parts.path.rstrip("/")))
            else:
                local = _local_path(entry) or os.path.abspath(os.path.expanduser(entry))
                self.folders.append(os.path.realpath(local))

    def path(self, value: str) -> str | None:
        """The real path of `value` (absolute or `file:///`) when it lies under a folder, else None."""
        local = _local_path(value)
        if local is None:
            return None
        real = os.path.realpath(local)
        return real if any(_under(real, folder) for folder in self.folders) else None

    def url(self, value: str) -> bool:
        if _CONTROL.search(value) or "::" in value:  # `::` chains fsspec filesystems: `s3://b/x::file:///etc`
            return False
        parts = urlsplit(value)
        if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
            return False
        if any(unquote(segment) in (".", "..") for segment in parts.path.split("/")):
            return False
        scheme, netloc, path = parts.scheme.lower(), parts.netloc.lower(), parts.path.rstrip("/")
        return any(
            p.scheme == scheme and p.netloc == netloc and (path == p.path or path.startswith(p.path + "/"))
            for p in self.prefixes
        )

    def confine(self, value: str) -> str | None:
        """`value` as it may be used (a path's real path, a URL as given) when allowed, else None."""
        scheme = _scheme(value)
        if scheme and scheme != "file":
            return value if self.url(value) else None
        return self.path(value)


def model_roots(settings: Settings) -> Roots:
    """Where `LoadVersion` may load a pipeline from: models_dir, the runs folder, `PONY_SAMPLER_MODEL_ROOTS`."""
    return Roots([settings.models_dir, runs_root(settings), *settings.sampler.model_roots])


def confine_model_uri(settings: Settings, uri: str, field: str = "uri") -> str:
    """`uri` (stripped) when it names a place under the model roots; InvalidArgument(field) otherwise, the same
    message whether or not it exists."""
    uri = uri.strip()
    if not uri:
        raise InvalidArgument(field, "must name a diffusers AuraFlowPipeline folder")
    if len(uri) > MAX_URI_CHARS or model_roots(settings).confine(uri) is None:
        raise InvalidArgument(field, MODEL_REFUSED)
    return uri


# --- hosts ---


@dataclass(frozen=True)
class _Target:
    https: bool
    host: str
    port: int
    path: str


class Hosts:
    """http(s) hosts a URL may be fetched from: `host` (any port), `host:port`, or `*.domain` (its subdomains)."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.rules: list[tuple[str, int | None]] = []
        for entry in (e.strip().lower() for e in entries):
            if not entry:
                continue
            wildcard = entry.startswith("*.")
            try:
                parts = urlsplit("//" + (entry[2:] if wildcard else entry))
                host, port = parts.hostname, parts.port
            except ValueError:
                host = None
            if not host or parts.path or parts.username:
                raise ConfigError(f"PONY_IMAGE_HOSTS: {entry!r} is not a host, host:port or *.domain")
            self.rules.append(("." + host if wildcard else host, port))

    def target(self, url: str) -> _Target | None:
        """Where to connect for `url` when its scheme is http(s) and its host is allowed, else None."""
        if len(url) > MAX_URI_CHARS or _CONTROL.search(url):
            return None
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            return None
        scheme, host = parts.scheme.lower(), parts.hostname
        if scheme not in HTTP_SCHEMES or not host or parts.username is not None or parts.password is not None:
            return None
        port = port or (443 if scheme == "https" else 80)
        for rule, rule_port in self.rules:
            matches = host.endswith(rule) if rule.startswith(".") else host == rule
            if matches and rule_port in (None, port):
                path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
                return _Target(scheme == "https", host, port, path)
        return None


# --- reading ---


def _too_large(field: str, max_bytes: int) -> InvalidArgument:
    return InvalidArgument(field, f"larger than {max_bytes} bytes (PONY_IMAGE_MAX_BYTES)")


def read_file(real: str, roots: Roots, field: str, max_bytes: int, refused: str) -> bytes:
    """A regular file at `real` (already confined by `roots`), at most `max_bytes`. The open file is checked again
    (a symlink swapped in after the check is refused), and FIFOs and devices are not read."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except FileNotFoundError:
        raise InvalidArgument(field, "no such file under the allowed roots") from None
    except OSError:
        raise InvalidArgument(field, "the file could not be opened") from None
    try:
        opened = f"/proc/self/fd/{fd}"
        if os.path.exists(opened) and roots.path(os.readlink(opened)) is None:
            raise InvalidArgument(field, refused)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidArgument(field, "not a regular file")
        if info.st_size > max_bytes:
            raise _too_large(field, max_bytes)
        with os.fdopen(fd, "rb") as fh:
            fd = -1
            return read_capped(fh, max_bytes)
    except TooLarge:
        raise _too_large(field, max_bytes) from None
    except OSError:
        raise InvalidArgument(field, "the file could not be read") from None
    finally:
        if fd >= 0:
            os.close(fd)


def fetch(url: str, hosts: Hosts, field: str, *, max_bytes: int, timeout_s: float, refused: str) -> bytes:
    """GETs `url` from an allowed host: streamed, stopped past `max_bytes`, the whole read within `timeout_s`,
    redirects followed (at most MAX_REDIRECTS) only to allowed hosts. Every failure is InvalidArgument(field)."""
    deadline = time.monotonic() + timeout_s

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise InvalidArgument(field, f"not read within {timeout_s:g} s (PONY_IMAGE_FETCH_TIMEOUT_S)")
        return left

    def late() -> InvalidArgument:
        return InvalidArgument(field, f"not read within {timeout_s:g} s (PONY_IMAGE_FETCH_TIMEOUT_S)")

    for _ in range(MAX_REDIRECTS + 1):
        target = hosts.target(url)
        if target is None:
            raise InvalidArgument(field, refused)
        kind = http.client.HTTPSConnection if target.https else http.client.HTTPConnection
        conn = kind(target.host, target.port, timeout=remaining())
        resp: http.client.HTTPResponse | None = None
        # A socket timeout bounds each recv, not the read: a host dripping header lines or body bytes would hold
        # the call past the deadline. At the deadline the watchdog cuts the socket, and what was read is refused.
        expired = threading.Event()
        watchdog = threading.Timer(remaining(), _cut, (conn, expired))
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.request("GET", target.path, headers={"Accept": "image/*", "Accept-Encoding": "identity"})
            if expired.is_set():
                raise late()
            resp = conn.getresponse()
            if resp.status in REDIRECTS:
                location = resp.getheader("Location", "")
                if not location:
                    raise InvalidArgument(field, f"the image host answered HTTP {resp.status} without a Location")
                url = urljoin(url, location)
                continue
            if resp.status != 200:
                raise InvalidArgument(field, f"the image host answered HTTP {resp.status}")
            length = resp.getheader("Content-Length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise _too_large(field, max_bytes)
            chunks: list[bytes] = []
            size = 0
            while True:
                if conn.sock is not None:
                    conn.sock.settimeout(remaining())
                chunk = resp.read(min(CHUNK_BYTES, max_bytes + 1 - size))
                if expired.is_set():
                    raise late()
                if not chunk:
                    return b"".join(chunks)
                size += len(chunk)
                if size > max_bytes:
                    raise _too_large(field, max_bytes)
                chunks.append(chunk)
        except TimeoutError:
            raise late() from None
        except (OSError, http.client.HTTPException, ValueError):
            if expired.is_set():
                raise late() from None
            raise InvalidArgument(field, "the image could not be fetched from its host") from None
        finally:
            watchdog.cancel()
            # The response holds its own reference to the socket: close both, or the host keeps sending into it.
            if resp is not None:
                resp.close()
            conn.close()
    raise InvalidArgument(field, f"more than {MAX_REDIRECTS} redirects")


def _cut(conn: http.client.HTTPConnection, expired: threading.Event) -> None:
    """The fetch deadline passed: mark it, then shut the connection's socket so a blocked read returns at once."""
    expired.set()
    sock = conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def check_blob_key(key: str, field: str) -> str:
    """`key` when it is a blob key (relative, no `.`/`..`/empty segment, no scheme, no control characters);
    InvalidArgument(field) otherwise."""
    if not key:
        raise InvalidArgument(field, "is empty")
    if len(key) > MAX_KEY_CHARS:
        raise InvalidArgument(field, f"a blob key has at most {MAX_KEY_CHARS} characters")
    segments = key.split("/")
    if _CONTROL.search(key) or ":" in key or any(s in ("", ".", "..") for s in segments):
        raise InvalidArgument(field, IMAGE_REFUSED)
    return key


class ImageAccess:
    """Reads what an `ImageRef.uri` names under the policy: a blob key from the blob store; a path (or file:///)
    under `PONY_IMAGE_ROOTS`; an http(s) URL on `PONY_IMAGE_HOSTS`; anything else refused. All capped at
    `PONY_IMAGE_MAX_BYTES`; every error is InvalidArgument naming `field`."""

    def __init__(self, settings: Settings, blobs: BlobStore | None = None) -> None:
        self.blobs = blobs if blobs is not None else BlobStore(settings.blob_url)
        self.roots = Roots(settings.image_roots, urls=False, setting="PONY_IMAGE_ROOTS")
        self.hosts = Hosts(settings.image_hosts)
        self.max_bytes = settings.image_max_bytes
        self.timeout_s = settings.image_fetch_timeout_s

    def read(self, uri: str, field: str) -> bytes:
        scheme = _scheme(uri)
        if scheme in HTTP_SCHEMES:
            return fetch(
                uri, self.hosts, field, max_bytes=self.max_bytes, timeout_s=self.timeout_s, refused=IMAGE_REFUSED
            )
        if scheme == "file" or uri.startswith("/"):
            real = self.roots.path(uri) if len(uri) <= MAX_URI_CHARS else None
            if real is None:
                raise InvalidArgument(field, IMAGE_REFUSED)
            return read_file(real, self.roots, field, self.max_bytes, IMAGE_REFUSED)
        key = check_blob_key(uri, field)
        try:
            return self.blobs.get(key, self.max_bytes)
        except FileNotFoundError:
            raise InvalidArgument(field, "no such blob key in the blob store") from None
        except TooLarge:
            raise _too_large(field, self.max_bytes) from None
        except (OSError, ValueError):
            raise InvalidArgument(field, "the blob could not be read") from None


# --- container images ---


def _image_name(reference: str) -> str | None:
    """`registry/path` of an image reference, tag and digest dropped, Docker Hub's implied registry written out;
    None when it is not a plain image reference."""
    if not _IMAGE_REF.fullmatch(reference) or "//" in reference or ".." in reference:
        return None
    name = reference.split("@", 1)[0]
    slash, colon = name.rfind("/"), name.rfind(":")
    if colon > slash:
        name = name[:colon]
    return _with_registry(name)


def _with_registry(name: str) -> str:
    first, _, rest = name.partition("/")
    if not rest:
        return f"docker.io/library/{name}"
    if "." in first or ":" in first or first == "localhost":
        return name
    return f"docker.io/{name}"


def _registry_prefix(entry: str) -> str:
    """`ghcr.io`, `ghcr.io/org` as they are; `org` (a Docker Hub namespace) as `docker.io/org`."""
    first = entry.split("/", 1)[0]
    return entry if "." in first or ":" in first or first == "localhost" else f"docker.io/{entry}"


def allowed_registries(registries: Sequence[str], default_image: str) -> list[str]:
    """The registry prefixes images may come from: `registries`, or the registry and namespace of `default_image`."""
    if registries:
        return [_registry_prefix(r.strip().rstrip("/")) for r in registries if r.strip()]
    name = _image_name(default_image)
    return [name.rsplit("/", 1)[0]] if name else []


def image_allowed(reference: str, registries: Sequence[str]) -> bool:
    """True when `reference` is an image reference under one of the registry prefixes."""
    name = _image_name(reference)
    return name is not None and any(name.startswith(prefix + "/") for prefix in registries)
