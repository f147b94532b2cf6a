"""The Flower ClientApp: a site trains and evaluates the global model on its own cases.

Only weights and aggregate metrics leave the site: replies carry an ArrayRecord, a MetricRecord
of numbers and the site's name; never case identifiers, file paths or voxels. What is learnt (the
loss, the evaluation) comes from the run's task (`shared.tasks`); an evaluation of a task that
classifies also carries the site's score histograms (ArrayRecord "scores", array "histograms"), from
which the server pools the AUC over sites: counts per class and score bin, no per-case score. Errors sent to the
server say what is wrong in general terms; the details (which case, which file) stay in the
site's log.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedbrats.client.algorithms import CONTROL, CONTROL_DELTA, ControlVariate, LocalNorms
from fedbrats.client.attack import attacked_site, misbehave
from fedbrats.client.ledger import PrivacyLedger
from fedbrats.client.privacy_plan import DPConfig, PrivacyBudgetExhausted, eval_metrics_released
from fedbrats.client.settings import model_for, start_step, train_config
from fedbrats.client.site import Site, SiteError, cached_site, run_key
from fedbrats.client.trainer import get_device, loss_on, lr_at, train_local
from fedbrats.shared.config import RunConfig
from fedbrats.shared.models.trainable import apply_trainable
from fedbrats.shared.tasks import task_for
from fedbrats.shared.wire import encode_update
from fedbrats.strategies.arithmetic import array_view, to_array

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
log = logging.getLogger("fedbrats.client")

app = ClientApp()

#: The evaluate reply's record of score histograms (tasks that classify), and its one array.
SCORES, HISTOGRAMS = "scores", "histograms"
#: With `evaluate-in-train`, a train reply also carries the site's evaluation of the incoming global
#: model: its metrics (and SCORES), or, when the site cannot evaluate, why (a config record "reason").
EVALUATION, EVALUATION_ERROR = "evaluation", "evaluation-error"

#: Error codes a site sends; the server records the reason next to the site's name.
SITE_UNUSABLE = 1001
SITE_FAILED = 1002
PRIVACY_BUDGET_EXHAUSTED = 1003


def _reply(msg: Message, site: Site, metrics: dict[str, float], arrays: Any = None) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site.name})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=msg)


def _error(msg: Message, code: int, reason: str) -> Message:
    return Message(Error(code=code, reason=reason), reply_to=msg)


#: Idle models of this process, one per run configuration: building a model costs as much as a tiny
#: model's whole round, and a simulated site's Ray worker (or a hospital's ClientApp) answers many messages.
_IDLE_MODELS: dict[str, torch.nn.Module] = {}
#: The last run configuration parsed by this process, by its flat Flower items (a site answers many messages
#: of one run; parsing and checking ~100 keys every message cost a millisecond of its overhead).
_LAST_CONFIG: dict[tuple, RunConfig] = {}


def _run_config(context: Context) -> RunConfig:
    items = dict(context.run_config)
    key = tuple(sorted(items.items()))
    config = _LAST_CONFIG.get(key)
    if config is None:
        config = RunConfig.from_flower(items)
        _LAST_CONFIG.clear()
        _LAST_CONFIG[key] = config
    return config


def _model(msg: Message, config: RunConfig) -> tuple[torch.nn.Module, str]:
    """The run's model holding the message's weights (strict names), reusing an idle one of this
    process; returns it with its pool key, for `_release`.

    A model in use is taken out of the pool and only a handler that finished cleanly gives it back
    (`_release`), so a failure, a gradient hook (SCAFFOLD) or Opacus's wrapping never reaches a later message.
    `trainable` is applied to every parameter each message: a reused model keeps no earlier run's freezing."""
    key = _model_key(config)
    model = _IDLE_MODELS.pop(key, None) or model_for(config)
    with torch.no_grad():  # the bytes' own view, one copy into the parameters (no .npy parsing per array)
        state = {name: torch.from_numpy(array_view(array).copy()) for name, array in msg.content["arrays"].items()}
    model.load_state_dict(state, strict=True)
    apply_trainable(model, config.trainable)  # frozen: requires_grad False before Adam and Opacus see the model
    return model, key


def _model_key(config: RunConfig) -> str:
    return json.dumps([config.model, config.model_config], sort_keys=True, default=str)


def _release(model: torch.nn.Module, key: str) -> None:
    model.zero_grad(set_to_none=True)
    _IDLE_MODELS[key] = model


def _weights(model: torch.nn.Module) -> ArrayRecord:
    """The model's state as fp32 (float) arrays, serialised with one copy (`strategies.arithmetic.to_array`)."""
    return ArrayRecord({
        name: to_array((value.detach().float() if value.is_floating_point() else value.detach()).cpu().numpy())
        for name, value in model.state_dict().items()
    })  # fmt: skip


