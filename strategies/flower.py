"""Flower's message strategies, registered by name, with checkpointable state where they keep any.

Subclasses here inherit the round loop's hooks (``fedbrats.strategies.hooks.StrategyHooks``);
Flower's classes registered as they are get the same defaults from ``hooks_of``.

Parameters come from the run config's ``strategy_params`` (all floats); whole-number parameters
are converted here. Defaults are Flower 1.41's unless noted:

=============  ============================================================================
fedavg         (registered in ``strategies/fedavg.py`` on our aggregation) no parameters
fedprox        (registered in ``strategies/fedavg.py``) proximal_mu=0.0 (sent to sites as "proximal-mu")
fedavgm        (on our weighted mean, ``fedavgm.py``) server_learning_rate=1.0, server_momentum=0.0 [state: momentum]
fets_fedavgm   FeTS FedAvgM: server_learning_rate=1.0, server_momentum=0.9       [state: momentum]
fedadam        eta=0.1, eta_l=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3             [state: m_t, v_t]
fedyogi        eta=0.01, eta_l=0.0316, beta_1=0.9, beta_2=0.99, tau=1e-3         [state: m_t, v_t]
fedadagrad     eta=0.1, eta_l=0.1, tau=1e-3                                      [state: m_t, v_t]
fedmedian      no parameters
fedtrimmedavg  beta=0.2 (fraction cut from each tail, in [0, 0.5))
krum           num_malicious_nodes=0
multikrum      num_malicious_nodes=0, num_nodes_to_select=1
bulyan         num_malicious_nodes=0 (needs >= 4 f + 3 replies, else the round fails)
qfedavg        client_learning_rate=1e-3 (Flower has no default; ours is RunConfig.lr's), q=0.1;
               reads the sites' "train-loss" metric (Flower's default key is "train_loss")
=============  ============================================================================

FedOpt's eta (server learning rate 0.1 for FedAdam) is large for a deep segmentation network;
set ``strategy-eta`` (0.01 learns on the phantom: docs/example_comparison) with the adaptive optimisers.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedMedian,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
)
from flwr.serverapp.strategy.multikrum import select_multikrum
from flwr.supercore import log as flwr_log

from fedbrats.strategies.arithmetic import metric, ordered, record_views, to_record, weighted_average
from fedbrats.strategies.fedavgm import BlockwiseFedAvgM, FetsFedAvgM
from fedbrats.strategies.hooks import StrategyHooks
from fedbrats.strategies.registry import register_strategy
from fedbrats.strategies.robust import (
    DEFAULT_CHUNK,
    closest_to_median_mean,
    coordinate_median,
    multikrum_selection,
    squared_distances,
    trimmed_mean,
)


def _whole(name: str, value: float) -> int:
    if value != int(value) or value < 0:
        raise ValueError(f"{name} must be a whole number >= 0, got {value}")
    return int(value)


# --- server momentum (strategies/fedavgm.py: on our weighted mean) -------------------------
@register_strategy("fedavgm")
def fedavgm(*, server_learning_rate: float = 1.0, server_momentum: float = 0.0, **common: Any) -> BlockwiseFedAvgM:
    return BlockwiseFedAvgM(server_learning_rate=server_learning_rate, server_momentum=server_momentum, **common)


@register_strategy("fets_fedavgm")
def fets_fedavgm(*, server_learning_rate: float = 1.0, server_momentum: float = 0.9, **common: Any) -> FetsFedAvgM:
    return FetsFedAvgM(server_learning_rate=server_learning_rate, server_momentum=server_momentum, **common)


# --- adaptive server optimisers (FedOpt family) ------------------------------------------
class _FedOptState(StrategyHooks):
    """Checkpoint of FedOpt's first and second moments (``current_arrays`` is reset every round)."""

    m_t: dict[str, np.ndarray] | None
    v_t: dict[str, np.ndarray] | None

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {f"m_t/{k}": np.ascontiguousarray(v) for k, v in (self.m_t or {}).items()}
        arrays |= {f"v_t/{k}": np.ascontiguousarray(v) for k, v in (self.v_t or {}).items()}
        return arrays, {"m_t": list(self.m_t or {}), "v_t": list(self.v_t or {})}

    def load_state_dict(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.m_t = {k: np.array(arrays[f"m_t/{k}"]) for k in meta.get("m_t", [])} or None
        self.v_t = {k: np.array(arrays[f"v_t/{k}"]) for k in meta.get("v_t", [])} or None


class StatefulFedAdam(_FedOptState, FedAdam):
    """Flower's FedAdam with checkpointed moments."""


class StatefulFedYogi(_FedOptState, FedYogi):
    """Flower's FedYogi with checkpointed moments."""


class StatefulFedAdagrad(_FedOptState, FedAdagrad):
    """Flower's FedAdagrad with checkpointed moments."""


register_strategy("fedadam")(StatefulFedAdam)
register_strategy("fedyogi")(StatefulFedYogi)
register_strategy("fedadagrad")(StatefulFedAdagrad)


# --- robust aggregation --------------------------------------------------------------------
# Flower's classes with their arrays aggregated by fedbrats.strategies.robust: block by block from
# the received bytes, equal to Flower's results (see that module for the last-bit caveats), 6-10x
# faster and without a second copy of the round (benchmarks/RESULTS.md). Replies are taken in a
# fixed order (site name), as in our own strategies.
class _Blockwise(StrategyHooks):
    chunk: int = DEFAULT_CHUNK  # parameters per block

    def _updates(self, server_round: int, replies: Any) -> tuple[list[Message], list[dict[str, np.ndarray]]]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        valid = ordered(valid)
        if not valid:
            return [], []
        key = list(valid[0].content.array_records.keys())[0]  # as Flower: the replies' one ArrayRecord
        return valid, [record_views(r.content[key]) for r in valid]

    def _metrics(self, replies: list[Message]) -> MetricRecord:
        return self.train_metrics_aggr_fn([r.content for r in replies], self.weighted_by_key)


class BlockwiseFedMedian(_Blockwise, FedMedian):
    """Flower's FedMedian (Yin et al., 2018), the coordinate-wise median computed block by block."""

    def aggregate_train(self, server_round: int, replies: Any) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, updates = self._updates(server_round, replies)
        if not valid:
            return None, None
        arrays = {name: coordinate_median([u[name] for u in updates], self.chunk) for name in updates[0]}
        return to_record(arrays), self._metrics(valid)


class BlockwiseFedTrimmedAvg(_Blockwise, FedTrimmedAvg):
    """Flower's FedTrimmedAvg (Yin et al., 2018), the trimmed mean computed block by block."""

    def aggregate_train(self, server_round: int, replies: Any) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, updates = self._updates(server_round, replies)
        if not valid:
            return None, None
        arrays = {name: trimmed_mean([u[name] for u in updates], self.beta, self.chunk) for name in updates[0]}
        return to_record(arrays), self._metrics(valid)


class _BlockwiseKrum(_Blockwise):
    """(Multi-)Krum (Blanchard et al., 2017) with the pairwise distances computed block by block."""

    num_malicious_nodes: int
    num_nodes_to_select: int

    def aggregate_train(self, server_round: int, replies: Any) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, updates = self._updates(server_round, replies)
        if not valid:
            return None, None
        best = multikrum_selection(squared_distances(updates, self.chunk), self.num_malicious_nodes,
                                   self.num_nodes_to_select)
        selected = [valid[i] for i in best]  # best first, the order Flower averages them in
        weights = [metric(r, self.weighted_by_key) for r in selected]
        return to_record(weighted_average([updates[i] for i in best], weights)), self._metrics(selected)


class BlockwiseKrum(_BlockwiseKrum, Krum):
    """Flower's Krum, distances computed block by block."""


class BlockwiseMultiKrum(_BlockwiseKrum, MultiKrum):
    """Flower's MultiKrum, distances computed block by block."""


register_strategy("fedmedian")(BlockwiseFedMedian)
register_strategy("fedtrimmedavg")(BlockwiseFedTrimmedAvg)


@register_strategy("krum")
def krum(*, num_malicious_nodes: float = 0, **common: Any) -> Krum:
    return BlockwiseKrum(num_malicious_nodes=_whole("num_malicious_nodes", num_malicious_nodes), **common)


@register_strategy("multikrum")
def multikrum(*, num_malicious_nodes: float = 0, num_nodes_to_select: float = 1, **common: Any) -> MultiKrum:
    if num_nodes_to_select < 1:
        raise ValueError(f"num_nodes_to_select must be >= 1, got {num_nodes_to_select}")
    return BlockwiseMultiKrum(
        num_malicious_nodes=_whole("num_malicious_nodes", num_malicious_nodes),
        num_nodes_to_select=_whole("num_nodes_to_select", num_nodes_to_select),
        **common,
    )


class SizedBulyan(_Blockwise, Bulyan):
    """Flower's Bulyan (El Mhamdi et al., 2018) computed block by block, saying how many updates it
    needs: a round with fewer fails with that reason instead of Flower's "no aggregate"."""

    @property
    def min_replies(self) -> int:
        return 4 * self.num_malicious_nodes + 3

    def aggregate_train(self, server_round: int, replies: Any) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.selection_rule is not select_multikrum:  # a custom rule works on Flower's records
            return super().aggregate_train(server_round, replies)
        valid, updates = self._updates(server_round, replies)
        f = self.num_malicious_nodes
        if len(valid) < self.min_replies:
            flwr_log(logging.WARNING, "Bulyan needs %d (4 f + 3) replies, got %d: no aggregate",
                     self.min_replies, len(valid))
            return None, None
        theta = len(valid) - 2 * f
        chosen = multikrum_selection(squared_distances(updates, self.chunk), f, theta)
        arrays = {name: closest_to_median_mean([updates[i][name] for i in chosen], theta - 2 * f, self.chunk)
                  for name in updates[chosen[0]]}
        return to_record(arrays), self._metrics([valid[i] for i in chosen])


@register_strategy("bulyan")
def bulyan(*, num_malicious_nodes: float = 0, **common: Any) -> Bulyan:
    return SizedBulyan(num_malicious_nodes=_whole("num_malicious_nodes", num_malicious_nodes), **common)


# --- fairness ------------------------------------------------------------------------------
def _reply_names(replies: list[Message], key: str) -> list[str]:
    """Array names in the order the sites sent them (Flower aggregates in this order)."""
    for reply in replies:
        if not reply.has_error() and key in reply.content.array_records:
            return list(reply.content.array_records[key].keys())
    return []


def _in_order(record: ArrayRecord, names: list[str]) -> ArrayRecord:
    """`record` with its arrays in `names` order. Flower's QFedAvg pairs the global
    model's arrays with the sites' by position; a model read back from a checkpoint may list its
    arrays in another order (safetensors sorts names), which would pair the wrong arrays."""
    if list(record.keys()) == names or set(record.keys()) != set(names):
        return record
    return ArrayRecord({name: record[name] for name in names})


class NamedQFedAvg(StrategyHooks, QFedAvg):
    """Flower's QFedAvg pairing the global arrays with the sites' by name, not position.

    A site whose reply lacks ``train-loss`` (q-FFL's weights) is left out with that reason."""

    required_metrics = ("num-examples", "train-loss")

    def aggregate_train(self, server_round: int, replies: Any) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        names = _reply_names(replies, self.arrayrecord_key)
        if names and self.current_arrays is not None:
            self.current_arrays = _in_order(self.current_arrays, names)
        return super().aggregate_train(server_round, replies)


@register_strategy("qfedavg")
def qfedavg(*, client_learning_rate: float = 1e-3, q: float = 0.1, **common: Any) -> NamedQFedAvg:
    if client_learning_rate <= 0:
        raise ValueError(f"client_learning_rate must be > 0, got {client_learning_rate}")
    return NamedQFedAvg(client_learning_rate=client_learning_rate, q=q, train_loss_key="train-loss", **common)

