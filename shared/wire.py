"""Transport precision of a site's update (run-config ``update-dtype``): fewer bytes up, float32 at both ends.

With ``update-dtype = float16`` or ``bfloat16`` a site sends its *update* (trained weights minus the
global weights it received) in that precision instead of its float32 weights, and the server adds the
update back to the float32 weights it sent (`decode_update`) before anything else reads the reply:
screening, strategies and the checkpoint see float32 weights, as with ``float32``. Rounding the update
rather than the weights keeps the error relative to what the round changed (|update| x 2^-11 for
float16, x 2^-8 for bfloat16), not to the weights. The global model the server sends stays float32:
every site trains from, and computes its update against, exactly the weights the server holds, so
no rounding accumulates in the global model over rounds. Arrays that are not floating point (integer
buffers) travel as they are. With ``float32`` (the default) nothing changes: the reply carries the
trained weights.

NumPy has no bfloat16: a bfloat16 array travels as the upper 16 bits of the float32 bit pattern
(``uint16``), rounded to nearest, ties to even (`to_bfloat16_bits`, `from_bfloat16_bits`). float16
holds magnitudes up to 65504, and below 2^-14 (6.1e-5) only multiples of 2^-24 (an absolute error up
to 2^-25 there); an update beyond its range arrives non-finite and the server drops it with the reason.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

#: The values of ``update-dtype`` (shared.config.CHOICES holds a copy).
UPDATE_DTYPES = ("float32", "float16", "bfloat16")
#: What each update dtype travels as.
WIRE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(np.uint16),
}  # fmt: skip


class WireError(ValueError):
    """A reply's arrays are not what the run's update-dtype says travels (the reason is safe to record)."""


def to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """bfloat16 of float32 `values`, as uint16 bit patterns: round to nearest, ties to even.

    Finite values beyond bfloat16's largest (about 3.39e38) round to infinity, as IEEE rounding does;
    a NaN stays a (quiet) NaN of the same sign.
    """
    floats = np.ascontiguousarray(values, dtype=np.float32)
    bits = floats.view(np.uint32)
    lsb = (bits >> 16) & 1  # the last kept bit: a tie rounds towards the even pattern
    rounded = ((bits + np.uint32(0x7FFF) + lsb) >> 16).astype(
        np.uint16
    )  # a NaN's sum may wrap: replaced below
    nan = np.isnan(floats)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return rounded


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    """float32 values of uint16 bfloat16 patterns (exact: bfloat16 is float32 with 16 fewer mantissa bits)."""
    bits = np.asarray(bits)
    if bits.dtype != np.uint16:
        raise WireError(f"bfloat16 travels as uint16 bit patterns, got {bits.dtype}")
    return (bits.astype(np.uint32) << 16).view(np.float32)


def to_wire(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 `values` in the travelling form of `dtype` (`WIRE_DTYPES`)."""
    if dtype == "bfloat16":
        return to_bfloat16_bits(values)
    with np.errstate(over="ignore"):  # beyond float16's range: inf, which the server refuses with the reason
        return np.asarray(values, np.float32).astype(WIRE_DTYPES[_checked(dtype)])


def from_wire(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values back from the travelling form of `dtype`."""
    if dtype == "bfloat16":
        return from_bfloat16_bits(values)
    return np.asarray(values).astype(np.float32)


def _checked(dtype: str) -> str:
    if dtype not in UPDATE_DTYPES:
        raise ValueError(f"update-dtype must be one of {', '.join(UPDATE_DTYPES)}, got {dtype!r}")
    return dtype


def _floating(array: Array) -> bool:
    return np.dtype(array.dtype).kind == "f"


def encode_update(received: ArrayRecord, trained: ArrayRecord, dtype: str) -> ArrayRecord:
    """What a site sends: with float32 its `trained` weights; else, per floating array, trained minus
    `received` (the global weights of the message) in `dtype`'s travelling form."""
    if _checked(dtype) == "float32":
        return trained
    out = {}
    for name, array in trained.items():
        if name in received and _floating(array) and _floating(received[name]):
            update = array.numpy().astype(np.float32) - received[name].numpy().astype(np.float32)
            out[name] = Array(to_wire(update, dtype))
        else:
            out[name] = array
    return ArrayRecord(out)


def decode_update(sent: ArrayRecord, reply: ArrayRecord, dtype: str) -> ArrayRecord:
    """The float32 weights a site's `reply` stands for, given the global weights `sent` to it.

    Raises WireError when a floating array of the model does not travel as exactly `dtype` says, or
    holds non-finite values. Names, shapes and the other arrays are left for `server.update_checks`.
    """
    if _checked(dtype) == "float32":
        return reply
    expected = WIRE_DTYPES[dtype]
    out: dict[str, Array] = {}
    for name, array in reply.items():
        reference = sent[name] if name in sent else None
        if reference is None or not _floating(reference):
            out[name] = array
            continue
        if np.dtype(array.dtype) != expected:
            raise WireError(
                f"array {name!r} travels as {array.dtype}; with update-dtype {dtype} the run expects {expected} only"
            )
        update = from_wire(array.numpy(), dtype)
        if not np.isfinite(update).all():
            raise WireError(
                f"array {name!r}: the {dtype} update holds non-finite values (beyond {dtype}'s range?)"
            )
        weights = reference.numpy()
        out[name] = Array((weights.astype(np.float32) + update).astype(weights.dtype))
    return ArrayRecord(out)
