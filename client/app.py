"""The Flower ClientApp: a site trains and evaluates the global model on its own cases.

Only weights and aggregate metrics leave the site: replies carry an ArrayRecord, a MetricRecord
of numbers and the site's name; never case identifiers, file paths or voxels. Errors sent to the
server say what is wrong in general terms; the details (which case, which file) stay in the
site's log.
"""

from __future__ import annotations

import logging
import math
import os
import traceback
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedbrats.client.algorithms import CONTROL, CONTROL_DELTA, ControlVariate, LocalNorms
from fedbrats.client.ledger import PrivacyLedger
from fedbrats.client.privacy import DPConfig, PrivacyBudgetExhausted, round_steps, train_private
from fedbrats.client.site import Site, SiteError, cached_site
from fedbrats.client.trainer import (
    TrainConfig,
    evaluate_local,
    flat_metrics,
    get_device,
    loss_on,
    lr_at,
    train_local,
)
from fedbrats.shared.config import RunConfig
from fedbrats.shared.models import create_model
from fedbrats.shared.records import model_to_record, record_to_model

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
log = logging.getLogger("fedbrats.client")

app = ClientApp()

#: Error codes a site sends; the server records the reason next to the site's name.
SITE_UNUSABLE = 1001
SITE_FAILED = 1002
PRIVACY_BUDGET_EXHAUSTED = 1003


def steps_per_round(site: Site, config: RunConfig) -> int:
    if config.local_steps > 0:
        return config.local_steps
    if config.dp:  # Opacus counts an epoch as int(1/q) Poisson steps
        return round_steps(len(site.train), config.batch_size, epochs=config.local_epochs)
    return config.local_epochs * max(1, math.ceil(len(site.train) / config.batch_size))


def _reply(msg: Message, site: Site, metrics: dict[str, float], arrays: Any = None) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site.name})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=msg)


def _error(msg: Message, code: int, reason: str) -> Message:
    return Message(Error(code=code, reason=reason), reply_to=msg)


def _model(msg: Message, config: RunConfig):
    model = create_model(config.model, **config.model_config)
    return record_to_model(msg.content["arrays"], model)


def handle_train(msg: Message, context: Context) -> Message:
    config = RunConfig.from_flower(dict(context.run_config))
    site = cached_site(dict(context.node_config), config)
    if len(site.train) == 0:
        return _error(msg, SITE_UNUSABLE, f"site {site.name} has no usable training case ({site.skipped_count} skipped)")
    round_config = msg.content["config"]
    server_round = int(round_config.get("server-round", 0))
    incoming = msg.content["arrays"]
    model = _model(msg, config)
    norms = LocalNorms(site.work_dir) if round_config.get("fedbn", False) else None
    if norms:
        norms.apply(model)
    control = ControlVariate(site.work_dir, msg.content[CONTROL]) if CONTROL in msg.content.array_records else None
    state = site.load_state()
    start_step = int(state.get("step", 0))
    per_round = steps_per_round(site, config)
    train_config = TrainConfig(
        epochs=None if config.local_steps > 0 else int(round_config.get("local-epochs", config.local_epochs)),
        steps=config.local_steps or None,
        lr=float(round_config.get("lr", config.lr)),
        warmup_steps=config.warmup_steps,
        schedule=config.lr_schedule,
        total_steps=per_round * config.rounds,
        batch_size=config.batch_size,
        seed=config.seed,
        proximal_mu=float(round_config.get("proximal-mu", config.proximal_mu)),
    )
    device = get_device("auto")
    metrics: dict[str, float] = {}
    report_loss = bool(round_config.get("report-loss", False))
    if report_loss and config.dp:
        raise SiteError("the strategy asks for raw training losses, which DP-SGD does not protect; use another strategy")
    loss_batches = min(4, len(site.train))
    if report_loss:
        metrics["loss-before"] = loss_on(model, site.train, loss_batches, seed=config.seed + server_round, device=device)
    if config.dp:
        result = train_private(
            model, site.train, train_config, DPConfig.from_run_config(config), PrivacyLedger.at(site.work_dir),
            round=server_round, run_id=str(msg.metadata.run_id), start_step=start_step, device=device,
            grad_correction=control.correction() if control else None,
        )  # fmt: skip
        metrics.update(result.metrics())
    else:
        if control:
            control.attach(model)
        result = train_local(model, site.train, train_config, start_step=start_step, device=device)
    if report_loss:
        metrics["loss-after"] = loss_on(model, site.train, loss_batches, seed=config.seed + server_round, device=device)
    site.save_state({**state, "step": result.end_step, "last_round": server_round})
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
    reply = model_to_record(model)
    if norms:
        norms.keep(model)
        reply = LocalNorms.hide(model, reply, incoming)
    out = _reply(msg, site, metrics, reply)
    if control:
        steps = max(result.steps, 1)
        mean_lr = sum(lr_at(s, train_config) for s in range(start_step, start_step + steps)) / steps
        out.content[CONTROL_DELTA] = control.finish(model, incoming, steps, mean_lr)
    return out


def handle_evaluate(msg: Message, context: Context) -> Message:
    config = RunConfig.from_flower(dict(context.run_config))
    site = cached_site(dict(context.node_config), config)
    if len(site.val) == 0:
        return _error(msg, SITE_UNUSABLE, f"site {site.name} has no usable validation case")
    model = _model(msg, config)
    if msg.content["config"].get("fedbn", False):
        LocalNorms(site.work_dir).apply(model)  # each site is scored with its own normalisation
    evaluation = evaluate_local(model, site.val, patch_size=config.patch, device=get_device("auto"))
    metrics = {k.replace("_", "-"): v for k, v in flat_metrics(evaluation).items()}
    metrics.update({"num-examples": len(site.val), "eval-seconds": evaluation["seconds"]})
    return _reply(msg, site, metrics)


def _guarded(handler):
    """A failure at a site becomes an error reply, never a crashed node."""

    def run(msg: Message, context: Context) -> Message:
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