def _server_round(msg: Message) -> int:
    server_round = int(msg.content["config"].get("server-round", 0))
    if server_round < 1:
        raise ValueError(f"the server's message carries no valid server-round (got {server_round})")
    return server_round


def handle_train(msg: Message, context: Context) -> Message:
    config = _run_config(context)
    honest = cached_site(dict(context.node_config), config)
    site = attacked_site(config, dict(context.node_config), honest)  # a simulated attack changes training only
    if len(site.train) == 0:
        return _error(msg, SITE_UNUSABLE, f"site {site.name} has no usable training case ({site.skipped_count} skipped)")
    round_config = msg.content["config"]
    server_round = _server_round(msg)
    run = run_key(msg.metadata.run_id, config, msg.content["config"].get("run-key", ""))
    incoming = msg.content["arrays"]
    model, key = _model(msg, config)
    task = task_for(config)
    norms = LocalNorms(site.run_dir(run)) if round_config.get("fedbn", False) else None
    if norms:
        norms.apply(model, upto_round=server_round - 1)
    # evaluate-in-train: the incoming model (the previous round's global one, with this site's own norms
    # under FedBN, as an evaluate message would score it) is scored before it trains: no second message.
    evaluation = _evaluation(model, honest, config) if round_config.get("evaluate-incoming", False) else None
    control = (
        ControlVariate(site.run_dir(run), msg.content[CONTROL], server_round, config.control_average)
        if CONTROL in msg.content.array_records else None
    )  # fmt: skip
    # The schedule position follows from the round alone: a repeated or discarded round cannot move it.
    first_step = start_step(config, len(site.train), server_round)
    local = train_config(config, len(site.train), dict(round_config))
    device = get_device("auto")
    metrics: dict[str, float] = {}
    report_loss = bool(round_config.get("report-loss", False))
    if report_loss and config.dp:
        raise SiteError("the strategy asks for raw training losses, which DP-SGD does not protect; use another strategy")
    loss_batches = min(4, len(site.train))
    if report_loss:
        metrics["loss-before"] = loss_on(model, site.train, loss_batches, seed=config.seed + server_round, device=device,
                                         loss_fn=task.loss)  # fmt: skip
    if config.dp:
        from fedbrats.client.privacy import train_private  # Opacus: paid by DP sites only, when they train

        result = train_private(
            model, site.train, local, DPConfig.from_run_config(config),
            PrivacyLedger.for_site(dict(context.node_config), site.name, site.work_dir),  # keyed to the site, not a folder
            round=server_round, run_id=run, start_step=first_step, device=device, loss_fn=task.loss,
            grad_correction=control.correction() if control else None, on_gradient=control.observe if control else None,
        )  # fmt: skip
        metrics.update(result.metrics())
    else:
        if control:
            control.attach(model)
        result = train_local(model, site.train, local, start_step=first_step, device=device, loss_fn=task.loss)
    if report_loss:
        metrics["loss-after"] = loss_on(model, site.train, loss_batches, seed=config.seed + server_round, device=device,
                                        loss_fn=task.loss)  # fmt: skip
    _record_round(site, run, msg, config, server_round, first_step, result)
    if not config.dp:  # a raw loss is not protected by DP-SGD's noise
        metrics["train-loss"] = result.mean_loss
    metrics.update(
        {
            "num-examples": len(site.train),
            "num-val": len(site.val),
            "examples-seen": result.examples,
            "local-steps": result.steps,
            "seconds": result.seconds,
            "lr": result.last_lr,
            "skipped-cases": site.skipped_count,
        }
    )
    reply = _weights(model)
    if norms:
        norms.keep(model, server_round)
        reply = LocalNorms.hide(model, reply, incoming)
    reply, metrics = misbehave(config, dict(context.node_config), site.name, incoming, reply, metrics, server_round)
    out = _reply(msg, site, metrics, encode_update(incoming, reply, config.update_dtype))  # shared.wire
    if control:
        steps = max(result.steps, 1)
        mean_lr = sum(lr_at(s, local) for s in range(first_step, first_step + steps)) / steps
        out.content[CONTROL_DELTA] = control.finish(model, incoming, steps, mean_lr)
    if evaluation is not None:
        _attach(out, evaluation)
    if not (config.dp or control):  # Opacus wrapped it, SCAFFOLD hooked it: those models are not reused
        _release(model, key)
    return out


def _evaluation(model: torch.nn.Module, site: Site, config: RunConfig) -> tuple[dict[str, float], Any] | str:
    """The site's evaluation of `model`: (metrics, score histograms or None), or why it has none to send."""
    if len(site.val) == 0:
        return f"site {site.name} has no usable validation case"
    if config.dp and not eval_metrics_released(len(site.val), config.dp_eval_metrics, config.dp_eval_min_cases):
        return {"num-examples": len(site.val), "eval-seconds": 0.0}, None  # nothing per patient leaves
    metrics = task_for(config).evaluate(model, site.val, config, get_device("auto"))
    histograms = metrics.pop(HISTOGRAMS, None)
    for metric, reason in metrics.pop("reasons", {}).items():
        log.info("site %s: %s (%s)", site.name, reason, metric)  # e.g. a single-class site's AUC
    metrics["num-examples"] = len(site.val)
    return metrics, histograms if not config.dp else None  # under DP-SGD a site releases means only (README, Privacy)


