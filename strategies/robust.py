"""Robust aggregation kernels, block by block over the parameters: median, trimmed mean, Krum distances.

Flower's FedMedian, FedTrimmedAvg, Krum and Bulyan copy every update (``Array.numpy``), stack them
(a second copy of the whole round) and run ``np.partition`` along the site axis, which numpy does
one parameter at a time: 45-115 times one pass over the updates. Here the updates are read in blocks
of `chunk` parameters straight from the received bytes; within a block a comparator network
(Batcher's odd-even merge sort, pruned to the order statistics needed) sorts the sites' values with
whole-block ``np.minimum``/``np.maximum``, so there is no Python loop over parameters and the extra
memory is a few blocks, not a copy of the round.

The values are the same as Flower's: an order statistic does not depend on how it is found, the
median of an even count is the mean of the two middle values as ``np.median`` computes it, and
kept values are summed in ascending order (Bulyan: ascending distance to the median), the order
numpy's ``argpartition`` returns for these sizes. Bulyan's second step packs each candidate's
distance, side of the median and value into one uint64 key, so the same min/max network merges
the two sides (twice as fast as merging with gathers, which float32 only needs no longer). Flower's trimmed mean sums its kept values in
``np.partition``'s order, so from five kept values on the last bit may differ.

Non-finite values: a NaN spreads to every order statistic of its column (the server drops
non-finite updates before aggregation). Arrays that are not floating point (step counters) take
Flower's own functions: they are tiny and Flower returns them as float64.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
from flwr.serverapp.strategy.bulyan import aggregate_n_closest_weights
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

try:  # installed with scikit-learn (nilearn's dependency); without it BLAS keeps its own threads
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None

#: Parameters per block. Chosen by measurement (benchmarks/bench_aggregation.py --chunks): a block of
#: every site's values and its scratch rows stays in the core's L2 cache for 12-17 sites.
DEFAULT_CHUNK = 1 << 13

Comparator = tuple[int, int, bool, bool]  # positions i < j; whether the min (to i) / max (to j) is used


def _batcher_pairs(n: int) -> list[tuple[int, int]]:
    """Batcher's odd-even merge sort network for `n` values (a power-of-two network with the
    comparators that touch padding removed: padding acts as +inf, so those are no-ops)."""
    size = 1 << max(0, (n - 1).bit_length())
    pairs = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p) and i + j + k < n:
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return pairs


@functools.lru_cache(maxsize=256)
def comparator_network(n: int, lo: int, hi: int) -> tuple[Comparator, ...]:
    """The comparators that put the `lo`..`hi`-1 smallest of `n` values (in order) at those positions."""
    if not 0 <= lo < hi <= n:
        raise ValueError(f"order statistics {lo}..{hi - 1} of {n} values do not exist")
    needed = set(range(lo, hi))
    kept: list[Comparator] = []
    for i, j in reversed(_batcher_pairs(n)):
        if i in needed or j in needed:
            kept.append((i, j, i in needed, j in needed))
            needed |= {i, j}
    return tuple(reversed(kept))


@functools.lru_cache(maxsize=256)
def _register_plan(n: int, lo: int, hi: int) -> tuple[int, tuple[tuple[np.ufunc, int, int, int], ...], tuple[int, ...]]:
    """The network as ufunc calls on registers: 0..n-1 are the inputs (never written), n.. scratch rows.

    Returns (number of scratch rows, the calls ``(ufunc, a, b, out)``, the register of each position)."""
    at = list(range(n))  # the register holding each position's current value
    free: list[int] = []
    scratch = 0
    calls = []

    def fresh() -> int:
        nonlocal scratch
        if free:
            return free.pop()
        scratch += 1
        return n + scratch - 1

    def release(register: int) -> None:
        if register >= n:
            free.append(register)

    for i, j, want_min, want_max in comparator_network(n, lo, hi):
        a, b = at[i], at[j]
        if want_min and want_max:
            low = fresh()  # never a or b: the max still reads both
            high = b if b >= n else a if a >= n else fresh()
            calls += [(np.minimum, a, b, low), (np.maximum, a, b, high)]
            for old in {a, b} - {high}:
                release(old)
            at[i], at[j] = low, high
        else:
            target = i if want_min else j
            out = a if a >= n else b if b >= n else fresh()
            calls.append((np.minimum if want_min else np.maximum, a, b, out))
            for old in {a, b} - {out}:
                release(old)
            at[target] = out
    return scratch, tuple(calls), tuple(at)


def _sorted_rows(rows: Sequence[np.ndarray], lo: int, hi: int, scratch: list[np.ndarray]) -> list[np.ndarray]:
    """Position k of the result, for lo <= k < hi, holds the (k+1)-th smallest value of every column.

    `rows` are never written; `scratch` (grown as needed, reused across blocks) holds the results."""
    count, calls, at = _register_plan(len(rows), lo, hi)
    width = len(rows[0])
    while len(scratch) < count:
        scratch.append(np.empty(width, rows[0].dtype))
    registers = list(rows) + [row[:width] for row in scratch[:count]]
    for ufunc, a, b, out in calls:
        ufunc(registers[a], registers[b], out=registers[out])
    return [registers[r] for r in at]


def _blocks(size: int, chunk: int) -> Iterator[slice]:
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 parameter, got {chunk}")
    for start in range(0, size, chunk):
        yield slice(start, min(start + chunk, size))


def _flat(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    if not arrays:
        raise ValueError("no arrays to aggregate")
    shape = arrays[0].shape
    for k, a in enumerate(arrays):
        if a.shape != shape or a.dtype != arrays[0].dtype:
            raise ValueError(f"update {k} is {a.dtype}{a.shape}, expected {arrays[0].dtype}{shape} like update 0")
    return [np.ravel(a) for a in arrays]  # views, except for a Fortran-ordered array


def _ascending_sum(sorted_rows: Sequence[np.ndarray], out: np.ndarray) -> np.ndarray:
    np.copyto(out, sorted_rows[0])
    for row in sorted_rows[1:]:
        out += row
    return out


def coordinate_median(arrays: Sequence[np.ndarray], chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """``np.median(np.stack(arrays), axis=0)``, block by block (FedMedian, Yin et al. 2018)."""
    flat = _flat(arrays)
    if arrays[0].dtype.kind != "f":
        return np.asarray(np.median(np.stack(arrays), axis=0))
    n, out = len(flat), np.empty(flat[0].size, arrays[0].dtype)
    lo, hi = (n // 2, n // 2 + 1) if n % 2 else (n // 2 - 1, n // 2 + 1)
    scratch: list[np.ndarray] = []
    for block in _blocks(out.size, chunk):
        rows = _sorted_rows([f[block] for f in flat], lo, hi, scratch)
        if n % 2:
            out[block] = rows[lo]
        else:
            np.add(rows[lo], rows[lo + 1], out=out[block])
            out[block] /= 2
    return out.reshape(arrays[0].shape)


def trimmed_mean(arrays: Sequence[np.ndarray], cut_fraction: float, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """Flower's ``trim_mean(np.stack(arrays), cut_fraction)``: the mean without the ``int(cut * n)``
    smallest and largest values of each parameter, block by block."""
    if not 0.0 <= cut_fraction < 0.5:
        raise ValueError(f"cut fraction must be in [0, 0.5), got {cut_fraction}")
    flat = _flat(arrays)
    if arrays[0].dtype.kind != "f":
        return np.asarray(trim_mean(np.stack(arrays), cut_fraction))
    n, out = len(flat), np.empty(flat[0].size, arrays[0].dtype)
    lo = int(cut_fraction * n)
    hi = n - lo
    scratch: list[np.ndarray] = []
    for block in _blocks(out.size, chunk):
        rows = _sorted_rows([f[block] for f in flat], lo, hi, scratch)
        _ascending_sum(rows[lo:hi], out[block])
        out[block] /= hi - lo
    return out.reshape(arrays[0].shape)


def closest_to_median_mean(arrays: Sequence[np.ndarray], beta: int, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """Bulyan's second step (Flower's ``aggregate_n_closest_weights`` against the coordinate-wise
    median): per parameter, the mean of the `beta` values closest to the median of all values.

    Within a block the candidates are the sorted values below the median (closest first) and above
    it: two ascending lists of keys (`_closeness_key`); the `beta` smallest of both, in order, are a
    bitonic merge (one ``np.minimum`` a pair, then a bitonic sorter), all whole-block min/max."""
    flat = _flat(arrays)
    n = len(flat)
    if not 1 <= beta <= n:
        raise ValueError(f"beta must be in [1, {n}] (the number of updates), got {beta}")
    if arrays[0].dtype.kind != "f":
        stack = np.stack(arrays)
        return aggregate_n_closest_weights([np.median(stack, axis=0)], [[a] for a in arrays], beta)[0]
    if arrays[0].dtype != np.float32:  # the keys below pack float32 bits
        return _closest_to_median_mean_merge(flat, beta, chunk).reshape(arrays[0].shape)
    out = np.empty(flat[0].size, np.float32)
    mid = n // 2
    lo, hi = max(0, mid - beta), min(n, mid + beta)  # the beta closest lie within this window
    width = 1 << max(0, (beta - 1).bit_length())  # each side padded to a power of two
    half = np.float32(2)
    keys = [np.empty(min(chunk, out.size), np.uint64) for _ in range(2 * width + 1)]
    bits = np.empty(min(chunk, out.size), np.uint32)
    mask = np.empty_like(bits)
    scratch: list[np.ndarray] = []
    for block in _blocks(out.size, chunk):
        rows = _sorted_rows([f[block] for f in flat], lo, hi, scratch)
        median = rows[mid] if n % 2 else (rows[mid - 1] + rows[mid]) / half
        size = block.stop - block.start
        below, above, spare = keys[:width], keys[width : 2 * width], keys[2 * width][:size]
        for k in range(width):  # below: rows mid-1, mid-2, ...; above: rows mid, mid+1, ...
            _closeness_key(rows, mid - 1 - k, lo, median, False, below[k][:size], bits[:size])
            _closeness_key(rows, mid + k, hi - 1, median, True, above[k][:size], bits[:size])
        # the `width` smallest keys of both (ascending) sides, as a bitonic sequence, then sorted
        merged = [np.minimum(below[k][:size], above[width - 1 - k][:size], out=below[k][:size])
                  for k in range(width)]
        step = width // 2
        while step:
            for i in range(width):
                if not i & step:
                    a, b = merged[i], merged[i + step]
                    np.maximum(a, b, out=spare)
                    np.minimum(a, b, out=a)
                    merged[i + step], spare = spare, b
            step //= 2
        total = out[block]
        for k in range(beta):  # summed in ascending distance, as Flower's np.mean of the closest
            value = _value_of(merged[k], bits[:size], mask[:size])
            if k == 0:
                np.copyto(total, value)
            else:
                total += value
        total /= np.float32(beta)
    return out.reshape(arrays[0].shape)


_SIDE = np.uint64(1 << 32)  # the key bit that says "above the median"
_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)


def _closeness_key(rows, index: int, limit: int, median, above: bool, key: np.ndarray, bits: np.ndarray) -> None:
    """A uint64 per column that orders candidates as Bulyan's merge outwards from the median takes them:
    float32 distance (its bits, sign-free, are ordered), then below before above, then within a side
    closest first (order-preserving bits of the value, reversed below); the value is recoverable.
    A row outside the window (``index`` beyond ``limit``) is padding: the largest key."""
    if (index > limit) if above else (index < limit):
        key.fill(_ALL)
        return
    value = rows[index]
    # |value - median| as Flower computes it: fl(m - v) is exactly -fl(v - m), and value <= median below
    np.subtract(*((value, median) if above else (median, value)), out=bits.view(np.float32))
    np.left_shift(bits, 33, out=key, dtype=np.uint64)
    raw = value.view(np.uint32)
    np.right_shift(value.view(np.int32), 31, out=bits.view(np.int32))  # 0 or all ones: the sign
    # order-preserving bits: positive -> raw | 1<<31, negative -> ~raw; reversed (~) below the median
    if above:
        np.bitwise_or(bits, np.uint32(0x80000000), out=bits)  # mask: all ones or the sign bit
    else:
        np.right_shift(bits, 1, out=bits)
        np.bitwise_xor(bits, np.uint32(0x7FFFFFFF), out=bits)  # mask: none or all but the sign bit
    np.bitwise_xor(bits, raw, out=bits)
    np.bitwise_or(key, bits, out=key, dtype=np.uint64)
    if above:
        np.bitwise_or(key, _SIDE, out=key)


def _value_of(key: np.ndarray, bits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The float32 value packed in a key by `_closeness_key` (branch-free: numpy's ``where=`` is
    twenty times slower on a random mask)."""
    words = key.view(np.uint32)  # little-endian: low word, then high word (whose bit 0 is the side)
    low, high = (words[0::2], words[1::2]) if np.little_endian else (words[1::2], words[0::2])
    np.bitwise_and(high, np.uint32(1), out=mask)
    np.subtract(mask, np.uint32(1), out=mask)  # above: 0; below: all ones (undo the reversal)
    np.bitwise_xor(low, mask, out=bits)  # order-preserving bits
    np.right_shift(bits, 31, out=mask)
    np.subtract(mask, np.uint32(1), out=mask)
    np.bitwise_or(mask, np.uint32(0x80000000), out=mask)  # positive: the sign bit; negative: all ones
    np.bitwise_xor(bits, mask, out=bits)
    return bits.view(np.float32)


