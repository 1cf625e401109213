"""Near-duplicate grouping at scale (issue 14): the block-permutation index against the old quadratic grouping.

Synthetic 64-bit pHashes with planted near-duplicates (every 10th hash gets a copy 0..6 bits off, every 100th an
exact copy). For each size, seconds of the new grouping (`component_labels`, the core of `regroup`) and of the old
one (`tests/curation/dedup_reference.py`, run in a subprocess killed at --cap seconds), side by side, with a check
that both give the same groups where the old one finished; then 1M and 10M with the new one alone, and incremental
dedup (10k new hashes matched into the indexed ones, the core of `dedup_new`).

    .venv/bin/python bench/dedup_scale.py            # reference at 10k/50k/100k, new at those + 1M + 10M
    .venv/bin/python bench/dedup_scale.py --quick    # reference at 10k/20k, new at those + 200k, incremental into 200k
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.curation.duplicates import DEFAULT_MAX_DISTANCE, _UnionFind, component_labels
from services.curation.hamming_index import pairs_between, pairs_within, plan_blocks


def synthetic_hashes(n: int, seed: int, max_flips: int = DEFAULT_MAX_DISTANCE) -> np.ndarray:
    """n uint64 hashes: ~89% random, ~10% near copies of one of them, ~1% exact copies (shuffled)."""
    rng = np.random.default_rng(seed)
    base_n = n - n // 10 - n // 100
    base = rng.integers(0, 2**64, base_n, dtype=np.uint64)
    sources = base[rng.integers(0, base_n, n // 10)]
    flips = np.zeros(len(sources), dtype=np.uint64)
    for _ in range(max_flips):
        bits = rng.integers(0, 64, len(sources)).astype(np.uint64)
        flips ^= np.where(rng.random(len(sources)) < 0.5, np.uint64(1) << bits, np.uint64(0))
    exact = base[rng.integers(0, base_n, n // 100)]
    out = np.concatenate([base, sources ^ flips, exact])
    rng.shuffle(out)
    return out


def ids_of(n: int) -> list[str]:
    return [f"img{i:09d}" for i in range(n)]


def groups_from_labels(labels: np.ndarray) -> dict[str, str]:
    ids = ids_of(len(labels))
    return {ids[i]: ids[labels[i]] for i in np.flatnonzero(labels >= 0).tolist()}


def _reference_worker(values: np.ndarray, queue: mp.Queue) -> None:
    from tests.curation.dedup_reference import reference_group_hashes

    ids = ids_of(len(values))
    start = time.perf_counter()
    groups = reference_group_hashes({i: f"{int(v):016x}" for i, v in zip(ids, values.tolist(), strict=True)})
    queue.put((time.perf_counter() - start, groups))


def run_reference(values: np.ndarray, cap_s: float) -> tuple[float | None, dict[str, str] | None]:
    """Seconds of the old grouping on `values` (None when it did not finish within cap_s) and its groups."""
    ctx = mp.get_context("fork")
    queue: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_reference_worker, args=(values, queue))
    proc.start()
    try:
        seconds, groups = queue.get(timeout=cap_s)
    except Exception:  # queue.Empty: past the cap
        return None, None
    finally:
        proc.kill()
        proc.join()
    return seconds, groups


def time_new(values: np.ndarray) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    labels = component_labels(values)
    return time.perf_counter() - start, labels


def time_incremental(indexed: np.ndarray, new: np.ndarray) -> tuple[float, int]:
    """Seconds to match `new` hashes against each other and the indexed ones and union the hits (the in-memory
    part of `dedup_new`), and how many pairs it found."""
    start = time.perf_counter()
    new_uniq = np.unique(new)
    indexed_uniq = np.unique(indexed)
    uf = _UnionFind()
    a, b = pairs_within(new_uniq, DEFAULT_MAX_DISTANCE)
    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        uf.union(("n", x), ("n", y))
    q, i = pairs_between(new_uniq, indexed_uniq, DEFAULT_MAX_DISTANCE)
    for x, y in zip(q.tolist(), i.tolist(), strict=True):
        uf.union(("n", x), ("i", y))
    return time.perf_counter() - start, len(a) + len(q)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes only (about a minute)")
    parser.add_argument("--cap", type=float, default=None, help="seconds the old grouping may run per size")
    parser.add_argument("--skip-10m", action="store_true", help="leave out the 10M run")
    args = parser.parse_args()
    if args.quick:
        compared, alone, incremental, cap = [10_000, 20_000], [200_000], [(200_000, 10_000)], args.cap or 60.0
    else:
        compared, alone, cap = [10_000, 50_000, 100_000], [1_000_000, 10_000_000], args.cap or 300.0
        incremental = [(1_000_000, 10_000), (10_000_000, 10_000)]
        if args.skip_10m:
            alone, incremental = alone[:1], incremental[:1]
    d = DEFAULT_MAX_DISTANCE
    print(f"near-duplicate grouping, max distance {d} bits, synthetic 64-bit pHashes (10% near copies, 1% exact)")
    print(f"{'hashes':>11} {'old s':>9} {'new s':>8} {'speed-up':>9} {'grouped':>9} {'same groups':>12} {'blocks':>7}")
    for n in compared:
        values = synthetic_hashes(n, seed=n)
        new_s, labels = time_new(values)
        old_s, old_groups = run_reference(values, cap)
        same = "yes" if old_groups == groups_from_labels(labels) else "NO"
        blocks = plan_blocks(d, len(np.unique(values)), 0)
        if old_s is None:
            print(
                f"{n:>11,} {'>' + format(cap, '.0f'):>9} {new_s:>8.2f} {'>' + format(cap / new_s, '.0f') + 'x':>9} "
                f"{int((labels >= 0).sum()):>9,} {'(old capped)':>12} {blocks!s:>7}"
            )
        else:
            print(
                f"{n:>11,} {old_s:>9.2f} {new_s:>8.2f} {old_s / new_s:>8.1f}x {int((labels >= 0).sum()):>9,} "
                f"{same:>12} {blocks!s:>7}"
            )
    for n in alone:
        values = synthetic_hashes(n, seed=n)
        new_s, labels = time_new(values)
        blocks = plan_blocks(d, len(np.unique(values)), 0)
        print(f"{n:>11,} {'-':>9} {new_s:>8.2f} {'-':>9} {int((labels >= 0).sum()):>9,} {'-':>12} {blocks!s:>7}")
    print()
    print("incremental: new hashes matched into the indexed ones (10% of the new are near copies of indexed ones)")
    print(f"{'indexed':>11} {'new':>8} {'seconds':>8} {'pairs':>8} {'blocks':>7}")
    for n, k in incremental:
        indexed = synthetic_hashes(n, seed=n)
        rng = np.random.default_rng(k)
        new = rng.integers(0, 2**64, k, dtype=np.uint64)
        new[: k // 10] = indexed[: k // 10] ^ (np.uint64(1) << rng.integers(0, 64, k // 10).astype(np.uint64))
        seconds, pairs = time_incremental(indexed, new)
        blocks = plan_blocks(d, k, len(np.unique(indexed)))
        print(f"{n:>11,} {k:>8,} {seconds:>8.2f} {pairs:>8,} {blocks!s:>7}")


if __name__ == "__main__":
    main()
