"""The round loop: select sites, train, check updates, aggregate, evaluate, record, checkpoint.

We drive the rounds ourselves rather than calling ``Strategy.start`` because every round must
also check each update before aggregation, record per-site results, cost the round in simulated
time and checkpoint the server so a restarted run resumes with identical weights. Flower's
strategies still configure the messages and aggregate the replies.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import Strategy

from fedbrats.server.exchange import send_and_receive
from fedbrats.server.history import RunHistory, scan_history
from fedbrats.server.replies import (
    EVALUATE,
    TRAIN,
    ReplyValidator,
    clean_text,
    reply_arrays,
    split_evaluation,
)
from fedbrats.server.round_record import LATE, evaluation_fields, mean_dice, progress_line
from fedbrats.server.screening import attack_marks, screen_replies, site_steps
from fedbrats.server.state import (
    ResumeError,
    ServerState,
    check_resume_config,
    checkpoint_rounds,
    load_state,
    save_state,
    weights_digest,
    write_run_config,
)
from fedbrats.server.tracking import start_tracker
from fedbrats.server.update_checks import conform_aggregate, from_wire, update_problem
from fedbrats.shared.atomic import atomic_write_json
from fedbrats.shared.config import RunConfig
from fedbrats.shared.records import record_nbytes
from fedbrats.shared.tasks import histogram_shape, task_for
from fedbrats.shared.wallclock import SiteTiming, timing_for
from fedbrats.strategies.arithmetic import ordered
from fedbrats.strategies.hooks import hooks_of
from fedbrats.strategies.selection import (
    epochs_at,
    parse_lr_round_schedule,
    predict_round_seconds,
    round_lr,
    select_all,
    select_by_deadline,
    select_fastest,
    select_fraction,
)

log = logging.getLogger("fedbrats.server")
__all__ = ["LATE", "Federation", "SiteResult", "mean_dice", "progress_line"]  # round_record's, named here as before


class SelectedSites:
    """A view of the grid that shows the strategy only the sites we selected for this round."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid = grid
        self._node_ids = list(node_ids)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


@dataclass
class SiteResult:
    node_id: int
    site: str
    metrics: dict[str, float] = field(default_factory=dict)
    dropped: str | None = None
    histograms: Any = None  # evaluation of a task that classifies: the site's score histograms (np.int64)
    down_bytes: int | None = None  # the model as sent to the site, and the update as it came back (simulated clock)
    up_bytes: int | None = None


def new_run_key() -> str:
    """A fresh run's identity: sites key what they keep between messages by it, so a new run at a
    hospital starts clean while a resumed one (even under a new Flower run id) finds its state."""
    return uuid.uuid4().hex[:16]


def _destinations(messages: list[Message]) -> dict[str, int]:
    """Message id -> the node it went to (ids are set by the grid when it sends)."""
    return {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}


def _reply_node(reply: Message, destinations: dict[str, int]) -> int:
    """The site a reply answers for. When a SuperNode is gone, the SuperLink itself writes the error
    reply ("node unavailable") with its own node id as the source; the reply still names our message."""
    return destinations.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


