"""The arithmetic every aggregation shares, once: reading replies, weighting sites, averaging arrays.

Arrays are read as zero-copy views of the ``.npy`` bytes a Flower ``Array`` carries (``Array.numpy``
copies every array; an aggregation of 17 updates of a 20M-parameter model would copy 1.4 GB for
nothing). Results are computed in the global model's dtype and keep its array order.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, Message

try:  # installed with scikit-learn (nilearn's dependency); without it BLAS keeps its own threads
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover
    ThreadpoolController = None

_CHUNK = 1 << 16  # elements per block in weighted_average: the block and its scratch stay in cache


def array_view(array: Array) -> np.ndarray:
    """A read-only view of an Array's values, without copying them when the bytes allow it.

    The Array's own dtype and shape say where the values start (the ``.npy`` header is what
    precedes them); the header is checked for the same dtype, else ``Array.numpy`` parses it.
    """
    data = array.data
    if array.stype != "numpy.ndarray" or not isinstance(data, bytes):
        return array.numpy()
    try:
        dtype = np.dtype(array.dtype)
    except TypeError:
        return array.numpy()
    shape = tuple(int(n) for n in array.shape)
    offset = len(data) - math.prod(shape) * dtype.itemsize
    header = data[:offset] if 10 <= offset <= 65_536 else b""
    if dtype.hasobject or not header.startswith(b"\x93NUMPY") or f"'descr': '{dtype.str}'".encode() not in header:
        return array.numpy()
    values = np.frombuffer(data, dtype=dtype, offset=offset)
    return values.reshape(shape, order="F" if b"'fortran_order': True" in header else "C")


def record_views(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array_view(array) for name, array in record.items()}


def to_array(value: np.ndarray) -> Array:
    """An Array with the same bytes ``Array(value)`` would hold, built with one copy instead of three."""
    value = np.ascontiguousarray(value)
    try:
        head = io.BytesIO()
        np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(value))
        data = b"".join((head.getvalue(), memoryview(value).cast("B")))
    except (ValueError, TypeError):  # 0-d or exotic arrays: let Flower serialise
        return Array(value)
    return Array(dtype=str(value.dtype), shape=tuple(value.shape), stype="numpy.ndarray", data=data)


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: to_array(value) for name, value in arrays.items()})


def site_of(reply: Message) -> str:
    """The site's name from its reply, or ``node-<id>`` for a reply without one."""
    records = reply.content.config_records
    if "site" in records and "name" in records["site"]:
        return str(records["site"]["name"])
    return f"node-{reply.metadata.src_node_id}"


def ordered(replies: Iterable[Message]) -> list[Message]:
    """Replies in a fixed order (site name, node id): float sums then do not depend on arrival order,
    so a resumed server reproduces the weights of an uninterrupted one bit for bit."""
    return sorted(replies, key=lambda r: (site_of(r), r.metadata.src_node_id))


def metric(reply: Message, name: str) -> float:
    """One number from a reply's MetricRecord; a clear error when the site did not send it."""
    for record in reply.content.metric_records.values():
        if name in record:
            value = record[name]
            if isinstance(value, list):
                raise ValueError(f"site {site_of(reply)}: metric {name!r} is a list, expected one number")
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"site {site_of(reply)}: metric {name!r} is {value}, expected a finite number")
            return value
    raise ValueError(f"site {site_of(reply)} sent no metric {name!r}, which this strategy needs")


def missing_metrics(reply: Message, names: Iterable[str]) -> str | None:
    """Why a reply lacks what a strategy needs (for the server's update checks), or None."""
    for name in names:
        try:
            metric(reply, name)
        except ValueError as err:
            return str(err)
    return None


def normalise(weights: Sequence[float]) -> list[float]:
    """Weights scaled to sum to one; negative, non-finite or all-zero weights are an error."""
    values = [float(w) for w in weights]
    if any(not math.isfinite(w) or w < 0 for w in values):
        raise ValueError(f"site weights must be finite and >= 0, got {values}")
    total = sum(values)
    if total <= 0:
        raise ValueError(f"site weights sum to {total}; at least one must be > 0")
    return [w / total for w in values]


def mix(terms: Sequence[tuple[float, Sequence[float]]]) -> list[float]:
    """``sum_k c_k * v_k / sum(v_k)`` per site, the form of FedCostWAvg and FedPIDAvg weights.

    A term whose values sum to zero (no site improved, no history yet) carries no information: it
    is left out and the remaining coefficients are rescaled, so the weights still sum to one.
    """
    n = len(terms[0][1])
    mixed = [0.0] * n
    used = 0.0
    for coefficient, values in terms:
        if any(not math.isfinite(v) or v < 0 for v in values):
            raise ValueError(f"weighting term values must be finite and >= 0, got {list(values)}")
        if coefficient == 0 or sum(values) <= 0:
            continue
        for j, share in enumerate(normalise(values)):
            mixed[j] += coefficient * share
        used += coefficient
    if used <= 0:
        raise ValueError("no weighting term has positive coefficient and positive values")
    return [w / used for w in mixed]


