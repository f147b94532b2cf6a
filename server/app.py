"""The Flower ServerApp: builds the global model and strategy from the run config and runs rounds.

The same app serves the simulation engine and a real deployment (`flwr run` against a SuperLink).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import HttpGrid

from fedbrats.server.federation import Federation
from fedbrats.server.history import INITIAL_MODEL
from fedbrats.shared.checkpoint import save_checkpoint
from fedbrats.shared.config import RunConfig
from fedbrats.shared.dp_recipe import recipe_notes
from fedbrats.shared.models import create_model
from fedbrats.shared.models.trainable import frozen_parameters, trainable_names
from fedbrats.shared.records import model_to_record, record_digest, record_to_model
from fedbrats.shared.tasks import checkpoint_metadata, task_for
from fedbrats.shared.wallclock import load_timings
from fedbrats.shared.warm_start import load_warm_start
from fedbrats.strategies import build_strategy

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
log = logging.getLogger("fedbrats.server")

app = ServerApp()


def initial_model(config: RunConfig) -> torch.nn.Module:
    """Seeded initial weights, so every strategy compared on a seed starts from the same model; with
    `init-checkpoint`, that checkpoint's weights (checked: `shared.warm_start`). A resumed run loads it
    too (same checks), but `Federation` then continues from its own latest round, never from this."""
    task_for(config).check_model(config)  # e.g. a classifier asked to segment: refused before round 1
    torch.manual_seed(config.seed)
    model = create_model(config.model, **config.model_config)
    if config.init_checkpoint:
        load_warm_start(model, config)
    trainable_names(model, config.trainable)  # a pattern matching no parameter fails here, not at every site
    return model


def make_strategy(config: RunConfig, total_sites: int | None = None):
    """The configured strategy, wrapped in client-level DP when asked for."""
    params = dict(config.strategy_params)
    if config.strategy == "qfedavg":
        params.setdefault("client_learning_rate", config.lr)
    strategy = build_strategy(config.strategy, params)
    if config.client_dp_noise_multiplier > 0:
        from fedbrats.strategies.client_dp import with_client_dp

        sites = total_sites or config.min_sites
        strategy = with_client_dp(
            strategy,
            noise_multiplier=config.client_dp_noise_multiplier,
            clipping_norm=config.client_dp_clipping_norm,
            num_sampled_sites=max(1, round(config.fraction_train * sites)),
            total_sites=sites,
            adaptive=config.client_dp_adaptive,
            delta=config.client_dp_delta,
            clipped_count_stddev=config.client_dp_clipped_count_stddev or None,
        )
    return strategy


def site_profiles_path(config: RunConfig) -> Path | None:
    for candidate in (Path(config.data_dir) / "sites.json",):
        if config.data_dir and candidate.is_file():
            return candidate
    return None


def run_server(grid: Grid, config: RunConfig) -> Path:
    """Run (or resume) the federation described by `config`; return the final checkpoint path."""
    _setup_logging()
    if config.holdout_site and isinstance(grid, HttpGrid):  # its partition split happens in `fedbrats simulate`
        raise ValueError(f"holdout-site = {config.holdout_site!r} applies to simulations; in a deployment, start "
                         "no SuperNode for that hospital and score the global model there with `fedbrats evaluate`")
    for note in recipe_notes(config):
        log.warning("note: %s", note)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = initial_model(config)
    strategy = make_strategy(config)
    federation = Federation(
        grid, config, strategy, model_to_record(model), timings=load_timings(site_profiles_path(config)), out_dir=out,
        simulated=not isinstance(grid, HttpGrid),  # a SuperLink's grid: real hospitals, wall time only
        frozen=frozen_parameters(model, config.trainable),
    )
    _record_warm_start(federation, config)
    # run_config.json is written (and checked against on resume) by Federation, before any round runs
    arrays = federation.run()
    record_to_model(arrays, model)
    path = save_checkpoint(
        out / "global_model.safetensors",
        model,
        model_name=config.model,
        model_config=config.model_config,
        extra={"patch_size": list(config.patch), "round": config.rounds, "strategy": config.strategy,
               "digest": record_digest(arrays), **checkpoint_metadata(config)},
    )
    log.info("final global model: %s", path)
    return path


def _record_warm_start(federation: Federation, config: RunConfig) -> None:
    """A fresh warm-started run records its initial model (path, digest) once in the history; a resume does not."""
    if not config.init_checkpoint or federation.start_round > 0:
        return
    if any(e.get("event") == INITIAL_MODEL for e in federation.history.events()):
        return  # restarted before round 1 completed: already recorded
    path, digest = str(Path(config.init_checkpoint).expanduser().resolve()), record_digest(federation.arrays)
    federation.history.append_event(INITIAL_MODEL, source="warm start", path=path, digest=digest)
    log.info("initial model: warm start from %s (digest %s)", path, digest[:12])


def _setup_logging() -> None:
    """Our INFO lines (one per round) must reach Flower's log stream; keep any handlers a host set up."""
    logger = logging.getLogger("fedbrats")
    logger.setLevel(logging.INFO)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, RunConfig.from_flower(dict(context.run_config)))