class Federation:
    """One federated run, resumable from its output folder."""

    def __init__(
        self,
        grid: Grid,
        config: RunConfig,
        strategy: Strategy,
        initial_arrays: ArrayRecord,
        *,
        timings: dict[str, SiteTiming] | None = None,
        out_dir: Path | None = None,
        simulated: bool = True,
        frozen: frozenset[str] = frozenset(),
    ) -> None:
        self.grid = grid
        self.config = config
        self.strategy = strategy
        self.hooks = hooks_of(strategy)  # what the loop asks beyond Flower's Strategy (strategies.hooks)
        parse_lr_round_schedule(config.lr_round_schedule)  # a bad schedule fails here, not in round 1
        self.arrays = initial_arrays
        self.timings = timings or {}
        self.simulated = simulated  # a deployed run has real sites and no timing model: wall time only
        self.frozen = frozen  # parameters the run does not train (`trainable`): no site may change them
        self.out_dir = Path(out_dir or config.out_dir)
        self.history = RunHistory(self.out_dir / "history.jsonl")
        self.node_names: dict[int, str] = {}
        self.sizes: dict[int, tuple[int, int]] = {}  # node -> (training cases, validation cases)
        self.start_round = 0
        self.simulated_seconds = 0.0
        self.run_key = ""  # the run's identity at every site, kept across resumes (set by _resume)
        self.incoming_evaluation: list[SiteResult] | None = None
        self._names_written: dict[int, str] = {}
        self._resume()
        # Replies are validated as data first (server.replies), which owns the node -> site-name map and sizes.
        self.replies = ReplyValidator.for_run(config, self.hooks.required_metrics)
        self.replies.restore(self.history.records())
        self.node_names = self.replies.names

    # --- resume -----------------------------------------------------------------------
    def _resume(self) -> None:
        """Continue after the newest intact checkpoint, or start a fresh run; never restart one silently.

        A fresh run writes its configuration and a round-0 checkpoint at once, so a folder with history
        but no checkpoint is always damage (ResumeError), never "start again". Resuming checks the
        stored configuration (`check_resume_config`) and records an accepted override in the history.
        """
        server_dir = self.out_dir / "server"
        state = load_state(server_dir)
        if state is None or (state.round == 0 and not self.history.records()):
            if state is None:
                self._refuse_orphaned_history(server_dir)
            self.history.truncate_after(0)
            write_run_config(self.out_dir, self.config)
            self.run_key = new_run_key()
            self._checkpoint(0)
            return
        changes = check_resume_config(self.out_dir, self.config, state.round)
        self.arrays = state.arrays
        self.start_round = state.round
        self.simulated_seconds = float(state.meta.get("simulated_seconds", 0.0))
        self.run_key = str(state.meta.get("run_key") or new_run_key())  # runs saved before run keys get one now
        self.history.truncate_after(state.round)
        if state.skipped:
            self.history.append_event("checkpoint-fallback", after_round=state.round, skipped=state.skipped)
        if changes:
            self.history.append_event("resume-override", after_round=state.round, changes=changes)
        write_run_config(self.out_dir, self.config)
        if state.round > 0:
            self.hooks.load_state_dict(state.strategy_arrays, state.strategy_meta)
        log.info("resuming after round %d (weights %s)", state.round, weights_digest(state.arrays)[:12])

    def _refuse_orphaned_history(self, server_dir: Path) -> None:
        """History or round files without server_state.json: resuming would restart at round 0 and lose them."""
        lines = len(scan_history(self.history.path).lines)
        rounds = checkpoint_rounds(server_dir)
        if not lines and not rounds:
            return
        found = [f"{self.history.path} ({lines} lines)"] * bool(lines) + [f"checkpoints of rounds {rounds}"] * bool(rounds)
        raise ResumeError(
            f"{self.out_dir} holds {' and '.join(found)} but no {server_dir / 'server_state.json'}, which says "
            f"which round the run completed; starting again would overwrite the run. To start over, remove "
            f"{self.out_dir} or choose another --out"
        )

    def _checkpoint(self, rnd: int) -> None:
        strategy_arrays, strategy_meta = ({}, {})
        if rnd > 0:
            strategy_arrays, strategy_meta = self.hooks.state_dict()
        meta = {
            "simulated_seconds": self.simulated_seconds,
            "history_rounds": rnd,
            "digest": weights_digest(self.arrays),
            "run_key": self.run_key,
        }
        save_state(self.out_dir / "server", ServerState(rnd, self.arrays, meta, strategy_arrays, strategy_meta))

    # --- one round ----------------------------------------------------------------------
    def _wait_for_sites(self) -> list[int]:
        deadline = time.monotonic() + self.config.timeout
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= self.config.min_sites or time.monotonic() > deadline:
                return nodes
            time.sleep(0.5)

    def _epochs(self, rnd: int) -> int:
        return epochs_at(rnd, self.config.local_epochs, decay=self.config.epoch_decay)

    def _select(self, rnd: int, nodes: list[int]) -> list[int]:
        """The FeTS site-selection hooks: all, a random fraction, the fastest k, or a deadline."""
        c = self.config
        if c.selection == "all":
            return select_all(nodes)
        if c.selection == "fraction":
            return select_fraction(nodes, c.fraction_train, min_sites=c.min_sites, seed=c.seed, server_round=rnd)
        predicted = predict_round_seconds(nodes, self.node_names, self.sizes, self.timings, self._epochs(rnd),
                                          payload_bytes=record_nbytes(self.arrays))  # fmt: skip
        if c.selection == "fastest":
            return select_fastest(nodes, predicted, max(c.min_sites, c.select_k or (len(nodes) + 1) // 2))
        return select_by_deadline(nodes, predicted, c.deadline_seconds, min_sites=c.min_sites)

    def _train_config(self, rnd: int) -> ConfigRecord:
        """The FeTS per-round hooks (lr and epochs), then the strategy's own instructions."""
        c = self.config
        config = ConfigRecord(
            {
                "server-round": rnd,
                "run-key": self.run_key,
                "lr": round_lr(rnd, c.lr, c.lr_round_schedule, rounds=c.rounds),
                "local-epochs": self._epochs(rnd),
                "local-steps": c.local_steps,
            }
        )
        if self._evaluates_incoming(rnd):
            config["evaluate-incoming"] = True
        return self.hooks.train_config(rnd, config)

    def _evaluated(self, rnd: int) -> bool:
        """Whether round `rnd`'s global model is evaluated (every `eval-every` rounds, and the last one)."""
        return rnd % self.config.eval_every == 0 or rnd == self.config.rounds

    def _evaluates_incoming(self, rnd: int) -> bool:
        """evaluate-in-train: round `rnd`'s training messages also evaluate round rnd - 1's model
        (one message per site and round); the last round's model still gets an evaluate message."""
        return self.config.evaluate_in_train and rnd > 1 and self._evaluated(rnd - 1)

    def train_round(self, rnd: int, selected: list[int]) -> tuple[list[SiteResult], dict[str, Any]]:
        view = SelectedSites(self.grid, selected)
        messages = list(self.strategy.configure_train(rnd, self.arrays, self._train_config(rnd), view))
        replies = send_and_receive(self.grid, messages, self.config.timeout, simulated=self.simulated)
        destinations = _destinations(messages)
        answered = {_reply_node(r, destinations) for r in replies}
        pairs = [(r, _reply_node(r, destinations)) for r in replies]
        if self._evaluates_incoming(rnd):  # what the replies say of the incoming model: round rnd - 1's evaluation
            self.incoming_evaluation = self._check_evaluations(
                rnd - 1, [(split_evaluation(r), node) for r, node in pairs], {m.metadata.dst_node_id for m in messages}
            )
        results, usable = [], []
        sent, wire_bytes = {m.metadata.dst_node_id: m.content["arrays"] for m in messages}, {}
        for checked in self.replies.check_round(TRAIN, pairs, reply_arrays(messages)):
            result = SiteResult(checked.node, checked.site, checked.metrics, checked.problem)
            if checked.node in sent:
                result.down_bytes = record_nbytes(sent[checked.node])
            if result.dropped is None:  # the bytes as they travelled, then float32 weights (update-dtype)
                wire_bytes[checked.node] = result.up_bytes = record_nbytes(checked.reply.content.array_records["arrays"])
                result.dropped = from_wire(checked.reply, sent.get(checked.node), self.config.update_dtype)
            if result.dropped is None:
                result.dropped = update_problem(checked.reply, self.arrays, self.frozen) or self._strategy_problem(checked.reply)
            if "num-examples" in result.metrics:
                self.sizes[result.node_id] = (int(result.metrics["num-examples"]), int(result.metrics.get("num-val", 0)))
            if result.dropped:
                log.warning("round %d: dropped update of %s: %s", rnd, result.site, result.dropped)
            else:
                usable.append((checked.reply, result))
            results.append(result)
        for node in sorted(set(selected) - answered):
            results.append(SiteResult(node, self.replies.site(node), dropped=LATE))
        info: dict[str, Any] = {"screening": self._screen(rnd, usable)}
        good = [reply for reply, result in usable if not result.dropped]
        info["bytes_sent"] = sum(sum(record_nbytes(r) for r in m.content.array_records.values()) for m in messages)
        info["bytes_received"] = sum(wire_bytes[result.node_id] for _, result in usable if not result.dropped)
        needed = max(self.config.min_sites, self.hooks.min_replies)  # Bulyan: 4f + 3
        if len(good) < needed:
            short = f"min_sites={needed}" if needed == self.config.min_sites else f"the {needed} {self.config.strategy} needs"
            info["status"] = f"failed: {len(good)} usable updates, fewer than {short}"
            log.error("round %d %s; the global model is unchanged", rnd, info["status"])
            return results, info
        # Replies in site order: aggregation (float sums) must not depend on arrival order,
        # or a resumed run would not reproduce the weights of an uninterrupted one.
        try:
            arrays, aggregated = self.strategy.aggregate_train(rnd, ordered(good))
            problem = "the strategy returned no aggregate" if arrays is None else None
        except (ValueError, ArithmeticError, InconsistentMessageReplies) as err:  # a round fails, never the run
            log.exception("round %d: %s could not aggregate", rnd, self.config.strategy)
            arrays, aggregated = None, None
            problem = f"the strategy could not aggregate: {type(err).__name__}: {clean_text(err)}"
        if aggregated and "client-epsilon" in aggregated:  # client-level DP; `privacy audit` recomputes it
            info["client_epsilon"], info["client_dp"] = float(aggregated["client-epsilon"]), self.strategy.privacy_report()
        if arrays is not None:
            arrays, problem = conform_aggregate(arrays, self.arrays, self.frozen)
        if problem:
            info["status"] = f"failed: {problem}"
            log.error("round %d %s; the global model is unchanged", rnd, info["status"])
            return results, info
        self.arrays = arrays
        info["status"] = "ok"
        return results, info

    def _screen(self, rnd: int, usable: list[tuple[Message, SiteResult]]) -> dict[str, Any]:
        """Screen the round's updates (server.screening); a screened update is dropped with its reason."""
        c = self.config
        if not c.screen_updates:
            return {"note": "off (screen-updates = false)"}
        if c.client_dp_noise_multiplier > 0:
            return {"note": "skipped: client-level DP clips every update; dropping by the round's median "
                            "would let one site change which others count"}  # fmt: skip
        steps = site_steps([r.metrics for _, r in usable], c, epochs=self._epochs(rnd))
        verdict = screen_replies([reply for reply, _ in usable], self.arrays, norm_factor=c.screen_norm_factor,
                                 min_cosine=c.screen_min_cosine, steps=steps)  # fmt: skip
        for index, reason in verdict.dropped.items():
            usable[index][1].dropped = reason
            log.warning("round %d: dropped update of %s: %s", rnd, usable[index][1].site, reason)
        return verdict.record([result.site for _, result in usable])

    def _strategy_problem(self, reply: Message) -> str | None:
        """A strategy's own needs (e.g. FedPIDAvg's loss metrics) drop one site, not the round."""
        return None if reply.has_error() else self.hooks.reply_problem(reply)

    def evaluate_round(self, rnd: int, nodes: list[int]) -> list[SiteResult]:
        config = self.hooks.evaluate_config(rnd, ConfigRecord({"server-round": rnd, "run-key": self.run_key}))
        messages = list(self.strategy.configure_evaluate(rnd, self.arrays, config, SelectedSites(self.grid, nodes)))
        replies = send_and_receive(self.grid, messages, self.config.timeout, simulated=self.simulated)
        destinations = _destinations(messages)
        pairs = [(r, _reply_node(r, destinations)) for r in replies]
        return self._check_evaluations(rnd, pairs, {m.metadata.dst_node_id for m in messages})

    def _check_evaluations(self, rnd: int, pairs: list[tuple[Any, int]], asked: set[int]) -> list[SiteResult]:
        """Validated evaluations of round `rnd`'s model (evaluate replies, or what training replies carried)."""
        results = []
        for c in self.replies.check_round(EVALUATE, pairs):
            histograms = self._histograms(c)  # may drop the reply: read before c.problem
            results.append(SiteResult(c.node, c.site, c.metrics, c.problem, histograms))
        for result in results:
            if result.dropped:
                log.warning("round %d: dropped evaluation of %s: %s", rnd, result.site, result.dropped)
        answered = {r.node_id for r in results}
        for node in sorted(asked - answered):
            results.append(SiteResult(node, self.replies.site(node), dropped=LATE))
        return results

    def _histograms(self, checked: Any) -> Any:
        """A validated evaluation's score histograms, or None; a shape other than the run's classes drops it."""
        if checked.problem is not None or "scores" not in checked.reply.content.array_records:
            return None
        histograms = checked.reply.content["scores"]["histograms"].numpy()
        expected = histogram_shape(self.config.model_classes)
        if not task_for(self.config).classifies or histograms.shape != expected:
            checked.problem = f"score histograms of shape {histograms.shape}, expected {expected} for this run"
            return None
        return histograms

    def _attack_mark(self, site: str) -> dict[str, str]:
        """A simulated attacker's train entry says so (the configuration names the attacking sites)."""
        attack = attack_marks(self.config).get(site)
        return {"attack": attack} if attack else {}

    def _round_seconds(self, rnd: int, results: list[SiteResult]) -> float:
        times = []
        for r in results:
            if r.dropped:
                continue
            timing = timing_for(self.timings, r.site)
            # the steps the site says it ran, when it runs a fixed number; never more than were asked for
            steps = min(float(r.metrics.get("local-steps") or 0), self.config.local_steps)
            cases = steps * self.config.batch_size if self.config.local_steps > 0 and steps > 0 else None
            times.append(timing.round_seconds(int(r.metrics.get("num-examples", 0)), int(r.metrics.get("num-val", 0)),
                                              self._epochs(rnd), down_bytes=r.down_bytes, up_bytes=r.up_bytes,
                                              train_cases=cases))  # fmt: skip
        return max(times, default=0.0)

    def run(self) -> ArrayRecord:
        tracker = start_tracker(self.config, self.out_dir, self.history.records())  # TensorBoard/MLflow, if asked
        for rnd in range(self.start_round + 1, self.config.rounds + 1):
            started = time.monotonic()
            self.incoming_evaluation = None  # evaluate-in-train: round rnd - 1's evaluation, set by train_round
            nodes = self._wait_for_sites()
            selected = self._select(rnd, nodes)
            train_results, info = self.train_round(rnd, selected)
            round_seconds = self._round_seconds(rnd, train_results) if self.simulated else 0.0
            self.simulated_seconds += round_seconds
            evaluated = []
            pending = self.config.evaluate_in_train and self._evaluated(rnd) and rnd < self.config.rounds
            if self._evaluated(rnd) and not pending:
                evaluated = self.evaluate_round(rnd, sorted(self.grid.get_node_ids()))
                info["bytes_sent"] += record_nbytes(self.arrays) * len(evaluated)
            record = {
                "round": rnd,
                **info,
                "selected": len(selected),
                "available": len(nodes),
                "wall_seconds": time.monotonic() - started,
                "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
                **({"simulated_round_seconds": round_seconds, "simulated_seconds": self.simulated_seconds}
                   if self.simulated else {}),
                "train": [{"site": r.site, "dropped": r.dropped, **r.metrics} | self._attack_mark(r.site) for r in train_results],
                **evaluation_fields(self.config, evaluated),
            }
            if pending:
                record["evaluation_pending"] = f"in round {rnd + 1}'s training replies (evaluate-in-train)"
            # Report work, after the round's clock: the previous round's evaluation, history, checkpoint.
            if self.incoming_evaluation is not None:
                self._record_incoming(rnd - 1, self.incoming_evaluation, rnd, tracker)
            self.history.append(record)
            if not pending:
                tracker.log_round(record)  # the same record: one source of metrics
            if self.node_names != self._names_written:
                # which Flower node id is which hospital (`flwr supernode list` shows ids only), from the replies' names
                atomic_write_json(self.out_dir / "node_sites.json", {str(n): name for n, name in sorted(self.node_names.items())})
                self._names_written = dict(self.node_names)
            self._checkpoint(rnd)
            log.info(progress_line(record, self.config.rounds))
        tracker.close()
        return self.arrays

    def _record_incoming(self, evaluated_round: int, results: list[SiteResult], rnd: int, tracker: Any) -> None:
        """evaluate-in-train: write round `evaluated_round`'s evaluation, carried by round `rnd`'s training
        replies, into that round's own history record (reports read each round's evaluation there)."""
        earlier = [r for r in self.history.records() if r.get("round") == evaluated_round]
        if not earlier:
            log.warning("round %d's evaluation arrived in round %d but its history record is missing", evaluated_round, rnd)
            return
        record = {k: v for k, v in earlier[-1].items() if k != "evaluation_pending"}
        record.update(evaluation_fields(self.config, results), evaluated_in_round=rnd)
        self.history.replace_round(record)
        tracker.log_round(record)
        log.info("round %d's global model evaluated with round %d's training: %s", evaluated_round, rnd,
                 progress_line(record, self.config.rounds).split(" | ", 1)[-1])  # fmt: skip
