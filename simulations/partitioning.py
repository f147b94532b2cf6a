"""Making partitions for simulated federations: by institution, IID, non-IID over tumour size, quantity skew.

Every scheme writes the FeTS CSV format (`fedbrats.shared.data.partition`), so a simulated split and a real FeTS split
are read by the same code. Site ids are "1".."N" like FeTS. Results depend on the set of case ids and the
seed only, not on the order the folders were listed in.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich.progress import track

from fedbrats.shared.constants import LABELS_2021, LABELS_2023
from fedbrats.shared.data.nifti import open_nifti
from fedbrats.shared.data.partition import (
    Partition,
    check_on_disk,
    name_list,
    read_partition,
    write_partition,
)

SCHEMES: tuple[str, ...] = ("institution", "iid", "dirichlet", "quantity")
#: Fewest cases a generated site may hold: one to train on and one to validate on.
MIN_CASES_PER_SITE = 2
#: Tumour-size quantile bins of the Dirichlet scheme.
SIZE_BINS = 4


def make_partition(
    case_ids: Sequence[str],
    scheme: str,
    *,
    sites: int | None = None,
    alpha: float = 0.5,
    seed: int = 0,
    institution_csv: Path | None = None,
    tumor_sizes: dict[str, float] | None = None,
) -> Partition:
    """Split `case_ids` into sites with one of SCHEMES.

    institution: `institution_csv` read as it is; `sites`, if given, must equal its number of partitions
        (it cannot re-split an institution CSV), and every subject must be among `case_ids`.
    iid: shuffled, dealt round-robin: site sizes equal within one.
    dirichlet: cases binned by tumour-size quantile, each bin shared among sites by proportions drawn
        from Dirichlet(alpha): small alpha gives sites very different tumour sizes. Needs `tumor_sizes`.
    quantity: site sizes from Dirichlet(alpha), contents IID.
    Generated schemes give every site at least MIN_CASES_PER_SITE cases (deterministic rebalancing).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    dupes = sorted(c for c, n in Counter(case_ids).items() if n > 1)
    if dupes:
        raise ValueError(f"case ids listed twice: {name_list(dupes)}; expected each case once")
    if scheme == "institution":
        return _institution(case_ids, sites, institution_csv)

    cases = sorted(case_ids)
    if sites is None or sites < 1:
        raise ValueError(f"scheme {scheme!r} needs a number of sites >= 1; got {sites}")
    if len(cases) < MIN_CASES_PER_SITE * sites:
        raise ValueError(
            f"{len(cases)} cases cannot fill {sites} sites with at least {MIN_CASES_PER_SITE} cases each; "
            f"use at most {len(cases) // MIN_CASES_PER_SITE} sites"
        )
    if scheme != "iid" and not (alpha > 0 and np.isfinite(alpha)):
        raise ValueError(f"alpha is {alpha}; expected a finite number > 0")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        order = [cases[i] for i in rng.permutation(len(cases))]
        groups = [order[k::sites] for k in range(sites)]
    elif scheme == "quantity":
        groups = _quantity(cases, sites, alpha, rng)
    else:
        groups = _dirichlet(cases, sites, alpha, rng, tumor_sizes)
    return Partition({str(k + 1): sorted(group) for k, group in enumerate(groups)}, {})


def _institution(case_ids: Sequence[str], sites: int | None, institution_csv: Path | None) -> Partition:
    if institution_csv is None:
        raise ValueError("scheme 'institution' needs an institution CSV (FeTS partitioning_1.csv format)")
    partition = read_partition(institution_csv)
    if sites is not None and sites != len(partition.sites):
        raise ValueError(
            f"{institution_csv} has {len(partition.sites)} institutions but {sites} sites were asked for; "
            "the institution scheme keeps the CSV as it is: leave the number of sites out or make it match"
        )
    check_on_disk(partition, case_ids)
    return partition