def _closest_to_median_mean_merge(flat: list[np.ndarray], beta: int, chunk: int) -> np.ndarray:
    """`closest_to_median_mean` for float dtypes other than float32: merge outwards with gathers."""
    n = len(flat)
    out = np.empty(flat[0].size, flat[0].dtype)
    mid = n // 2
    lo, hi = max(0, mid - beta), min(n, mid + beta)  # the beta closest lie within this window
    half = out.dtype.type(2)
    scratch: list[np.ndarray] = []
    for block in _blocks(out.size, chunk):
        rows = _sorted_rows([f[block] for f in flat], lo, hi, scratch)
        window = np.stack(rows[lo:hi])  # (hi - lo, columns), each column ascending
        median = window[mid - lo] if n % 2 else (window[mid - 1 - lo] + window[mid - lo]) / half
        width = window.shape[1]
        distance = np.abs(window - median).ravel()
        values = window.ravel()
        columns = np.arange(width)
        # merge outwards from the median: the next closest value is the next one below or above
        below = np.full(width, (mid - 1 - lo) * width) + columns  # flat positions in the window
        above = np.full(width, (mid - lo) * width) + columns
        last = values.size - 1
        total = out[block]
        for step in range(beta):
            d_below = np.where(below >= 0, distance[np.maximum(below, 0)], np.inf)
            d_above = np.where(above <= last, distance[np.minimum(above, last)], np.inf)
            take_above = d_above < d_below
            value = values[np.where(take_above, above, below)]
            if step == 0:
                np.copyto(total, value)
            else:
                total += value
            above += take_above * width
            below -= ~take_above * width
        total /= beta
    return out


