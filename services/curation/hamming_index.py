"""Pairs of 64-bit hashes within a Hamming radius, found sub-quadratically (block-permutation index, as in Manku et
al.'s near-duplicate detection): cut the bits into B blocks; two hashes at most d bits apart agree on at least B - d
blocks, so every pair is found among hashes sharing one of the C(B, d) keys made of B - d blocks."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence

import numpy as np

_MULT = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing of a masked key to a bucket
_IDX_BITS = 26  # a bucket and a position are packed into one uint64 for sorting: up to 2**26 hashes at once
_MAX_TABLES = 2000
_MAX_BUCKET_BITS = 25  # a slot table of 2**25 int32 (128 MiB) at most
# Measured costs (ns) of one table's pass over one hash, of one candidate pair verified, of one brute-force pair.
_PASS_COST, _PAIR_COST, _BRUTE_COST = 40.0, 400.0, 15.0


class _PairSet:
    """Pairs (a, b) as packed uint64 keys, deduplicated as they come (each close pair is found by several tables)."""

    def __init__(self, width: int, *, ordered: bool) -> None:
        self.width = np.uint64(max(1, width))
        self.ordered = ordered  # False: (a, b) and (b, a) are one pair, kept as (min, max)
        self.done = np.zeros(0, dtype=np.uint64)
        self.pending: list[np.ndarray] = []
        self.size = 0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        if not len(a):
            return
        a, b = a.astype(np.uint64), b.astype(np.uint64)
        if not self.ordered:
            a, b = np.minimum(a, b), np.maximum(a, b)
        self.pending.append(a * self.width + b)
        self.size += len(a)
        if self.size > 4_000_000:
            self._compact()

    def _compact(self) -> None:
        self.done = np.unique(np.concatenate([self.done, *self.pending]))
        self.pending, self.size = [], 0

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        self._compact()
        return (self.done // self.width).astype(np.int64), (self.done % self.width).astype(np.int64)


def parse_hex(hashes: Sequence[str]) -> np.ndarray:
    """16-hex-digit hashes as uint64 (any other length is parsed one by one)."""
    if not hashes:
        return np.zeros(0, dtype=np.uint64)
    if all(len(h) == 16 for h in hashes):
        try:
            return np.frombuffer(bytes.fromhex("".join(hashes)), dtype=">u8").astype(np.uint64)
        except ValueError:
            pass
    return np.array([int(h, 16) for h in hashes], dtype=np.uint64)


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64."""
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return ((x * np.uint64(0x0101010101010101)) >> np.uint64(56)).astype(np.int64)


