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
kept values are summed in ascending order, the order numpy's ``argpartition`` returns for these
sizes. Bulyan's second step keeps the same values as Flower's (a window of the sorted values, see
``closest_to_median_mean``) but sums them in ascending order, and Flower's trimmed mean sums its kept
values in ``np.partition``'s order: there the last bits may differ (float32 rounding).

Non-finite values: a NaN spreads to every order statistic of its column (the server drops
non-finite updates before aggregation). Arrays that are not floating point (step counters) take
Flower's own functions: they are tiny and Flower returns them as float64.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
from flwr.serverapp.strategy.bulyan import aggregate_n_closest_weights
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from fedbrats.strategies.arithmetic import single_blas_thread

#: Parameters per block. Chosen by measurement (benchmarks/bench_aggregation.py --chunks): larger blocks
#: spread numpy's per-call cost over more values; 32768 (a row 128 KB, the rows a comparator touches in
#: the 512 KB L2 cache of this machine's cores) was fastest for the sorts and the distances alike.
DEFAULT_CHUNK = 1 << 15

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

    In sorted order the `beta` closest values are a window ``[a, a + beta)``, and moving the window
    one step right (dropping ``s_j`` below the median, taking ``s_{j+beta}`` above it) is right
    exactly while ``s_{j+beta}`` is strictly closer: so each value of the window is either always in
    it or one of a pair ``(s_j, s_{j+beta})`` of which the closer is taken (the one below on a tie, as
    Flower's merge outwards takes it). Per block: a sort of the window's rows (a comparator network),
    then per pair two distances and a branch-free select of the bits; no gathers, no Python loop over
    parameters. Distances are Flower's (``|v - m|`` rounded as numpy rounds it), so the same values
    are kept; they are summed in ascending order, not Flower's ascending distance (float32 rounding).
    """
    flat = _flat(arrays)
    n = len(flat)
    if not 1 <= beta <= n:
        raise ValueError(f"beta must be in [1, {n}] (the number of updates), got {beta}")
    if arrays[0].dtype.kind != "f":
        stack = np.stack(arrays)
        return aggregate_n_closest_weights([np.median(stack, axis=0)], [[a] for a in arrays], beta)[0]
    dtype = arrays[0].dtype
    out = np.empty(flat[0].size, dtype)
    mid = n // 2
    first, last = max(0, mid - beta), min(mid, n - beta)  # the window starts at one of first..last
    words = np.dtype(f"i{dtype.itemsize}")  # the values' bits, for the select
    shift = 8 * dtype.itemsize - 1
    width = min(chunk, out.size)
    median, below, above = (np.empty(width, dtype) for _ in range(3))
    scratch: list[np.ndarray] = []
    for block in _blocks(out.size, chunk):
        rows = _sorted_rows([f[block] for f in flat], first, last + beta, scratch)
        size = block.stop - block.start
        m, dl, dr = median[:size], below[:size], above[:size]
        if n % 2:
            m = rows[mid]
        else:
            np.add(rows[mid - 1], rows[mid], out=m)
            m /= dtype.type(2)
        total = out[block]
        total.fill(0)
        for k in range(last, first + beta):  # in every window
            total += rows[k]
        for j in range(first, last):  # the closer of s_j (below) and s_{j+beta} (above)
            low, high = rows[j], rows[j + beta]
            np.subtract(m, low, out=dl)
            np.subtract(high, m, out=dr)
            np.subtract(dr, dl, out=dr)  # < 0 exactly when high is strictly closer
            mask = np.right_shift(dr.view(words), shift, out=dr.view(words))  # all ones if so, else 0
            bits = np.bitwise_xor(low.view(words), high.view(words), out=dl.view(words))
            np.bitwise_and(bits, mask, out=bits)
            np.bitwise_xor(bits, low.view(words), out=bits)
            total += bits.view(dtype)
        total /= dtype.type(beta)
    return out.reshape(arrays[0].shape)


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
    with single_blas_thread():  # a 17 x chunk product is too small to share
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
