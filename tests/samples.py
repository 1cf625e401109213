"""Test inputs and probes shared by the service tests: a readiness probe and test images (good ones and the bad
kinds a caller may send). Servers are started with `pony_common.testing.serve` / `ServerLoop`."""

from __future__ import annotations

import io
import struct
import zlib

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image


def readiness(channel: grpc.Channel) -> int:
    """The readiness status of the server behind `channel`."""
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=10).status


SERVING = health_pb2.HealthCheckResponse.SERVING


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (40, 32), noise_seed: int | None = None) -> bytes:
    """A small PNG: a flat colour, or seeded noise when `noise_seed` is given."""
    if noise_seed is None:
        img = Image.new("RGB", size, color)
    else:
        import numpy as np

        rng = np.random.default_rng(noise_seed)
        img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A PNG whose header declares width x height pixels (2.5 gigapixels by default) in a few dozen bytes."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


RANDOM_BYTES = bytes(range(256)) * 4
