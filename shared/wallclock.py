"""Simulated wall-clock in the manner of the FeTS challenge (DESIGN section 8).

A site's time in a round is download + validation + [local training + validation + upload];
the round takes as long as its slowest selected site. Sites' timing profiles come from the
phantom's ``sites.json`` or a JSON file of the same shape; a site without a profile gets the
FeTS medians, so simulated time is always defined.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

#: FeTS medians: training and validation seconds per case, download and upload seconds.
MEDIAN = {"train_seconds_per_case": 5.8, "val_seconds_per_case": 15.3, "download_seconds": 60.0, "upload_seconds": 90.0}


@dataclass(frozen=True)
class SiteTiming:
    train_seconds_per_case: float
    val_seconds_per_case: float
    download_seconds: float
    upload_seconds: float

    def round_seconds(self, n_train: int, n_val: int, epochs: float, trains: bool = True) -> float:
        """FeTS formula: each term floored at 1 s, as FeTS floors each draw."""
        t = max(1.0, self.download_seconds) + n_val * max(1.0, self.val_seconds_per_case)
        if trains:
            t += n_train * epochs * max(1.0, self.train_seconds_per_case)
            t += n_val * max(1.0, self.val_seconds_per_case) + max(1.0, self.upload_seconds)
        return t


def load_timings(path: str | Path | None) -> dict[str, SiteTiming]:
    """Site timings keyed by site id (the partition id as a string)."""
    if not path or not Path(path).is_file():
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read site profiles {path}: {err}") from err
    sites = data["sites"] if isinstance(data, dict) and "sites" in data else data
    timings = {}
    for site in sites:
        site_id = str(site.get("partition_id", site.get("site", "")))
        values = {k: float(site.get(k, site.get("compute", {}).get(k, MEDIAN[k]))) for k in MEDIAN}
        timings[site_id] = SiteTiming(**values)
    return timings


def timing_for(timings: dict[str, SiteTiming], site: str) -> SiteTiming:
    return timings.get(site) or SiteTiming(**MEDIAN)