def squared_distances(updates: Sequence[Mapping[str, np.ndarray]], chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """``|x_i - x_j|^2`` between whole updates (all arrays, as Flower's ``compute_distances``), in float64.

    Computed block by block as a Gram matrix of the updates minus update 0: Flower's
    ``|x_i|^2 + |x_j|^2 - 2 x_i.x_j`` in float32 over the raw models cancels catastrophically when
    the updates are close (they all start from one global model); centring keeps the precision.
    """
    n = len(updates)
    if n == 0:
        raise ValueError("no updates to compare")
    gram = np.zeros((n, n), np.float64)
    # one BLAS thread: a 17 x chunk product is too small to share, and on a busy server OpenBLAS's
    # spinning threads made each product 100x slower (benchmarks/RESULTS.md)
    with threadpool_limits(1, user_api="blas") if threadpool_limits else contextlib.nullcontext():
        _add_gram(gram, updates, chunk)
    norms = np.diag(gram)
    return np.maximum(norms[:, None] + norms[None, :] - 2 * gram, 0.0)


def _add_gram(gram: np.ndarray, updates: Sequence[Mapping[str, np.ndarray]], chunk: int) -> None:
    n = len(updates)
    for name, first in updates[0].items():
        flat = _flat([u[name] for u in updates])
        dtype = np.float32 if first.dtype == np.float32 else np.float64
        buffer = np.empty((n, min(chunk, first.size)), dtype)
        for block in _blocks(first.size, chunk):
            rows = buffer[:, : block.stop - block.start]
            for k, f in enumerate(flat):
                np.subtract(f[block], flat[0][block], out=rows[k], casting="unsafe")
            gram += rows @ rows.T


def multikrum_selection(distances: np.ndarray, num_malicious_nodes: int, num_nodes_to_select: int) -> list[int]:
    """Flower's ``select_multikrum`` rule on a distance matrix: the indices of the updates with the
    smallest sums of distances to their ``n - f - 2`` nearest others, best first."""
    n = len(distances)
    num_closest = max(1, n - num_malicious_nodes - 2)
    scores = [np.sum(row[np.argsort(row)[1 : num_closest + 1]]) for row in distances]
    return [int(i) for i in np.argsort(scores)[:num_nodes_to_select]]
