"""Never trust an update: names, shapes, dtypes and finiteness are checked before aggregation,
and the aggregate is checked again before it becomes the global model."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Message

from fedbrats.strategies.arithmetic import cast_like, record_views, to_record

REQUIRED_METRICS = ("num-examples",)


def update_problem(reply: Message, reference: ArrayRecord) -> str | None:
    """Why a training reply cannot be aggregated, or None when it can."""
    if reply.has_error():
        return f"site error: {reply.error.reason}"
    content = reply.content
    if "arrays" not in content.array_records:
        return "reply carries no 'arrays' record"
    if "metrics" not in content.metric_records:
        return "reply carries no 'metrics' record"
    metrics = content.metric_records["metrics"]
    for key in REQUIRED_METRICS:
        if key not in metrics:
            return f"metric {key!r} missing"
    if not metrics["num-examples"] or metrics["num-examples"] <= 0:
        return f"num-examples must be > 0, got {metrics['num-examples']}"
    arrays = content.array_records["arrays"]
    missing = sorted(set(reference.keys()) - set(arrays.keys()))
    extra = sorted(set(arrays.keys()) - set(reference.keys()))
    if missing or extra:
        return f"array names differ from the global model: missing {missing[:5]}, unexpected {extra[:5]}"
    for name, ref in reference.items():
        got = arrays[name]
        if tuple(got.shape) != tuple(ref.shape):
            return f"array {name!r} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
        if got.dtype != ref.dtype:
            return f"array {name!r} has dtype {got.dtype}, expected {ref.dtype}"
        values = got.numpy()
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            return f"array {name!r} has non-finite values"
    return None


def conform_aggregate(aggregate: ArrayRecord, reference: ArrayRecord) -> tuple[ArrayRecord | None, str | None]:
    """The new global model in the current one's names, shapes and dtypes, or why it cannot be one.

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
    if all(values[name].dtype == ref.dtype for name, ref in current.items()):
        return aggregate, None
    return to_record({name: cast_like(values[name], ref) for name, ref in current.items()}), None
