"""Experiment tracking: every round record, as the history holds it, also goes to TensorBoard or MLflow.

The history (`server.history`) stays the run's record of truth; a tracker is a live view of it for a
dashboard. So the metrics are read from the round record in one place (`round_metrics`), never
recomputed, and a tracker that cannot write (a tracking server down for an hour of a week-long
federation) costs a warning, not the run. Starting one is different: a wrong address fails before
round 1. tensorboard and mlflow are imported only when chosen (`tracking = "none"` imports neither).

Where it writes: TensorBoard event files in ``OUT/tensorboard``; MLflow a local SQLite store
``OUT/mlflow.db`` (artifacts, if any, beside it) unless `tracking-uri` names a tracking server, so
nothing lands outside the run folder by default. ``OUT/tracking.json`` keeps the MLflow run id: a
resumed run continues the same MLflow run, and a run that had no tracker yet gets its past rounds first.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from fedbrats.shared.atomic import atomic_write_json
from fedbrats.shared.config import RunConfig

log = logging.getLogger("fedbrats.server")

#: The `tracking` choices (shared.config.CHOICES copies them).
TRACKERS = ("none", "tensorboard", "mlflow")
#: The run folder's note of where its rounds are tracked (the MLflow run to continue on resume).
STATE_FILE = "tracking.json"
#: MLflow's experiment for every FedBraTS run; a run's name says its strategy and seed.
EXPERIMENT = "fedbrats"
#: Round-record numbers logged once per round, as ``global/<name>`` (underscores become hyphens).
GLOBAL_KEYS = ("pooled_auc", "pooled_auc_bound", "client_epsilon", "bytes_sent", "bytes_received", "wall_seconds",
               "simulated_round_seconds", "simulated_seconds", "selected", "available")  # fmt: skip
#: Keys of a site's train/evaluate entry that are not metrics.
NOT_METRICS = frozenset({"site", "dropped", "attack", "histograms"})
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class TrackingError(RuntimeError):
    """A tracker that cannot start (package missing, store or server unreachable); says which and why."""


def round_metrics(record: dict[str, Any]) -> dict[str, float]:
    """A round record's numbers as flat metric names, e.g. ``global/dice-WT`` or ``evaluate/site-2/dice-ET``.

    Global: the mean Dice per region, the headline, pooled AUC, epsilon, bytes, simulated and wall time,
    sites selected/available/delivered. Per site: every number of its train entry (loss, epsilon, ...)
    and evaluate entry (Dice, AUC, HD95, ...), for sites not dropped. Non-finite values are left out.
    """
    metrics: dict[str, float] = {}

    def put(name: str, value: Any) -> None:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            metrics[name] = float(value)

    for region, value in (record.get("mean_dice") or {}).items():
        put(f"global/dice-{region}", value)
    headline = record.get("headline") or {}
    if headline.get("name"):
        put(f"global/headline-{headline['name']}", headline.get("value"))
    for key in GLOBAL_KEYS:
        put(f"global/{key.replace('_', '-')}", record.get(key))
    train = [e for e in record.get("train") or [] if isinstance(e, dict)]
    if train:
        put("global/delivered", sum(not e.get("dropped") for e in train))
    for phase in ("train", "evaluate"):
        for entry in record.get(phase) or []:
            if not isinstance(entry, dict) or entry.get("dropped"):
                continue
            site = _UNSAFE.sub("_", str(entry.get("site", "unknown")))
            for key, value in entry.items():
                if key not in NOT_METRICS:
                    put(f"{phase}/{site}/{_UNSAFE.sub('_', str(key))}", value)
    return metrics


def run_name(config: RunConfig) -> str:
    """Strategy, its parameters and the seed, as `fedbrats compare` names run folders: fedprox-proximal_mu0.01-seed1."""
    params = "".join(f"-{k}{v:g}" for k, v in sorted(config.strategy_params.items()))
    return f"{config.strategy}{params}-seed{config.seed}"


def local_store_uri(folder: Path) -> str:
    """The default MLflow store: SQLite inside `folder` (MLflow 3 refuses new plain-folder stores)."""
    return f"sqlite:///{(Path(folder).resolve() / 'mlflow.db').as_posix()}"


def _timestamp(record: dict[str, Any]) -> float:
    """When the round finished (seconds since the epoch): past rounds keep their own time when logged late."""
    try:
        return datetime.fromisoformat(str(record["finished_at"])).timestamp()
    except (KeyError, ValueError):
        return time.time()


class Tracker:
    """Where round metrics go besides the history: `start` once per process, `log_round` per round, `close`."""

    name = "none"

    def start(self, config: RunConfig, out_dir: Path, past: list[dict[str, Any]]) -> None:
        """Open (or continue) the run; `past` are the rounds already in the history, logged if the run is new."""

    def log_round(self, record: dict[str, Any]) -> None:
        """Log one round record; a failure is a warning, the federation goes on."""
        try:
            self._log(int(record["round"]), round_metrics(record), _timestamp(record))
        except Exception as err:  # noqa: BLE001 - a dashboard must never stop a federation
            log.warning(
                "round %s was not logged to %s: %s: %s",
                record.get("round"),
                self.name,
                type(err).__name__,
                err,
            )

    def close(self) -> None:
        """Flush and mark the run finished."""

    def _log(self, rnd: int, metrics: dict[str, float], timestamp: float) -> None:
        pass


class NullTracker(Tracker):
    """`tracking = "none"`: nothing imported, nothing written."""


class TensorBoardTracker(Tracker):
    """Scalars in ``OUT/tensorboard`` (step = round): `tensorboard --logdir OUT/tensorboard`."""

    name = "tensorboard"

    def __init__(self) -> None:
        self.writer: Any = None

    def start(self, config: RunConfig, out_dir: Path, past: list[dict[str, Any]]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise TrackingError(f"tracking = tensorboard needs the tensorboard package ({err}); "
                                "pip install 'fedbrats[tracking]'") from err  # fmt: skip
        logdir = Path(out_dir) / "tensorboard"
        new = not any(logdir.glob("events.out.tfevents.*"))
        self.writer = SummaryWriter(str(logdir))
        if new:
            flat = "\n".join(f"    {k} = {v!r}" for k, v in config.to_flower().items())
            self.writer.add_text("run-configuration", f"run {run_name(config)}\n\n{flat}", 0)
            for record in past:
                self.log_round(record)
        self.writer.flush()

    def _log(self, rnd: int, metrics: dict[str, float], timestamp: float) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=rnd, walltime=timestamp)
        self.writer.flush()  # a live dashboard sees the round now, not in two minutes

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class MLflowTracker(Tracker):
    """One MLflow run per federation (named strategy-seed), metrics with step = round, the configuration as params."""

    name = "mlflow"
    BATCH = 1000  # MLflow's limit of metrics per log_batch call (params: 100)

    def __init__(self, uri: str = "") -> None:
        self.uri = uri
        self.client: Any = None
        self.run_id = ""

    def start(self, config: RunConfig, out_dir: Path, past: list[dict[str, Any]]) -> None:
        out_dir = Path(out_dir)
        self.uri = self.uri or local_store_uri(out_dir)
        try:
            from mlflow import MlflowClient
        except ImportError as err:
            raise TrackingError(f"tracking = mlflow needs the mlflow package ({err}); "
                                "pip install 'fedbrats[tracking]'") from err  # fmt: skip
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            self.run_id = self._continued(out_dir)
            if self.run_id:
                self.client.update_run(self.run_id, status="RUNNING")
                log.info("tracking: continuing MLflow run %s at %s", self.run_id, self.uri)
                return
            self.run_id = self._create(config, out_dir)
        except TrackingError:
            raise
        except Exception as err:  # MLflow raises many kinds (MlflowException, OSError, SQL, HTTP)
            raise TrackingError(
                f"MLflow tracking at {self.uri!r} could not start: {type(err).__name__}: {err}"
            ) from err
        atomic_write_json(
            out_dir / STATE_FILE, {"tracking": self.name, "tracking_uri": self.uri, "run_id": self.run_id}
        )
        log.info("tracking: MLflow run %s (%s) at %s", self.run_id, run_name(config), self.uri)
        for record in past:
            self.log_round(record)

    def _continued(self, out_dir: Path) -> str:
        """The MLflow run this folder already logs to, if it is in the same store; else ''."""
        try:
            state = json.loads((out_dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return ""
        if (
            not isinstance(state, dict)
            or state.get("tracking") != self.name
            or state.get("tracking_uri") != self.uri
        ):
            return ""
        try:
            return self.client.get_run(str(state.get("run_id", ""))).info.run_id
        except Exception:  # noqa: BLE001 - deleted or never created: start a new run
            return ""

    def _create(self, config: RunConfig, out_dir: Path) -> str:
        from mlflow.entities import Param

        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:  # a local store keeps its artifacts beside it, never in the working directory (MLflow's default)
            local = self.uri.startswith("sqlite:///")
            artifacts = (
                (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri() if local else None
            )
            experiment_id = self.client.create_experiment(EXPERIMENT, artifact_location=artifacts)
        tags = {"strategy": config.strategy, "seed": str(config.seed), "task": config.task, "model": config.model,
                "run-folder": str(out_dir.resolve())}  # fmt: skip
        run = self.client.create_run(experiment_id, run_name=run_name(config), tags=tags)
        params = [Param(k, str(v)) for k, v in config.to_flower().items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(run.info.run_id, params=params[i : i + 100])
        return run.info.run_id

    def _log(self, rnd: int, metrics: dict[str, float], timestamp: float) -> None:
        from mlflow.entities import Metric

        ms = int(timestamp * 1000)
        batch = [Metric(key, value, ms, rnd) for key, value in metrics.items()]
        for i in range(0, len(batch), self.BATCH):
            self.client.log_batch(self.run_id, metrics=batch[i : i + self.BATCH])

    def close(self) -> None:
        if self.client is not None and self.run_id:
            try:
                self.client.set_terminated(self.run_id, status="FINISHED")
            except Exception as err:  # noqa: BLE001
                log.warning("the MLflow run %s could not be marked finished: %s", self.run_id, err)


def tracker_for(config: RunConfig) -> Tracker:
    """The tracker `config.tracking` names (nothing is imported yet)."""
    if config.tracking == "tensorboard":
        return TensorBoardTracker()
    if config.tracking == "mlflow":
        return MLflowTracker(config.tracking_uri)
    if config.tracking == "none":
        return NullTracker()
    raise ValueError(f"tracking must be one of {', '.join(TRACKERS)}, got {config.tracking!r}")


def start_tracker(config: RunConfig, out_dir: Path, past: list[dict[str, Any]]) -> Tracker:
    """The run's tracker, started: `past` (the history's rounds) are logged when its run is new."""
    tracker = tracker_for(config)
    tracker.start(config, Path(out_dir), past)
    return tracker
