"""A site: its name, its usable cases split into training and validation, and its own folder.

Everything is resolved from Flower's node config first (a hospital's SuperNode says where its
data is) and the run config second (a simulated site is told the shared data folder and picks
its partition by ``partition-id``). The site's folder holds what must outlive a ClientApp
process: the preprocessed-volume cache (shared by every run), the privacy ledger (the budget spans
every run) and, under ``runs/<run key>/``, what one run keeps between its messages (`run_key`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from fedbrats.client.monai_import import import_monai_light
from fedbrats.shared.atomic import atomic_write_json
from fedbrats.shared.config import RunConfig
from fedbrats.shared.data.case_labels import CaseLabels, SiteClasses, site_classes
from fedbrats.shared.data.cases import Case
from fedbrats.shared.data.partition import read_partition, safe_site_id
from fedbrats.shared.data.problems import CaseProblem
from fedbrats.shared.data.site_cases import SiteCases, cases_of_site, load_partition
from fedbrats.shared.tasks import check_classes, load_labels, task_for

log = logging.getLogger("fedbrats.site")

#: The file of a run's state inside its folder, and how many runs' folders a site keeps.
STATE_FILE = "state.json"
RUNS_KEPT = 3


class SiteError(RuntimeError):
    """The site cannot take part; the message is safe to send to the server (no paths, no case ids)."""


@dataclass
class Site:
    """`train`/`val` are the task's datasets (`shared.tasks`): one item per patient whatever the task."""

    name: str
    train: Dataset
    val: Dataset
    work_dir: Path
    skipped: list[CaseProblem] = field(default_factory=list)
    labels: CaseLabels | None = None  # case labels, for tasks that classify
    classes: SiteClasses | None = None  # the site's cases per class

    @property
    def skipped_count(self) -> int:
        return len({p.case_id for p in self.skipped + self.train.skipped + self.val.skipped if p.fatal})

    # --- state that outlives the process, one folder per run ---------------------------
    def run_dir(self, key: str) -> Path:
        """The folder of everything this site keeps between messages of run `key` (see `run_key`)."""
        return self.work_dir / "runs" / key

    def load_state(self, key: str) -> dict[str, Any]:
        """What this site recorded in run `key` so far; {} for a run it has not seen (a new run starts afresh)."""
        path = self.run_dir(key) / STATE_FILE
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as err:  # a record only: training never reads it back
            log.warning("ignoring the unreadable state of run %s (%s); it is written anew", key, err)
            return {}

    def save_state(self, key: str, state: dict[str, Any]) -> None:
        """Write run `key`'s state atomically; keep the folders of the `RUNS_KEPT` latest runs only.

        Whole or old, never half (a rename), but not fsynced: it is the operator's record of each round,
        which training never reads back, and two fsyncs per train message were 15-20 ms of every round."""
        atomic_write_json(self.run_dir(key) / STATE_FILE, state, durable=False)
        _prune_runs(self.work_dir / "runs", keep=key)


def run_key(run_id: int | str, config: RunConfig, server_key: object = "") -> str:
    """The identity of a run at a site: the key the server gives the run, or Flower's run id plus a
    fingerprint of the run configuration when the server sends none.

    The server's key (`run-key` in every round's config) stays the same when a run is resumed, even
    under a new Flower run id, and changes for a new run: a second run at the same hospital gets a
    fresh folder (no schedule position, FedBN norms or SCAFFOLD control variate leaks across runs),
    while a resumed run finds its own state. A key that is not a short hex string is ignored.
    """
    key = str(server_key)
    if re.fullmatch(r"[0-9a-f]{8,32}", key):
        return f"run-{key}"
    flat = json.dumps(config.to_flower(), sort_keys=True, default=str)
    return f"{run_id}-{hashlib.sha256(flat.encode()).hexdigest()[:12]}"


def _prune_runs(runs: Path, keep: str) -> None:
    """Remove the folders of older runs beyond the `RUNS_KEPT` most recently written (never `keep`)."""
    folders = sorted((f for f in runs.iterdir() if f.is_dir()), key=lambda f: f.stat().st_mtime, reverse=True)
    for old in [f for f in folders if f.name != keep][RUNS_KEPT - 1 :]:
        log.info("removing the state of an old run at this site: %s", old.name)
        shutil.rmtree(old, ignore_errors=True)


