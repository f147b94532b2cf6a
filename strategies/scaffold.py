"""SCAFFOLD: control variates correct each site's drift towards its own data.

Karimireddy et al., "SCAFFOLD: stochastic controlled averaging for federated learning",
ICML 2020 (arXiv:1910.06378). The server keeps a control variate ``c``, sends it with the model
(ArrayRecord ``"control"``), and each site returns its model and the change of its own control
variate (ArrayRecord ``"control-delta"``). Server update:
``x += lr_g * mean_j(y_j - x)``, ``c += (|S|/N) * mean_j(delta c_j)``. The paper's means are unweighted
(equal sites, equal local steps); here they are weighted by the sites' ``num-examples`` by default, as
FedAvg's are, so that SCAFFOLD and FedAvg optimise the same objective on a skewed split (option ``uniform``
gives the paper's means).

The client side is two pure functions here (numpy, no Flower, no torch), so site code imports
them: ``gradient_correction`` before local training and ``client_control_update`` after it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedbrats.strategies.arithmetic import (
    apply_update,
    metric,
    missing_metrics,
    normalise,
    ordered,
    record_views,
    site_of,
    to_record,
    weighted_average,
    weighted_sum,
)
from fedbrats.strategies.hooks import StrategyHooks
from fedbrats.strategies.registry import register_strategy

log = logging.getLogger("fedbrats.strategies")

CONTROL = "control"
CONTROL_DELTA = "control-delta"


# --- client side -------------------------------------------------------------------------
def gradient_correction(c_global: Mapping[str, np.ndarray], c_local: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """``c - c_i``: add it to each parameter's gradient at every local step (``g + c - c_i``)."""
    return {k: c - (c_local[k] if c_local else 0.0) for k, c in c_global.items()}


