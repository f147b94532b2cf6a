"""Label maps <-> region masks: the one mapping between BraTS label values and ET/TC/WT.

Every label value comes from a `LabelSet` (`constants`); nothing else hard-codes ET = 4 or 3.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from fedbrats.shared.constants import LABEL_SETS, REGIONS, LabelSet


def describe(values: Iterable[int]) -> str:
    """`{0, 1, 2}`: how error messages show a set of label values."""
    return "{" + ", ".join(str(int(v)) for v in sorted(values)) + "}"


def label_set_named(label_set: LabelSet | str) -> LabelSet:
    """A label set given by itself or by name; an unknown name is an error listing the known ones."""
    if isinstance(label_set, LabelSet):
        return label_set
    if label_set not in LABEL_SETS:
        raise ValueError(f"unknown label set {label_set!r}; expected one of {sorted(LABEL_SETS)}")
    return LABEL_SETS[label_set]


def region_label_values(label_set: LabelSet | str) -> tuple[int, int, int]:
    """(ET, core-not-ET, WT-not-core) label values of a label set: (4, 1, 2) for 2021, (3, 1, 2) for 2023+."""
    ls = label_set_named(label_set)
    et = ls.regions["ET"]
    ncr = ls.regions["TC"] - et
    ed = ls.regions["WT"] - ls.regions["TC"]
    if len(et) != 1 or len(ncr) != 1 or len(ed) != 1:
        raise ValueError(f"label set {ls.name} does not map regions to one label each: {ls.regions}")
    return next(iter(et)), next(iter(ncr)), next(iter(ed))


def label_values(seg: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an integer label map (bincount: ~20x faster than np.unique)."""
    lo, hi = int(seg.min()), int(seg.max())
    if lo >= 0 and hi < 256:
        return np.flatnonzero(np.bincount(seg.astype(np.uint8, copy=False).ravel(), minlength=hi + 1))
    return np.unique(seg)


def region_masks(seg: np.ndarray, label_set: LabelSet) -> np.ndarray:
    """Region masks by comparisons (a 256-entry lookup table indexed by seg is ~6x slower at 1 mm)."""
    out = np.zeros((len(REGIONS), *seg.shape), dtype=np.uint8)
    for r, region in enumerate(REGIONS):
        for value in sorted(label_set.region_labels(region)):
            np.bitwise_or(out[r], seg == value, out=out[r])
    return out


def labels_to_regions(seg: np.ndarray, label_set: LabelSet) -> np.ndarray:
    """uint8 [3,...] masks (ET, TC, WT) from a BraTS label map; raises ValueError on unknown labels."""
    seg = np.asarray(seg)
    unknown = set(label_values(seg).tolist()) - label_set.labels
    if unknown:
        raise ValueError(
            f"labels {describe(unknown)} are not in {label_set.name} {describe(label_set.labels)}"
        )
    return region_masks(seg, label_set)


def regions_to_labels(regions: Any, label_set: LabelSet | str) -> np.ndarray:
    """BraTS label map (uint8) from region masks [3, X, Y, Z]: WT -> edema, TC -> core, ET -> enhancing.

    ET becomes 4 for BraTS 2017-2021 label sets and 3 for 2023+; un-nested masks are resolved by
    that order (run `postprocess` first to nest them).
    """
    if hasattr(regions, "detach"):
        regions = regions.detach().cpu().numpy()
    r = np.asarray(regions).astype(bool)
    if r.ndim != 4 or r.shape[0] != len(REGIONS):
        raise ValueError(f"regions have shape {r.shape}; expected [3, X, Y, Z] (ET, TC, WT)")
    et_label, core_label, edema_label = region_label_values(label_set)
    out = np.zeros(r.shape[1:], dtype=np.uint8)
    out[r[REGIONS.index("WT")]] = edema_label
    out[r[REGIONS.index("TC")]] = core_label
    out[r[REGIONS.index("ET")]] = et_label
    return out