def _site_name(node_config: dict[str, Any], partition_ids: list[str]) -> str:
    if node_config.get("site-name"):
        return safe_site_id(node_config["site-name"], "the node config's site-name")
    if "partition-id" in node_config and partition_ids:
        index = int(node_config["partition-id"])
        if index >= len(partition_ids):
            raise SiteError(f"partition-id {index} but the partition has only {len(partition_ids)} sites")
        return partition_ids[index]
    raise SiteError("the SuperNode's node config names no site: set site-name (or partition-id in simulation)")


def _work_dir(node_config: dict[str, Any], config: RunConfig, name: str) -> Path:
    if node_config.get("work-dir"):
        return Path(str(node_config["work-dir"]))
    if "partition-id" in node_config and config.out_dir:  # simulated site: beside the run
        return Path(config.out_dir) / "sites" / name
    return Path.home() / ".cache" / "fedbrats" / "sites" / name


def resolve_site_cases(data_dir: Path, partition_csv: str, name: str, config: RunConfig) -> SiteCases:
    """The site's usable cases split train/val, and why others are left out (`shared.data.site_cases`)."""
    partition = load_partition(partition_csv)
    if partition is not None and name not in partition.sites:
        raise SiteError(f"site {name!r} is not in the partition (sites: {', '.join(partition.sites)})")
    return cases_of_site(
        data_dir, partition, name if partition is not None else None,
        seed=config.seed, val_fraction=config.val_fraction,
    )  # fmt: skip


def open_site(node_config: dict[str, Any], config: RunConfig) -> Site:
    import_monai_light()  # the data stack below imports MONAI
    data_dir = Path(str(node_config.get("data-dir") or config.data_dir))
    if not str(data_dir) or not data_dir.is_dir():
        raise SiteError("the site's data folder does not exist (set data-dir in the node config)")
    partition_csv = str(node_config.get("partition") or config.partition or "")
    partition_ids = list(read_partition(Path(partition_csv)).sites) if partition_csv else []
    name = _site_name(node_config, partition_ids)
    found = resolve_site_cases(data_dir, partition_csv, name, config)
    problems = found.problems
    for p in problems:
        log.warning("site %s skips case %s (%s): %s", name, p.case_id, p.file or "folder", p.problem)
    work_dir = _work_dir(node_config, config, name)
    task = task_for(config)
    try:  # what is wrong here names no case and no path: it may go to the server
        task.check_model(config)
        labels = load_labels(config, data_dir) if task.needs_labels else None
        if labels is not None:
            check_classes(config, labels)
    except ValueError as err:
        if type(err) is not ValueError:  # a labels file error names paths and cases: it stays in the log
            raise
        raise SiteError(str(err)) from None

    def dataset(selected: list[Case], augment: bool) -> Dataset:
        return task.dataset(selected, config, labels=labels, augment=augment, cache_dir=work_dir / "cache")

    site = Site(name, dataset(found.train, True), dataset(found.val, False), work_dir, problems, labels)
    log.info("site %s: %d training and %d validation cases, %d skipped", name, len(site.train), len(site.val), site.skipped_count)
    if labels is not None:
        site.classes = site_classes(labels, {name: [c.case_id for c in site.train.cases + site.val.cases]})[name]
        log.info("site %s (%s): cases per class %s", name, labels.label_column, site.classes.counts)
        if site.classes.auc_reason:
            log.warning("%s", site.classes.auc_reason)
    return site


_OPEN: dict[tuple, Site] = {}


def cached_site(node_config: dict[str, Any], config: RunConfig) -> Site:
    """One Site per process and configuration: simulated sites live in long-lived Ray workers."""
    key = (tuple(sorted((k, str(v)) for k, v in node_config.items())), json.dumps(config.to_flower(), sort_keys=True))
    if key not in _OPEN:
        _OPEN[key] = open_site(node_config, config)
    return _OPEN[key]
