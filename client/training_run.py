"""`fedbrats train`: the centralized (or single-site) baseline every federated run is compared with.

Centralized training is the one-site case of the same run configuration: one `RunConfig`, the same
model, the same trainer and learning-rate schedule, and the same cases per site
(`shared.data.site_cases`) as the federated clients, with the training settings derived in one place
(`client.settings`), so "federated vs. pooled data" compares strategies, not code. A round of the one-site federation is one training period here: `rounds` x
(`local_epochs` or `local_steps`), validated after each; `--epochs E` makes that E periods of one epoch.

The run's task (`--set task=classification`, `shared.tasks`) decides the dataset, the loss and the
validation. Writes RUN_DIR/checkpoint.safetensors (the period with the best validation headline:
mean Dice, or the AUC of the validation cases; the last one when there is no validation case or the
cases cannot define it), with `task`, `classes`, `label_column` and `class_input_size` in its
metadata for a classifier, RUN_DIR/last.safetensors, RUN_DIR/metrics.json (rewritten after
every period), RUN_DIR/run_config.json (the resolved configuration) and RUN_DIR/learning_curve.png.
As at the federation's sites, `init-checkpoint` warm-starts the model and `trainable` freezes the
parameters it does not name (docs/privacy.md).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from fedbrats.client.settings import model_for, schedule_steps, start_step, train_config
from fedbrats.client.trainer import get_device, train_local
from fedbrats.shared.atomic import atomic_write_json
from fedbrats.shared.config import RunConfig
from fedbrats.shared.constants import REGIONS, label_sets_for
from fedbrats.shared.data.partition import Partition, write_partition
from fedbrats.shared.data.site_cases import Discovered, cases_of_sites
from fedbrats.shared.models.trainable import apply_trainable, trainable_summary
from fedbrats.shared.tasks import Task, checkpoint_metadata, load_labels, task_for, with_label_classes
from fedbrats.shared.warm_start import load_warm_start
from fedbrats.strategies.selection import round_lr


def step_progress(console: Console) -> Progress:
    """The progress bar of a loop over training steps: description, bar, done/total, elapsed, left."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console)  # fmt: skip

def one_site_config(config: RunConfig, epochs: int | None = None) -> RunConfig:
    """The run configuration of centralized training; `epochs` E = E rounds of one local epoch.

    Without `epochs` the one site trains as long as each site of the federation would
    (`rounds` x `local_epochs`, or `rounds` x `local_steps`).
    """
    if config.dp:
        raise ValueError("dp=true: `fedbrats train` is the non-private baseline; DP-SGD runs in `fedbrats simulate`")
    if epochs is None:
        return config
    if epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {epochs}")
    return config.replace(rounds=epochs, local_epochs=1, local_steps=0, epoch_decay=1.0)


def training_cases(
    config: RunConfig,
    data: Path,
    partition: Partition | Path | None,
    site: str | None,
    *,
    discovered: Discovered | None = None,
) -> tuple[list[Any], list[Any]]:
    """(train, val) cases: one site of the partition, every site pooled, or all cases without a partition."""
    sites = None if site is None else [str(site)]
    if partition is None and site is not None:
        raise ValueError(f"--site {site!r} needs --partition, the CSV that says which cases belong to it")
    found = cases_of_sites(
        data, partition, sites=sites, seed=config.seed, val_fraction=config.val_fraction, discovered=discovered
    )
    return [c for s in found.values() for c in s.train], [c for s in found.values() for c in s.val]


