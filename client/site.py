"""A site: its name, its usable cases split into training and validation, and its own folder.

Everything is resolved from Flower's node config first (a hospital's SuperNode says where its
data is) and the run config second (a simulated site is told the shared data folder and picks
its partition by ``partition-id``). The site's folder holds what must outlive a ClientApp
process: the preprocessed-volume cache and the learning-rate schedule position.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedbrats.shared.config import RunConfig
from fedbrats.shared.data.cases import Case, discover_cases
from fedbrats.shared.data.dataset import PatientDataset
from fedbrats.shared.data.partition import read_partition, split_train_val
from fedbrats.shared.data.problems import CaseProblem

log = logging.getLogger("fedbrats.site")


class SiteError(RuntimeError):
    """The site cannot take part; the message is safe to send to the server (no paths, no case ids)."""


@dataclass
class Site:
    name: str
    train: PatientDataset
    val: PatientDataset
    work_dir: Path
    skipped: list[CaseProblem] = field(default_factory=list)

    @property
    def skipped_count(self) -> int:
        return len({p.case_id for p in self.skipped + self.train.skipped + self.val.skipped if p.fatal})

    # --- state that outlives the process -------------------------------------------
    def load_state(self) -> dict[str, Any]:
        path = self.work_dir / "site_state.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def save_state(self, state: dict[str, Any]) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.work_dir / "site_state.json.tmp"
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
        os.replace(tmp, self.work_dir / "site_state.json")


def _site_name(node_config: dict[str, Any], partition_ids: list[str]) -> str:
    if node_config.get("site-name"):
        return str(node_config["site-name"])
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


def resolve_site_cases(
    data_dir: Path, partition_csv: str, name: str
) -> tuple[list[Case], list[CaseProblem], dict[str, str]]:
    """The site's usable cases, the problems that made others unusable, and any fixed train/val split."""
    cases, problems = discover_cases(data_dir)
    fixed: dict[str, str] = {}
    if partition_csv:
        partition = read_partition(Path(partition_csv))
        if name not in partition.sites:
            raise SiteError(f"site {name!r} is not in the partition (sites: {', '.join(partition.sites)})")
        wanted = partition.sites[name]
        by_id = {c.case_id: c for c in cases}
        missing = [s for s in wanted if s not in by_id]
        problems += [CaseProblem(s, "", "listed in the partition but not found on disk") for s in missing]
        cases = [by_id[s] for s in wanted if s in by_id]
        fixed = {s: v for s, v in partition.train_or_val.items() if s in wanted}
    return cases, problems, fixed


def open_site(node_config: dict[str, Any], config: RunConfig) -> Site:
    data_dir = Path(str(node_config.get("data-dir") or config.data_dir))
    if not str(data_dir) or not data_dir.is_dir():
        raise SiteError("the site's data folder does not exist (set data-dir in the node config)")
    partition_csv = str(node_config.get("partition") or config.partition or "")
    partition_ids = list(read_partition(Path(partition_csv)).sites) if partition_csv else []
    name = _site_name(node_config, partition_ids)
    cases, problems, fixed = resolve_site_cases(data_dir, partition_csv, name)
    for p in problems:
        log.warning("site %s skips case %s (%s): %s", name, p.case_id, p.file or "folder", p.problem)
    ids = [c.case_id for c in cases]
    train_ids, val_ids = split_train_val(ids, seed=config.seed, val_fraction=config.val_fraction, fixed=fixed or None)
    by_id = {c.case_id: c for c in cases}
    work_dir = _work_dir(node_config, config, name)
    cache = None if config.cache == "none" else config.cache

    def dataset(selected: list[str], augment: bool) -> PatientDataset:
        return PatientDataset(
            [by_id[i] for i in selected],
            config.patch,
            foreground_prob=config.foreground_prob,
            augment=augment,
            cache=cache,
            cache_dir=work_dir / "cache",
            seed=config.seed,
        )

    site = Site(name, dataset(train_ids, True), dataset(val_ids, False), work_dir, problems)
    log.info("site %s: %d training and %d validation cases, %d skipped", name, len(site.train), len(site.val), site.skipped_count)
    return site


_OPEN: dict[tuple, Site] = {}


def cached_site(node_config: dict[str, Any], config: RunConfig) -> Site:
    """One Site per process and configuration: simulated sites live in long-lived Ray workers."""
    key = (tuple(sorted((k, str(v)) for k, v in node_config.items())), json.dumps(config.to_flower(), sort_keys=True))
    if key not in _OPEN:
        _OPEN[key] = open_site(node_config, config)
    return _OPEN[key]