def client_control_update(
    c_local: Mapping[str, np.ndarray] | None,
    c_global: Mapping[str, np.ndarray],
    x_global: Mapping[str, np.ndarray],
    y_local: Mapping[str, np.ndarray],
    steps: int,
    lr: float,
    mean_gradients: Mapping[str, np.ndarray] | None = None,
    average: float = 0.0,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Option II of the paper: ``c_i+ = c_i - c + (x - y_i) / (K lr)``; returns ``(c_i+, c_i+ - c_i)``.

    `c_local` is None on a site's first round (``c_i = 0``); `steps` is K, the local steps taken
    with learning rate `lr`; with a schedule, pass the mean learning rate over those steps (then
    ``K lr`` is the sum of the step sizes, as the estimate needs). Only the names in `c_global`
    (floating-point parameters) are updated.

    `mean_gradients` (name -> the mean over the local steps of the gradient the optimiser was given, less
    the correction) replaces the estimate for the names it has. Under plain SGD the two are equal
    (``x - y_i = K lr (mean g + c - c_i)``); under Adam, the sites' optimiser, ``(x - y_i) / (K lr)`` measures
    Adam's normalised steps, about 1 per coordinate whatever the gradient's size, and corrections that
    large swamp the gradients (on the FeTS-shaped phantom SCAFFOLD fell to mean Dice 0.03).

    `average` in [0, 1) keeps that share of the previous ``c_i``: ``c_i+ = a c_i + (1 - a) estimate`` (an
    exponential mean over the site's rounds), so that a site taking one step a round does not hold one
    batch's gradient as its control variate. 0 is the paper's rule; the first round has no ``c_i`` to keep.
    Measured on the FeTS-shaped phantom (3 seeds, Adam at the sites), 0.5 made SCAFFOLD worse (mean Dice 0.33
    against 0.58): a stale control variate corrects towards where the model was (benchmarks/RESULTS.md)."""
    if steps <= 0 or lr <= 0:
        raise ValueError(f"SCAFFOLD needs steps > 0 and lr > 0, got steps={steps}, lr={lr}")
    if not 0 <= average < 1:
        raise ValueError(f"SCAFFOLD's control-variate average must be in [0, 1), got {average}")
    scale = 1.0 / (steps * lr)
    new, delta = {}, {}
    for k, c in c_global.items():
        old = c_local[k] if c_local else np.zeros_like(c)
        if mean_gradients is not None and k in mean_gradients:
            estimate = np.asarray(mean_gradients[k]).reshape(c.shape)
        else:
            estimate = old - c + (x_global[k] - y_local[k]) * scale
        if c_local and average:
            estimate = average * old + (1.0 - average) * estimate
        new[k] = np.asarray(estimate).astype(c.dtype, copy=False)
        delta[k] = new[k] - old
    return new, delta


# --- server side -------------------------------------------------------------------------
def _all_finite(array: np.ndarray) -> bool:
    """Whether every value is finite. Up to float32, a float64 sum cannot overflow, so it is finite exactly
    when every value is: one read and no mask the size of the array."""
    if array.dtype.kind == "f" and array.dtype.itemsize <= 4:
        return bool(np.isfinite(np.sum(array, dtype=np.float64)))
    return bool(np.isfinite(array).all())


@register_strategy("scaffold")
class Scaffold(StrategyHooks, FedAvg):
    """SCAFFOLD server: FedAvg's messages plus the control variate.

    Parameters
    ----------
    server_lr : float (default: 1.0)
        Global step size ``lr_g``; 1.0 makes the model update the plain mean of the sites' models.
    num_sites : float (default: 0)
        N, the federation's size, for the control update's ``|S|/N``. 0: the number of distinct
        sites seen so far (right whenever every site trains every round). Set it when sampling.
    uniform : float (default: 0)
        1: the paper's unweighted means over sites. 0: means weighted by ``num-examples``, FedAvg's
        weights: site j's model counts ``n_j / n_S`` and its control change ``n_j / n_seen`` (n_seen: the
        cases of every site seen so far, each at its last reported size), which keeps ``c`` the
        case-weighted mean of the sites' ``c_i``, as the unweighted rule keeps it their plain mean. On the
        FeTS-shaped phantom (21 one-case sites taking one local step, two large ones taking 6-8), the
        unweighted mean moved the model about a third as far a round as FedAvg and SCAFFOLD reached mean
        Dice 0.40 against FedAvg's 0.77 (benchmarks/RESULTS.md).

    Plain-SGD caveat: option II estimates each site's mean gradient as ``(x - y_i)/(K lr)``, true for
    SGD; the sites send the mean of the gradients they saw instead (`client_control_update`).
    """

    required_metrics = ("num-examples",)

    def __init__(self, *, server_lr: float = 1.0, num_sites: float = 0, uniform: float = 0, **kwargs) -> None:
        if server_lr <= 0 or num_sites < 0 or uniform not in (0, 1):
            raise ValueError(f"server_lr must be > 0, num_sites >= 0 and uniform 0 or 1, got {server_lr}, {num_sites}, {uniform}")
        super().__init__(**kwargs)
        self.server_lr = float(server_lr)
        self.num_sites = int(num_sites)
        self.uniform = bool(uniform)
        self.control: dict[str, np.ndarray] | None = None
        self.site_sizes: dict[str, float] = {}  # every site seen: its last num-examples (1 each when uniform)
        self.global_arrays: ArrayRecord | None = None

    def summary(self) -> None:
        log.info("SCAFFOLD: server_lr %.3g, num_sites %s, %s means", self.server_lr, self.num_sites or "sites seen",
                 "unweighted" if self.uniform else "case-weighted")  # fmt: skip
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.global_arrays = arrays
        if self.control is None:
            self.control = {k: np.zeros_like(v) for k, v in record_views(arrays).items() if v.dtype.kind == "f"}
        messages = list(super().configure_train(server_round, arrays, config, grid))
        control = to_record(self.control)
        for message in messages:
            message.content[CONTROL] = control
        return messages

    def reply_problem(self, reply: Message) -> str | None:
        """A reply needs its metrics and a finite ``control-delta`` matching the control variate."""
        if reply.has_error():
            return f"site error: {reply.error.reason}"
        problem = missing_metrics(reply, self.required_metrics)
        if problem:
            return problem
        if metric(reply, self.weighted_by_key) <= 0:
            return f"{self.weighted_by_key} is {metric(reply, self.weighted_by_key)}, expected > 0"
        if CONTROL_DELTA not in reply.content.array_records:
            return f"reply carries no {CONTROL_DELTA!r} record (is the site running SCAFFOLD?)"
        delta = reply.content.array_records[CONTROL_DELTA]
        expected = self.control or {}
        if set(delta.keys()) != set(expected):
            return f"{CONTROL_DELTA} names differ from the control variate's ({len(delta)} vs {len(expected)} arrays)"
        for name, array in record_views(delta).items():
            if array.shape != expected[name].shape or array.dtype != expected[name].dtype:
                return f"{CONTROL_DELTA} {name!r} is {array.dtype}{array.shape}, expected {expected[name].dtype}{expected[name].shape}"
            if not _all_finite(array):
                return f"{CONTROL_DELTA} {name!r} has non-finite values"
        return None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.global_arrays is None or self.control is None:
            raise RuntimeError("Scaffold: configure_train must run before aggregate_train")
        usable = []
        for reply in replies:
            problem = self.reply_problem(reply)
            if problem:
                log.warning("round %d: SCAFFOLD leaves out %s: %s", server_round, site_of(reply), problem)
            else:
                usable.append(reply)
        if not usable:
            return None, None
        usable = ordered(usable)
        lr = self.server_lr
        sizes = [1.0 if self.uniform else metric(r, self.weighted_by_key) for r in usable]
        share = normalise(sizes)  # each site's weight in this round's mean
        x = record_views(self.global_arrays)
        models = [record_views(r.content[self.arrayrecord_key]) for r in usable]
        # x + lr (sum_j w_j y_j - x) = (1 - lr) x + sum_j lr w_j y_j: one weighted sum (x left out when lr = 1)
        floats = [name for name, value in x.items() if value.dtype.kind == "f"]
        terms = [{k: m[k] for k in floats} for m in models] + ([{k: x[k] for k in floats}] if lr != 1.0 else [])
        new_x = weighted_sum(terms, [lr * w for w in share] + ([1.0 - lr] if lr != 1.0 else []))
        ints = [name for name in x if name not in new_x]
        if ints:  # integer buffers (step counters): the mean, rounded, then the same step, rounded
            mean = weighted_average([{k: m[k] for k in ints} for m in models], share)
            new_x |= apply_update({k: x[k] for k in ints}, {k: mean[k] - x[k] for k in ints}, lr)
        new_x = {name: new_x[name] for name in x}  # the global model's array order
        self.site_sizes.update({site_of(r): size for r, size in zip(usable, sizes, strict=True)})
        # c + sum_j (n_j / n_all) dc_j keeps c = sum_i (n_i / n_all) c_i over every site seen; sites not seen
        # yet (num_sites larger) count as the seen ones' mean size. Uniform: n_j = 1, i.e. (|S|/N) mean_j dc_j.
        seen = len(self.site_sizes)
        n_all = sum(self.site_sizes.values()) * max(self.num_sites, seen) / seen
        deltas = [record_views(r.content[CONTROL_DELTA]) for r in usable]
        self.control = weighted_sum([self.control, *deltas], [1.0] + [size / n_all for size in sizes])
        metrics = self.train_metrics_aggr_fn([r.content for r in usable], self.weighted_by_key)
        return to_record(new_x), metrics

    # --- checkpoint ----------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {f"{CONTROL}/{k}": np.ascontiguousarray(v) for k, v in (self.control or {}).items()}
        return arrays, {"site_sizes": dict(sorted(self.site_sizes.items())), "control_names": list(self.control or {})}

    def load_state_dict(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        names = meta.get("control_names", [])
        self.control = {k: np.array(arrays[f"{CONTROL}/{k}"]) for k in names} if names else None
        sizes = meta.get("site_sizes", dict.fromkeys(meta.get("seen_sites", []), 1.0))  # older checkpoints: names
        self.site_sizes = {str(site): float(size) for site, size in sizes.items()}