def plot_learning_curve(history: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Training loss and the validation metrics per epoch: Dice per region, or AUC and balanced accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss")
    validated = [h for h in history if h.get("val")]
    shown = [(f"dice_{r}", r) for r in REGIONS] if any("dice_ET" in h["val"] for h in validated) else [
        ("auc", "AUC"), ("balanced_accuracy", "balanced accuracy")]  # fmt: skip
    for key, name in shown:
        points = [(h["epoch"], h["val"][key]) for h in validated if key in h["val"]]
        if points:
            ax_val.plot(*zip(*points, strict=True), marker="o", label=name)
    what = "Dice (sliding window)" if shown[0][0] == "dice_ET" else "metrics of the cases"
    ax_val.set(xlabel="epoch", ylabel="value", ylim=(0, 1), title=f"validation {what}")
    if validated:
        ax_val.legend()
    for ax in (ax_loss, ax_val):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def validate(task: Task, net: Any, val_ds: Any, config: RunConfig, device: Any) -> tuple[dict[str, float], float | None]:
    """The task's validation metrics of one period (underscored keys, as metrics.json keeps them) and its
    headline on these cases (mean Dice, or their AUC; None when the cases cannot define it, e.g. one class)."""
    metrics = task.evaluate(net, val_ds, config, device)
    histograms = metrics.pop("histograms", None)
    metrics.pop("reasons", None)
    # One site: its exact AUC is what a federation pools from histograms (which round within a bin).
    pooled = metrics.get("auc") if histograms is not None else None
    headline = task.headline([metrics], pooled)
    return {k.replace("-", "_"): float(v) for k, v in metrics.items()}, headline


def _val_text(val: dict[str, float], headline_name: str, headline: float | None) -> str:
    if all(f"dice_{r}" in val for r in REGIONS):
        return "val Dice " + " ".join(f"{r} {val[f'dice_{r}']:.3f}" for r in REGIONS)
    value = "undefined" if headline is None else f"{headline:.3f}"
    extra = f", balanced accuracy {val['balanced_accuracy']:.3f}" if "balanced_accuracy" in val else ""
    return f"val {headline_name} {value}{extra}"


def run_train(
    config: RunConfig,
    data: Path,
    *,
    partition: Partition | Path | None = None,
    site: str | None = None,
    out: Path,
    device: str = "auto",
    discovered: Discovered | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Train period by period, validate after each, keep the best; return what metrics.json holds.

    `config` is already the one-site configuration (`one_site_config`). What is learnt comes from its
    task (`shared.tasks`): the dataset, the loss, the validation and the headline that picks the
    best period (mean Dice, or the AUC of the validation cases); a classifier's class count comes
    from the labels. Bad input raises ValueError (or PartitionError / CaseError, both ValueErrors)
    naming what is wrong.
    """
    from fedbrats.shared.checkpoint import save_checkpoint

    console = console or Console()
    out = Path(out)
    config = with_label_classes(config, Path(data))  # a classifier's class count comes from its labels
    task = task_for(config)
    task.check_model(config)
    labels = load_labels(config, Path(data)) if task.needs_labels else None
    train_cases, val_cases = training_cases(config, Path(data), partition, site, discovered=discovered)
    if not train_cases:
        raise ValueError(f"no training case under {data}" + (f" for site {site!r}" if site else ""))
    device_ = get_device(device)
    out.mkdir(parents=True, exist_ok=True)
    opts = {"labels": labels, "cache_dir": out / "cache"}
    train_ds = task.dataset(train_cases, config, augment=True, **opts)
    val_ds = task.dataset(val_cases, config, augment=False, **opts) if val_cases else None
    if len(train_ds) == 0:
        raise ValueError("every training case was skipped: " + "; ".join(str(p) for p in train_ds.skipped))
    validating = val_ds is not None and len(val_ds) > 0
    if isinstance(partition, Partition):  # a partition narrowed to the cases on disk: keep what was used
        partition = write_partition(partition, out / "partition.csv")
    resolved = config.replace(data_dir=str(Path(data).resolve()), out_dir=str(out.resolve()),
                              partition=str(Path(partition).resolve()) if partition is not None else "")
    atomic_write_json(out / "run_config.json", resolved.to_flower())

    torch.manual_seed(config.seed)  # the federation's initial weights (server.app.initial_model); a rerun is identical
    net = model_for(config)
    warm = load_warm_start(net, config) if config.init_checkpoint else None  # init-checkpoint: checked, then loaded
    trained, total = apply_trainable(net, config.trainable)  # frozen parameters: requires_grad False before Adam
    n_train = len(train_ds)
    periods = config.rounds
    total = schedule_steps(config, n_train)
    label_set = label_sets_for(train_cases[0].layout)[0].name
    extra = {"patch_size": list(config.patch), "label_set": label_set, "seed": config.seed,
             "trained_on": site or "all", "train_cases": len(train_ds), "val_cases": len(val_ds) if val_ds else 0,
             **checkpoint_metadata(config, Path(data))}  # fmt: skip
    headline_name = task.headline_name
    console.print(f"training {config.model} {net.config} for {task.name} on {len(train_ds)} case(s), validating on "
                  f"{extra['val_cases']}, {periods} epoch(s), {total} step(s), device {device_}")  # fmt: skip
    summary: dict[str, Any] = {
        "task": task.name, "headline": headline_name,
        "model": config.model, "model_config": net.config, "patch_size": list(config.patch),
        "batch_size": config.batch_size, "lr": config.lr, "schedule": config.lr_schedule, "seed": config.seed,
        "device": str(device_), "train_cases": train_ds.case_ids(), "val_cases": val_ds.case_ids() if val_ds else [],
        "skipped": [str(p) for p in train_ds.skipped + (val_ds.skipped if val_ds else [])],
        "run_config": "run_config.json",
    }  # fmt: skip
    if task.classifies:
        summary.update(classes=extra["classes"], label_column=extra["label_column"])
    if warm is not None:
        summary["initial_model"] = extra["initial_model"] = {"source": "warm start", "path": warm.path, "digest": warm.digest}
        console.print(f"initial model: {warm.describe()}")
    if config.trainable != "*":
        summary.update(trainable=config.trainable, trained_parameters=trained, parameters=total)
        console.print(trainable_summary(trained, total, config.trainable))
    history: list[dict[str, Any]] = []
    best: tuple[float | None, int] = (None, 0)  # the best defined headline so far and its epoch
    step = 0
    with step_progress(console) as progress:
        bar = progress.add_task("epoch 1", total=total)
        for epoch in range(1, periods + 1):

            def on_step(done: int, planned: int, loss: float, step_lr: float, epoch: int = epoch) -> None:
                progress.advance(bar)
                progress.update(bar, description=f"epoch {epoch}/{periods} loss {loss:.3f} lr {step_lr:.2e}")

            # What the server's round loop would send this one site (lr and epochs per round).
            sent = {"server-round": epoch, "lr": round_lr(epoch, config.lr, config.lr_round_schedule, rounds=periods)}
            result = train_local(net, train_ds, train_config(config, n_train, sent), loss_fn=task.loss,
                                 start_step=start_step(config, n_train, epoch), device=device_, progress=on_step)
            step = result.end_step
            record: dict[str, Any] = {"epoch": epoch, "train_loss": result.mean_loss, "steps": result.steps,
                                      "examples": result.examples, "train_seconds": result.seconds,
                                      "lr": result.last_lr}
            score = None
            if validating:
                val, score = validate(task, net, val_ds, config, device_)
                record["val_seconds"] = val.pop("eval_seconds", math.nan)
                record["val"] = val
                record["val_headline"] = score
                progress.console.print(f"epoch {epoch}: loss {result.mean_loss:.4f}, "
                                       + _val_text(val, headline_name, score))
            else:
                progress.console.print(f"epoch {epoch}: loss {result.mean_loss:.4f} (no validation case)")
            history.append(record)
            meta = {**extra, "epoch": epoch, "step": step, "val_mean_dice": record.get("val", {}).get("mean_dice"),
                    "val_headline": score}  # fmt: skip
            save_checkpoint(out / "last.safetensors", net, extra={**meta, "selected": "last"})
            # A defined headline beats none; without one (no validation case, or one class), the latest counts.
            if score is not None and (best[0] is None or score > best[0]) or score is None and best[0] is None:
                best = (score, epoch)
                selected = "best" if score is not None else "last"
                save_checkpoint(out / "checkpoint.safetensors", net, extra={**meta, "selected": selected})
            summary.update(epochs=history, best_epoch=best[1],
                           checkpoint=f"best validation {headline_name}" if best[0] is not None
                           else "last epoch (no validation headline)")  # fmt: skip
            atomic_write_json(out / "metrics.json", summary)
    plot_learning_curve(history, out / "learning_curve.png", f"{config.model} ({task.name}) on {site or 'all sites'}")
    console.print(f"checkpoint.safetensors = epoch {best[1]} ({summary['checkpoint']}); "
                  f"metrics.json, run_config.json, learning_curve.png and last.safetensors in {out}")
    return summary