def _attach(out: Message, evaluation: tuple[dict[str, float], Any] | str) -> None:
    """Put an evaluation into a train reply (evaluate-in-train): EVALUATION metrics and SCORES, or the reason."""
    if isinstance(evaluation, str):
        out.content[EVALUATION_ERROR] = ConfigRecord({"reason": evaluation})
        return
    metrics, histograms = evaluation
    out.content[EVALUATION] = MetricRecord(metrics)
    if histograms is not None:
        out.content[SCORES] = ArrayRecord({HISTOGRAMS: Array(histograms)})


def handle_evaluate(msg: Message, context: Context) -> Message:
    config = _run_config(context)
    site = cached_site(dict(context.node_config), config)
    if len(site.val) == 0:
        return _error(msg, SITE_UNUSABLE, f"site {site.name} has no usable validation case")
    model, key = _model(msg, config)
    if msg.content["config"].get("fedbn", False):  # each site is scored with its own normalisation
        LocalNorms(site.run_dir(run_key(msg.metadata.run_id, config, msg.content["config"].get("run-key", "")))).apply(model, upto_round=_server_round(msg))
    evaluation = _evaluation(model, site, config)
    _release(model, key)
    if isinstance(evaluation, str):
        return _error(msg, SITE_UNUSABLE, evaluation)
    metrics, histograms = evaluation
    out = _reply(msg, site, metrics)
    if histograms is not None:
        out.content[SCORES] = ArrayRecord({HISTOGRAMS: Array(histograms)})
    return out


def _record_round(
    site: Site, run: str, msg: Message, config: RunConfig, server_round: int, first_step: int, result: Any
) -> None:
    """Note in the run's state what this round did (for the site's operator; nothing reads it back to train)."""
    state = site.load_state(run) or {"run-id": str(msg.metadata.run_id), "config": config.to_flower(), "rounds": {}}
    if str(server_round) in state["rounds"]:
        log.info("round %d of run %s trained again (the server restarted?): same start step %d",
                 server_round, run, first_step)  # fmt: skip
    state["rounds"][str(server_round)] = {
        "start-step": first_step, "end-step": result.end_step, "steps": result.steps, "last-lr": result.last_lr,
    }  # fmt: skip
    site.save_state(run, state)


def summary_line(kind: str, msg: Message, reply: Message, seconds: float) -> str:
    """The site operator's one line per message: round, cases used and skipped, loss or Dice, seconds."""
    config = msg.content.config_records.get("config")
    head = f"{kind} round {config.get('server-round', '?') if config else '?'}"
    if reply.has_error():
        return f"{head}: error {reply.error.code}: {reply.error.reason} | {seconds:.1f} s"
    site = reply.content.config_records.get("site")
    metrics = reply.content.metric_records.get("metrics") or {}
    parts = [f"site {site.get('name', '?') if site else '?'}", f"cases used {int(metrics.get('num-examples', 0))}"]
    if "skipped-cases" in metrics:
        parts.append(f"skipped {int(metrics['skipped-cases'])}")
    for key in ("train-loss", "dice-WT"):
        if key in metrics:
            parts.append(f"{key.replace('-', ' ')} {float(metrics[key]):.4f}")
    return f"{head}: " + ", ".join(parts) + f" | {seconds:.1f} s"


def _guarded(handler):
    """A failure at a site becomes an error reply, never a crashed node; each message ends with a summary line."""

    def run(msg: Message, context: Context) -> Message:
        started = time.monotonic()
        reply = _answer(msg, context)
        log.info(summary_line(handler.__name__.removeprefix("handle_"), msg, reply, time.monotonic() - started))
        return reply

    def _answer(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except PrivacyBudgetExhausted as err:
            log.warning("privacy budget: %s", err)
            return _error(msg, PRIVACY_BUDGET_EXHAUSTED, f"budget exhausted: {err}")
        except SiteError as err:
            log.error("site unusable: %s", err)
            return _error(msg, SITE_UNUSABLE, str(err))
        except Exception as err:  # noqa: BLE001 - reported to the server, detailed in the site's log
            log.error("site failed:\n%s", traceback.format_exc())
            return _error(msg, SITE_FAILED, f"{type(err).__name__} during {handler.__name__.removeprefix('handle_')}")

    run.__name__ = handler.__name__
    return run


app.train()(_guarded(handle_train))
app.evaluate()(_guarded(handle_evaluate))
