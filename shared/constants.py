"""Domain constants used everywhere: modality order, regions, BraTS label conventions.

One definition of each, so the channel order of an image or a mask can never disagree
between the data loader, the model, the metrics and the reports.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Channel order of every image tensor (DESIGN section 2).
MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")

#: Channel order of every region mask and model output, and the order of every report.
REGIONS: tuple[str, ...] = ("ET", "TC", "WT")

#: Image diagonal of a 240x240x155 1 mm BraTS volume: HD95 when exactly one side is empty.
BRATS_SHAPE: tuple[int, int, int] = (240, 240, 155)


@dataclass(frozen=True)
class Layout:
    """A BraTS folder layout: how case files are named on disk."""

    name: str
    separator: str  # between case id and suffix: "_" (2017-2021) or "-" (2023+)
    suffixes: dict[str, str]  # our modality name -> file suffix
    seg_suffix: str = "seg"

    def filename(self, case_id: str, modality: str) -> str:
        suffix = self.seg_suffix if modality == "seg" else self.suffixes[modality]
        return f"{case_id}{self.separator}{suffix}.nii.gz"


BRATS2021 = Layout("brats2021", "_", {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"})
BRATS2023 = Layout("brats2023", "-", {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"})
LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (BRATS2021, BRATS2023)}


@dataclass(frozen=True)
class LabelSet:
    """A label convention: which voxel values exist and which belong to each region."""

    name: str
    labels: frozenset[int]
    regions: dict[str, frozenset[int]]  # region -> labels inside it
    names: dict[int, str]

    def region_labels(self, region: str) -> frozenset[int]:
        return self.regions[region]


LABELS_2021 = LabelSet(
    "brats2021",
    frozenset({0, 1, 2, 4}),
    {"ET": frozenset({4}), "TC": frozenset({1, 4}), "WT": frozenset({1, 2, 4})},
    {0: "background", 1: "NCR/NET", 2: "ED", 4: "ET"},
)
LABELS_2023 = LabelSet(
    "brats2023",
    frozenset({0, 1, 2, 3}),
    {"ET": frozenset({3}), "TC": frozenset({1, 3}), "WT": frozenset({1, 2, 3})},
    {0: "background", 1: "NETC", 2: "SNFH", 3: "ET"},
)
#: BraTS 2024 GLI adds label 4, resection cavity, which belongs to no tumor region.
LABELS_2024 = LabelSet(
    "brats2024",
    frozenset({0, 1, 2, 3, 4}),
    LABELS_2023.regions,
    {**LABELS_2023.names, 4: "RC"},
)
LABEL_SETS: dict[str, LabelSet] = {s.name: s for s in (LABELS_2021, LABELS_2023, LABELS_2024)}


def label_sets_for(layout: Layout) -> tuple[LabelSet, ...]:
    """Label sets a layout admits, narrowest first (detection picks the first that fits)."""
    if layout.name == "brats2021":
        return (LABELS_2021,)
    return (LABELS_2023, LABELS_2024)
