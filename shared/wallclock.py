"""Simulated wall-clock in the manner of the FeTS challenge (DESIGN section 8).

A site's time in a round is download + validation + [local training + validation + upload];
the round takes as long as its slowest selected site. Sites' timing profiles come from the
phantom's ``sites.json`` or a JSON file of the same shape; a site without a profile gets the
FeTS medians, so simulated time is always defined.

FeTS charges fixed transfer seconds whatever the model; here a profile's transfer seconds are for
`REFERENCE_PAYLOAD_MB` and scale with the bytes a round actually moves, and training scales with
the cases actually processed (local steps x batch when the site runs a fixed number of steps), so
model size, `update-dtype` and `local-steps` change simulated time as they would change real time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

#: FeTS medians: training and validation seconds per case, download and upload seconds.
MEDIAN = {"train_seconds_per_case": 5.8, "val_seconds_per_case": 15.3, "download_seconds": 60.0, "upload_seconds": 90.0}
#: The payload a profile's download and upload seconds are for (the phantom's `bandwidth_mbps` says the same).
REFERENCE_PAYLOAD_MB = 100.0


@dataclass(frozen=True)
class SiteTiming:
    train_seconds_per_case: float
    val_seconds_per_case: float
    download_seconds: float
    upload_seconds: float

    def round_seconds(
        self,
        n_train: int,
        n_val: int,
        epochs: float,
        trains: bool = True,
        *,
        down_bytes: int | None = None,
        up_bytes: int | None = None,
        train_cases: float | None = None,
    ) -> float:
        """FeTS formula, each term floored at 1 s as FeTS floors each draw. Transfers scale with the
        bytes moved when given; training counts `train_cases` (cases processed) when given, else
        `n_train x epochs`."""
        cases = n_train * epochs if train_cases is None else train_cases
        t = max(1.0, _transfer(self.download_seconds, down_bytes)) + n_val * max(1.0, self.val_seconds_per_case)
        if trains:
            t += cases * max(1.0, self.train_seconds_per_case)
            t += n_val * max(1.0, self.val_seconds_per_case) + max(1.0, _transfer(self.upload_seconds, up_bytes))
        return t


def _transfer(reference_seconds: float, nbytes: int | None) -> float:
    """Seconds to move `nbytes` at the rate that moves `REFERENCE_PAYLOAD_MB` in `reference_seconds`."""
    return reference_seconds if nbytes is None else reference_seconds * nbytes / (REFERENCE_PAYLOAD_MB * 1e6)


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
