"""`fedbrats train`: the centralized (or single-site) baseline every federated run is compared with.

Same trainer, same validation and the same train/val split per site as the federated clients
(`shared.partition.split_train_val`), so "federated vs. pooled data" compares strategies, not code.
Writes RUN_DIR/checkpoint.safetensors (the epoch with the best mean validation Dice; the last epoch
when there is no validation case), RUN_DIR/last.safetensors, RUN_DIR/metrics.json (rewritten after
every epoch) and RUN_DIR/learning_curve.png.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from fedbrats.client.trainer import TrainConfig, evaluate_local, flat_metrics, get_device, train_local
from fedbrats.shared.constants import REGIONS, label_sets_for

#: Above this many bytes of preprocessed images, cache on disk (memory-mapped) instead of in RAM.
MEMORY_CACHE_LIMIT = 4 * 2**30


def select_cases(
    case_ids: list[str], partition: Path | None, site: str | None, *, seed: int, val_fraction: float
) -> tuple[list[str], list[str]]:
    """(train, val) case ids: each site of the partition split like the federated clients split it."""
    from fedbrats.shared.data.partition import check_on_disk, read_partition, site_cases, split_train_val

    if partition is None:
        if site is not None:
            raise ValueError(f"--site {site!r} needs --partition, the CSV that says which cases belong to it")
        return split_train_val(sorted(case_ids), seed=seed, val_fraction=val_fraction)
    p = read_partition(Path(partition))
    check_on_disk(p, case_ids)
    sites = [str(site)] if site is not None else list(p.sites)
    train: list[str] = []
    val: list[str] = []
    for s in sites:
        t, v = split_train_val(site_cases(p, s), seed=seed, val_fraction=val_fraction, fixed=p.train_or_val)
        train += t
        val += v
    return train, val


def _cache_mode(cases: list[Any]) -> str:
    import nibabel as nib

    if not cases:
        return "memory"
    shape = nib.load(next(iter(cases[0].files.values()))).shape[:3]
    nbytes = 4 * 4 * int(shape[0]) * int(shape[1]) * int(shape[2]) * len(cases)
    return "memory" if nbytes <= MEMORY_CACHE_LIMIT else "disk"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def plot_learning_curve(history: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Training loss and validation Dice per region against epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss (Dice + focal)", title="training loss")
    validated = [h for h in history if h.get("val")]
    for region in REGIONS:
        ax_dice.plot([h["epoch"] for h in validated], [h["val"][f"dice_{region}"] for h in validated],
                     marker="o", label=region)
    ax_dice.set(xlabel="epoch", ylabel="Dice", ylim=(0, 1), title="validation Dice (sliding window)")
    if validated:
        ax_dice.legend()
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_dice):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run_train(
    data: Path,
    *,
    partition: Path | None,
    site: str | None,
    model: str,
    model_config: dict[str, Any],
    epochs: int,
    patch_size: tuple[int, int, int],
    batch_size: int,
    lr: float,
    out: Path,
    seed: int,
    val_fraction: float = 0.2,
    device: str = "auto",
    warmup_fraction: float = 0.05,
    schedule: str = "cosine",
    console: Console | None = None,
) -> int:
    """Train epoch by epoch, validate after each, keep the best; exit status 0, or 2 on bad input (explained)."""
    from fedbrats.shared.data.cases import discover_cases
    from fedbrats.shared.data.partition import PartitionError
    from fedbrats.shared.data.problems import CaseError

    console = console or Console()
    try:
        return _run(data, partition, site, model, model_config, epochs, tuple(patch_size), batch_size, lr,
                    Path(out), seed, val_fraction, device, warmup_fraction, schedule, console, discover_cases)
    except (ValueError, PartitionError, CaseError, FileNotFoundError) as error:
        console.print(f"[red]fedbrats train: {error}[/]")
        print(f"error: {error}", file=sys.stderr)
        return 2


def _run(data, partition, site, model_name, model_config, epochs, patch_size, batch_size, lr, out, seed,
         val_fraction, device_name, warmup_fraction, schedule, console, discover_cases) -> int:
    from fedbrats.shared.checkpoint import save_checkpoint
    from fedbrats.shared.data.dataset import PatientDataset
    from fedbrats.shared.models import create_model

    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    device = get_device(device_name)
    cases, problems = discover_cases(Path(data))
    for problem in problems:
        console.print(f"[yellow]{problem}[/]")
    by_id = {c.case_id: c for c in cases}
    train_ids, val_ids = select_cases(sorted(by_id), partition, site, seed=seed, val_fraction=val_fraction)
    if not train_ids:
        raise ValueError(f"no training case under {data}" + (f" for site {site!r}" if site else ""))
    out.mkdir(parents=True, exist_ok=True)
    train_cases = [by_id[i] for i in train_ids]
    val_cases = [by_id[i] for i in val_ids]
    cache = _cache_mode(train_cases + val_cases)
    opts = {"cache": cache, "cache_dir": out / "cache" if cache == "disk" else None, "seed": seed}
    train_ds = PatientDataset(train_cases, patch_size, augment=True, **opts)
    val_ds = PatientDataset(val_cases, patch_size, augment=False, **opts) if val_cases else None
    if len(train_ds) == 0:
        raise ValueError("every training case was skipped: " + "; ".join(str(p) for p in train_ds.skipped))

    net = create_model(model_name, **model_config)
    steps_per_epoch = -(-len(train_ds) // batch_size)
    total = steps_per_epoch * epochs
    config = TrainConfig(epochs=1, lr=lr, batch_size=batch_size, seed=seed, schedule=schedule,
                         warmup_steps=max(1, int(total * warmup_fraction)), total_steps=total)
    label_set = label_sets_for(train_cases[0].layout)[0].name
    extra = {"patch_size": list(patch_size), "label_set": label_set, "seed": seed, "trained_on": site or "all",
             "train_cases": len(train_ds), "val_cases": len(val_ds) if val_ds else 0}
    console.print(f"training {model_name} {model_config} on {len(train_ds)} case(s), validating on "
                  f"{len(val_ds) if val_ds else 0}, {epochs} epoch(s) x {steps_per_epoch} step(s), device {device}")

    history: list[dict[str, Any]] = []
    best = (-1.0, 0)
    summary: dict[str, Any] = {"model": model_name, "model_config": net.config, "patch_size": list(patch_size),
                               "batch_size": batch_size, "lr": lr, "schedule": schedule, "seed": seed,
                               "device": str(device), "train_cases": train_ds.case_ids(),
                               "val_cases": val_ds.case_ids() if val_ds else [],
                               "skipped": [str(p) for p in train_ds.skipped + (val_ds.skipped if val_ds else [])]}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    step = 0
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("epoch 1", total=total)

        def on_step(done: int, planned: int, loss: float, step_lr: float) -> None:
            progress.advance(task)
            progress.update(task, description=f"epoch {epoch}/{epochs} loss {loss:.3f} lr {step_lr:.2e}")

        for epoch in range(1, epochs + 1):
            result = train_local(net, train_ds, config, start_step=step, device=device, progress=on_step)
            step = result.end_step
            record: dict[str, Any] = {"epoch": epoch, "train_loss": result.mean_loss, "steps": result.steps,
                                      "examples": result.examples, "train_seconds": result.seconds,
                                      "lr": result.last_lr}
            if val_ds is not None and len(val_ds):
                evaluation = evaluate_local(net, val_ds, patch_size=patch_size, device=device)
                record["val"] = flat_metrics(evaluation)
                record["val_seconds"] = evaluation["seconds"]
                score = evaluation["mean_dice"]
                progress.console.print(
                    f"epoch {epoch}: loss {result.mean_loss:.4f}, val Dice "
                    + " ".join(f"{r} {record['val'][f'dice_{r}']:.3f}" for r in REGIONS)
                )
            else:
                score = float(epoch)  # no validation: the latest is the best we know
                progress.console.print(f"epoch {epoch}: loss {result.mean_loss:.4f} (no validation case)")
            history.append(record)
            meta = {**extra, "epoch": epoch, "step": step, "val_mean_dice": record.get("val", {}).get("mean_dice")}
            save_checkpoint(out / "last.safetensors", net, extra={**meta, "selected": "last"})
            if score > best[0]:
                best = (score, epoch)
                selected = "best" if val_ds is not None and len(val_ds) else "last"
                save_checkpoint(out / "checkpoint.safetensors", net, extra={**meta, "selected": selected})
            summary.update(epochs=history, best_epoch=best[1],
                           checkpoint="best validation mean Dice" if val_ds else "last epoch (no validation case)")
            _write_json(out / "metrics.json", summary)
    plot_learning_curve(history, out / "learning_curve.png", f"{model_name} on {site or 'all sites'}")
    console.print(f"checkpoint.safetensors = epoch {best[1]} ({summary['checkpoint']}); "
                  f"metrics.json, learning_curve.png and last.safetensors in {out}")
    return 0