def cast_like(value: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """`value` in `reference`'s dtype; integer buffers (e.g. step counters) are rounded, not truncated."""
    if value.dtype == reference.dtype:
        return value
    if reference.dtype.kind in "iub":
        value = np.rint(value)
    return value.astype(reference.dtype)


def single_blas_thread() -> contextlib.AbstractContextManager:
    """BLAS limited to one thread while aggregating: a product or axpy of one block is too small to
    share, and on a busy server OpenBLAS's spinning threads made each call 100x slower
    (benchmarks/RESULTS.md)."""
    return _blas_controller().limit(limits=1, user_api="blas") if ThreadpoolController else contextlib.nullcontext()


@functools.cache
def _blas_controller() -> ThreadpoolController:
    """One controller per process: building one walks every loaded library (about 8 ms, each aggregation
    paid it); scipy's BLAS, which `weighted_sum` calls, is loaded first so the controller holds it too."""
    _axpy()
    return ThreadpoolController()


@functools.cache
def _axpy() -> dict[np.dtype, Callable]:
    # imported on first use: site processes import this module but never aggregate (scipy.linalg ~1 s)
    from scipy.linalg.blas import daxpy, saxpy

    return {np.dtype(np.float32): saxpy, np.dtype(np.float64): daxpy}


#: ``finish(name, where, block)``: called on each block of a floating-point array once it holds the
#: weighted mean (``where`` is its slice of the flattened array); it may rewrite the block in place
#: while it is still in cache (a server optimiser's step fused into the same pass).
BlockFinish = Callable[[str, slice, np.ndarray], None]
#: ``term(name, where, values)``: what of an update's block enters the mean instead of its values
#: (e.g. its change from the global model, clipped); may return a scratch array it reuses.
BlockTerm = Callable[[str, slice, np.ndarray], np.ndarray]


def weighted_average(
    arrays: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    finish: BlockFinish | None = None,
    term: BlockTerm | None = None,
) -> dict[str, np.ndarray]:
    """``sum_j w_j x_j`` with ``w`` normalised, in the arrays' own dtype and key order: the one
    weighted-mean kernel of every averaging strategy (``weighted_sum`` with weights summing to one)."""
    if len(arrays) != len(weights) or not arrays:
        raise ValueError(f"need one weight per update, got {len(weights)} weights for {len(arrays)} updates")
    return weighted_sum(arrays, normalise(weights), finish, term)


def weighted_sum(
    arrays: Sequence[Mapping[str, np.ndarray]],
    shares: Sequence[float],
    finish: BlockFinish | None = None,
    term: BlockTerm | None = None,
) -> dict[str, np.ndarray]:
    """``sum_j shares_j x_j`` as given (a server step such as ``x + s (avg - x)`` is such a sum with the
    global model as one more term), in the arrays' own dtype and key order.

    Block by block, each update read from memory once: the block starts as ``shares_0 x_0`` and every
    further update is added by BLAS ``axpy`` (one fused pass in cache). `term` and `finish` (floating-point
    arrays only) fuse a strategy's own arithmetic into the same pass. The result differs from Flower's
    ``aggregate_arrayrecords`` (``x_j * w_j`` rounded, then added) by float32 rounding only (axpy may
    round ``w_j x_j + s`` once); it is deterministic for a fixed order of updates.
    """
    if len(arrays) != len(shares) or not arrays:
        raise ValueError(f"need one coefficient per update, got {len(shares)} for {len(arrays)} updates")
    if any(not math.isfinite(c) for c in shares):
        raise ValueError(f"coefficients must be finite, got {list(shares)}")
    result: dict[str, np.ndarray] = {}
    with single_blas_thread():
        for name, first in arrays[0].items():
            if first.dtype.kind != "f":
                total = sum(np.asarray(a[name], np.float64) * w for a, w in zip(arrays, shares, strict=True))
                result[name] = cast_like(np.asarray(total), first)
                continue
            flat = [np.ravel(a[name]) for a in arrays]  # views, except for the rare Fortran-ordered array
            out = np.empty(first.size, first.dtype)
            terms = None if term is None else functools.partial(term, name)
            for where in _weighted_blocks(flat, shares, out, terms):
                if finish is not None:
                    finish(name, where, out[where])
            result[name] = out.reshape(first.shape)
    return result


def _weighted_blocks(
    flat: Sequence[np.ndarray],
    shares: Sequence[float],
    out: np.ndarray,
    term: Callable[[slice, np.ndarray], np.ndarray] | None = None,
) -> Iterator[slice]:
    """Fill `out` with ``sum_j shares_j term(flat_j)`` block by block, yielding each block's slice when done."""
    axpy = _axpy().get(out.dtype)
    scratch = None if axpy else np.empty(min(_CHUNK, out.size), out.dtype)
    for lo in range(0, out.size, _CHUNK):
        where = slice(lo, min(lo + _CHUNK, out.size))
        block = out[where]
        for j, (values, share) in enumerate(zip(flat, shares, strict=True)):
            values = values[where] if term is None else term(where, values[where])
            if j == 0:
                np.multiply(values, share, out=block)
            elif axpy:
                if axpy(values, block, a=share) is not block:  # pragma: no cover - contiguous: in place
                    raise RuntimeError("BLAS axpy did not update the block in place")
            else:  # float16 and other dtypes BLAS lacks: two passes in cache
                tmp = scratch[: block.size]
                np.multiply(values, share, out=tmp)
                block += tmp
        yield where


def deltas_from(global_arrays: Mapping[str, np.ndarray], local: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``local - global`` per array: what a site's training changed."""
    return {name: local[name] - g for name, g in global_arrays.items()}


def apply_update(
    global_arrays: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray], scale: float = 1.0
) -> dict[str, np.ndarray]:
    """``global + scale * update`` in the global model's dtypes."""
    return {name: cast_like(g + update[name] * float(scale), g) for name, g in global_arrays.items()}