def _counts(proportions: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to `total`, closest to proportions * total (largest remainder)."""
    exact = proportions * total
    counts = np.floor(exact).astype(int)
    short = total - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts


def _quantity(cases: list[str], sites: int, alpha: float, rng: np.random.Generator) -> list[list[str]]:
    spare = len(cases) - MIN_CASES_PER_SITE * sites
    sizes = MIN_CASES_PER_SITE + _counts(rng.dirichlet(np.full(sites, alpha)), spare)
    order = [cases[i] for i in rng.permutation(len(cases))]
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [order[bounds[k] : bounds[k + 1]] for k in range(sites)]


def _dirichlet(
    cases: list[str],
    sites: int,
    alpha: float,
    rng: np.random.Generator,
    tumor_sizes: dict[str, float] | None,
) -> list[list[str]]:
    if tumor_sizes is None:
        raise ValueError("scheme 'dirichlet' needs tumour sizes (see tumor_sizes_from_disk)")
    unknown = [c for c in cases if c not in tumor_sizes]
    if unknown:
        raise ValueError(f"no tumour size for {len(unknown)} cases: {name_list(unknown)}")
    by_size = sorted(cases, key=lambda c: (tumor_sizes[c], c))
    groups: list[list[str]] = [[] for _ in range(sites)]
    for size_bin in np.array_split(np.arange(len(by_size)), min(SIZE_BINS, len(cases))):
        members = [by_size[i] for i in rng.permutation(size_bin)]
        counts = _counts(rng.dirichlet(np.full(sites, alpha)), len(members))
        start = 0
        for k, count in enumerate(counts):
            groups[k].extend(members[start : start + count])
            start += count
    # Rebalance: the largest site gives its case closest in size to the needy site's current cases
    # (or its median case when the needy site is empty), so skew is disturbed as little as possible.
    while True:
        needy = min(range(sites), key=lambda k: (len(groups[k]), k))
        if len(groups[needy]) >= MIN_CASES_PER_SITE:
            return groups
        donor = max(range(sites), key=lambda k: (len(groups[k]), -k))
        donor_sizes = np.array([tumor_sizes[c] for c in groups[donor]])
        wanted = np.mean([tumor_sizes[c] for c in groups[needy]]) if groups[needy] else np.median(donor_sizes)
        groups[needy].append(groups[donor].pop(int(np.argmin(np.abs(donor_sizes - wanted)))))


def _seg_file(root: Path, case_id: str) -> tuple[Path, frozenset[int]] | None:
    """The case's segmentation and its whole-tumour labels (label 4 is ET in 2021, resection cavity in 2024)."""
    for separator, labels in (("_", LABELS_2021), ("-", LABELS_2023)):
        path = root / case_id / f"{case_id}{separator}seg.nii.gz"
        if path.is_file():
            return path, labels.region_labels("WT")
    return None


def tumor_sizes_from_disk(root: Path, case_ids: Sequence[str], *, progress: bool = True) -> dict[str, float]:
    """Whole-tumour voxel count of each case, from ROOT/<case>/<case>_seg.nii.gz or <case>-seg.nii.gz."""
    root = Path(root)
    found = {case: _seg_file(root, case) for case in case_ids}
    missing = [case for case, seg in found.items() if seg is None]
    if missing:
        raise ValueError(
            f"{len(missing)} cases under {root} have no segmentation: {name_list(missing)}; expected <case>/<case>_seg.nii.gz or <case>/<case>-seg.nii.gz (the dirichlet scheme needs labels)"
        )
    sizes: dict[str, float] = {}
    for case in track(list(case_ids), description="Measuring tumours", disable=not progress):
        path, labels = found[case]
        try:
            with open_nifti(path) as nifti:  # bounded: a lying header cannot exhaust memory
                seg = np.rint(nifti.read_labels()).astype(np.int64)
        except Exception as err:  # nibabel raises several types for a broken file
            raise ValueError(f"{path}: cannot read segmentation ({err}); expected a NIfTI label map") from err
        sizes[case] = float(np.isin(seg, list(labels)).sum())
    return sizes


def list_case_folders(root: Path) -> list[str]:
    """Case ids under a data root: its sub-directories that are not hidden, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory; expected a data root holding one folder per case")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def run_partition(
    root: Path,
    scheme: str,
    sites: int | None,
    alpha: float,
    seed: int,
    out: Path,
    institution_csv: Path | None = None,
) -> tuple[Partition, dict[str, float] | None]:
    """`fedbrats data partition`: partition the case folders under `root`, write the CSV to `out`.

    Returns the partition and, for the dirichlet scheme, the tumour size of each case (for the table
    the command prints).

    Institution scheme without a CSV: ROOT/partitioning_1.csv. Every subject of the result is a case folder
    (make_partition checks the institution CSV against the folders; the other schemes start from them).
    """
    root = Path(root)
    case_ids = list_case_folders(root)
    if not case_ids:
        raise ValueError(f"{root} holds no case folders; expected one sub-directory per case")
    if scheme == "institution" and institution_csv is None:
        institution_csv = root / "partitioning_1.csv"
        if not institution_csv.is_file():
            raise ValueError(
                f"scheme 'institution' needs --institution-csv, and {institution_csv} does not exist"
            )
    sizes = tumor_sizes_from_disk(root, case_ids) if scheme == "dirichlet" else None
    partition = make_partition(
        case_ids,
        scheme,
        sites=sites,
        alpha=alpha,
        seed=seed,
        institution_csv=institution_csv,
        tumor_sizes=sizes,
    )
    write_partition(partition, out)
    return partition, sizes
