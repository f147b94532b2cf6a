"""Never trust an update: its arrays are checked against the global model before aggregation,
and the aggregate is checked again before it becomes the global model.

`server.replies` has already checked the reply as data (records, metrics, that every Array's bytes
match its declared shape and dtype); here the arrays are compared with the model they update.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Message

from fedbrats.shared.wire import WireError, decode_update
from fedbrats.strategies.arithmetic import array_view, cast_like, record_views, to_record


def from_wire(reply: Message, sent: ArrayRecord | None, update_dtype: str) -> str | None:
    """Put in a validated training reply the float32 weights its arrays stand for (`shared.wire`: with
    update-dtype float16/bfloat16 a site sends its update against `sent`); why it cannot, or None."""
    if update_dtype == "float32" or reply.has_error():
        return None
    if sent is None:
        return "a reply from a node the round sent no model to"
    try:
        reply.content["arrays"] = decode_update(sent, reply.content.array_records["arrays"], update_dtype)
    except WireError as err:
        return str(err)
    return None


def update_problem(reply: Message, reference: ArrayRecord, frozen: frozenset[str] = frozenset()) -> str | None:
    """Why a validated training reply's arrays cannot update `reference`, or None when they can.

    `frozen` names the parameters the run does not train (`trainable`): they are the server's, and a site
    that changed one (by a bit) is trying to steer what nobody trains, or clip and noise, so its update is dropped."""
    if reply.has_error():
        return f"site error: {reply.error.reason}"
    if "arrays" not in reply.content.array_records:
        return "reply carries no 'arrays' record"
    arrays = reply.content.array_records["arrays"]
    missing = sorted(set(reference.keys()) - set(arrays.keys()))
    extra = sorted(set(arrays.keys()) - set(reference.keys()))
    if missing or extra:
        return f"array names differ from the global model: missing {missing[:5]}, unexpected {[ascii(e)[:40] for e in extra[:5]]}"
    for name, ref in reference.items():
        got = arrays[name]
        if tuple(got.shape) != tuple(ref.shape):
            return f"array {name!r} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
        if got.dtype != ref.dtype:
            return f"array {name!r} has dtype {got.dtype}, expected {ref.dtype}"
        values = array_view(got)
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            return f"array {name!r} has non-finite values"
        if name in frozen and not np.array_equal(values, array_view(ref)):
            return f"array {name!r} changed, but the run freezes it (trainable does not select it)"
    return None


def conform_aggregate(
    aggregate: ArrayRecord, reference: ArrayRecord, frozen: frozenset[str] = frozenset()
) -> tuple[ArrayRecord | None, str | None]:
    """The new global model in the current one's names, shapes and dtypes, or why it cannot be one.

    Frozen parameters are the current ones, bit for bit: a weighted mean of equal values may round, and
    client-level DP's noise on them would only corrupt what no site trained (dropping it is post-processing).
    Server optimisers may compute in float64 (Flower's FedAdam does: its bias-corrected step size is a
    NumPy float64): a global model that changed dtype would make every site's next update fail the
    dtype check, so the aggregate is cast back. Non-finite values (a diverged server optimiser) never reach the sites.
    """
    missing = sorted(set(reference.keys()) - set(aggregate.keys()))
    extra = sorted(set(aggregate.keys()) - set(reference.keys()))
    if missing or extra:
        return None, f"the aggregate's arrays differ from the model's: missing {missing[:5]}, unexpected {extra[:5]}"
    values, current = record_views(aggregate), record_views(reference)
    for name, ref in current.items():
        if values[name].shape != ref.shape:
            return None, f"the aggregate's {name!r} has shape {values[name].shape}, expected {ref.shape}"
        if values[name].dtype.kind == "f" and not np.isfinite(values[name]).all():
            return None, f"the aggregate's {name!r} has non-finite values"
    if not frozen and all(values[name].dtype == ref.dtype for name, ref in current.items()):
        return aggregate, None
    return to_record({name: ref if name in frozen else cast_like(values[name], ref) for name, ref in current.items()}), None