def key_masks(blocks: int, max_distance: int) -> list[np.uint64]:
    """The C(blocks, max_distance) masks, each covering blocks - max_distance of the blocks."""
    edges = [64 * b // blocks for b in range(blocks + 1)]
    block_masks = [((1 << (edges[b + 1] - edges[b])) - 1) << edges[b] for b in range(blocks)]
    return [
        np.uint64(sum(block_masks[b] for b in keep))
        for keep in itertools.combinations(range(blocks), blocks - max_distance)
    ]


def _cost(blocks: int, d: int, queries: int, indexed: int, pairs: float) -> float:
    tables = math.comb(blocks, d)
    key_bits = 64 * (blocks - d) / blocks
    return tables * ((queries + indexed) * _PASS_COST + pairs / 2.0**key_bits * _PAIR_COST)


def plan_blocks(max_distance: int, queries: int, indexed: int) -> int | None:
    """The block count with the least estimated work for `queries` hashes against `indexed` ones (indexed=0: all
    pairs among the queries), or None when comparing every pair is cheaper."""
    pairs = queries * indexed if indexed else queries * queries / 2
    best, best_cost = None, pairs * _BRUTE_COST
    for blocks in range(max_distance + 1, 65):
        if math.comb(blocks, max_distance) > _MAX_TABLES:
            break
        cost = _cost(blocks, max_distance, queries, indexed, pairs)
        if cost < best_cost:
            best, best_cost = blocks, cost
    return best


def _bucket(values: np.ndarray, mask: np.uint64, bits: int) -> np.ndarray:
    return (((values & mask) * _MULT) >> np.uint64(64 - bits)).view(np.int64)  # int64 indexes twice as fast


def _bucket_bits(n: int) -> int:
    return max(8, min(_MAX_BUCKET_BITS, math.ceil(math.log2(max(2, n))) + 2))


def _same_bucket_pairs(buckets: np.ndarray, positions: np.ndarray) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """Every pair of `positions` whose buckets are equal (each unordered pair once)."""
    packed = np.sort((buckets.view(np.uint64) << np.uint64(_IDX_BITS)) | positions.astype(np.uint64))
    keys = packed >> np.uint64(_IDX_BITS)
    order = (packed & np.uint64((1 << _IDX_BITS) - 1)).astype(np.int64)
    # Sorted, so equal buckets are runs: pair each element with the k-th next while runs are that long.
    for k in range(1, len(keys)):
        same = np.flatnonzero(keys[:-k] == keys[k:])
        if not len(same):
            break
        yield order[same], order[same + k]


def _colliding(buckets: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """Positions whose bucket is shared with another position (a scatter and a gather instead of a sort)."""
    positions = np.arange(len(buckets), dtype=np.int32)
    slots[buckets] = positions  # one writer wins per slot; every other writer of that slot is a loser
    losers = np.flatnonzero(slots[buckets] != positions)
    if not len(losers):
        return losers
    return np.union1d(losers, slots[buckets[losers]])


def pairs_within(hashes: np.ndarray, max_distance: int, *, blocks: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of positions (i < j, each once) of `hashes` at most `max_distance` bits apart. Distinct values are
    expected (equal values are the caller's exact duplicates)."""
    n = len(hashes)
    if n > 1 << _IDX_BITS:
        raise ValueError(f"at most {1 << _IDX_BITS} hashes at once")
    found = _PairSet(n, ordered=False)
    if blocks is None and n > 1:
        blocks = plan_blocks(max_distance, n, 0)
    if blocks is None:
        for a, b in _brute_force(hashes, hashes, max_distance, upper=True):
            found.add(a, b)
        return found.arrays()
    bits = _bucket_bits(n)
    slots = np.empty(1 << bits, dtype=np.int32)
    for mask in key_masks(blocks, max_distance):
        buckets = _bucket(hashes, mask, bits)
        candidates = _colliding(buckets, slots)
        for a, b in _same_bucket_pairs(buckets[candidates], candidates):
            close = popcount(hashes[a] ^ hashes[b]) <= max_distance
            found.add(a[close], b[close])
    return found.arrays()


def pairs_between(
    queries: np.ndarray, indexed: np.ndarray, max_distance: int, *, blocks: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (query position, indexed position) at most `max_distance` bits apart, each once."""
    found = _PairSet(len(indexed), ordered=True)
    if not len(queries) or not len(indexed):
        return found.arrays()
    if blocks is None:
        blocks = plan_blocks(max_distance, len(queries), len(indexed))
    if blocks is None:
        for a, b in _brute_force(queries, indexed, max_distance, upper=False):
            found.add(a, b)
        return found.arrays()
    bits = _bucket_bits(8 * len(queries))  # few false hits among the indexed hashes
    marks = np.full(1 << bits, -1, dtype=np.int32)
    for table, mask in enumerate(key_masks(blocks, max_distance)):
        q_buckets = _bucket(queries, mask, bits)
        marks[q_buckets] = table
        hits = np.flatnonzero(marks[_bucket(indexed, mask, bits)] == table)
        if not len(hits):
            continue
        order = np.argsort(q_buckets, kind="stable")
        sorted_q = q_buckets[order]
        h_buckets = _bucket(indexed[hits], mask, bits)
        lo = np.searchsorted(sorted_q, h_buckets, side="left")
        hi = np.searchsorted(sorted_q, h_buckets, side="right")
        counts = hi - lo
        rep = np.repeat(np.arange(len(hits)), counts)
        offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        q = order[lo[rep] + offsets]
        i = hits[rep]
        close = popcount(queries[q] ^ indexed[i]) <= max_distance
        found.add(q[close], i[close])
    return found.arrays()


def _brute_force(
    queries: np.ndarray, indexed: np.ndarray, max_distance: int, *, upper: bool, chunk: int = 256
) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """Every pair compared, a chunk of queries at a time (`upper`: queries is indexed, pairs with i < j only)."""
    for start in range(0, len(queries), chunk):
        block = queries[start : start + chunk]
        close = popcount(block[:, None] ^ indexed[None, :]) <= max_distance
        if upper:
            close &= np.arange(start, start + len(block))[:, None] < np.arange(len(indexed))[None, :]
        a, b = np.nonzero(close)
        yield a + start, b
