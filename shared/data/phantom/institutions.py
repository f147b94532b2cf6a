"""Institution sizes of real federations for the phantom, and a held-out validation set fixed in the CSV.

`--institutions fets2022` gives the phantom the skew of the FeTS 2022 challenge's `partitioning_1.csv`
(23 institutions, 1,251 subjects, 4 to 511 per institution, median 13; DESIGN section 8), so a
"by institution" federation is as unequal as the real one. The counts were taken from the challenge's
own CSV (FeTS-AI/Challenge, Task_1/openfl-workspace/fets_challenge_workspace/partitioning_1.csv), in
Partition_ID order; FeTS 2021's (17 institutions, 341 subjects) come from the same file's 2021 version.

The validation cases are chosen here, once, and written as the partition CSV's `TrainOrVal` column,
so every method (every strategy, seed and the centralized baseline) is scored on the same cases.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Cases per institution, Partition_ID 1, 2, ... (counted from the challenges' partitioning_1.csv).
INSTITUTION_SIZES: dict[str, tuple[int, ...]] = {
    "fets2022": (511, 6, 15, 47, 22, 34, 12, 8, 4, 8, 14, 11, 35, 6, 13, 30, 9, 382, 4, 33, 35, 7, 5),
    "fets2021": (129, 14, 5, 9, 22, 34, 12, 8, 4, 8, 6, 9, 27, 3, 11, 34, 6),
}
#: Smallest institution after scaling: one case to train on, one to validate on, one to spare.
DEFAULT_MIN_CASES = 3
#: Held-out validation set: this fraction of all cases (FeTS's 80/20), and never fewer than MIN_VAL_CASES.
VAL_FRACTION, MIN_VAL_CASES = 0.2, 40
_VAL_STREAM = 0x7A1


def institution_sizes(name: str, *, scale: float = 1.0, min_cases: int = DEFAULT_MIN_CASES) -> list[int]:
    """Each institution's case count: round(real count x scale), at least `min_cases`.

    Scaling keeps the order and the skew (at scale 0.2, FeTS 2022's 511 and 382 become 102 and 76,
    its 4-case institutions the minimum).
    """
    if name not in INSTITUTION_SIZES:
        raise ValueError(f"unknown institution set {name!r}; expected one of {', '.join(INSTITUTION_SIZES)}")
    if not (scale > 0 and np.isfinite(scale)):
        raise ValueError(f"institution scale is {scale}; expected a finite number > 0")
    if min_cases < 1:
        raise ValueError(f"minimum institution size is {min_cases}; expected >= 1")
    return [max(int(n * scale + 0.5), min_cases) for n in INSTITUTION_SIZES[name]]


def default_val_cases(total: int) -> int:
    """VAL_FRACTION of the cases, at least MIN_VAL_CASES."""
    return max(MIN_VAL_CASES, int(total * VAL_FRACTION + 0.5))


def allocate_val_cases(sizes: Sequence[int], val_cases: int) -> list[int]:
    """Validation cases per institution: `val_cases` in all, shared in proportion to size.

    Every institution of two or more cases validates on at least one and trains on at least one
    (a one-case institution only trains). The rest go one at a time to the institution furthest
    below its proportional share (ties: the lower Partition_ID), so the result is deterministic.
    """
    sizes = [int(n) for n in sizes]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"institution sizes must be >= 1, got {sizes}")
    low = [1 if n >= 2 else 0 for n in sizes]
    high = [n - 1 for n in sizes]
    if not sum(low) <= val_cases <= sum(high):
        raise ValueError(
            f"{val_cases} validation cases cannot be drawn from institutions of {sizes} cases: expected "
            f"{sum(low)} (one per institution of two or more) to {sum(high)} (each keeps a training case)"
        )
    total = sum(sizes)
    share = [n * val_cases / total for n in sizes]
    counts = list(low)
    for _ in range(val_cases - sum(low)):
        k = max(
            (i for i in range(len(sizes)) if counts[i] < high[i]), key=lambda i: (share[i] - counts[i], -i)
        )
        counts[k] += 1
    return counts


def validation_cases(seed: int, site: int, n_cases: int, n_val: int) -> list[int]:
    """Which case numbers (1..n_cases) of `site` are held out: a draw from the site's own stream."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, site, _VAL_STREAM]))
    return sorted(int(c) + 1 for c in rng.choice(n_cases, size=n_val, replace=False))


def train_or_val(seed: int, sizes: Sequence[int], val_cases: int) -> dict[tuple[int, int], str]:
    """(site, case) -> "train" or "val" for sites 1..len(sizes): the partition's TrainOrVal column."""
    split: dict[tuple[int, int], str] = {}
    for site, (n, n_val) in enumerate(zip(sizes, allocate_val_cases(sizes, val_cases), strict=True), start=1):
        held_out = set(validation_cases(seed, site, n, n_val))
        split.update({(site, c): "val" if c in held_out else "train" for c in range(1, n + 1)})
    return split
