"""Datasets of case-level labels: one item = one patient (the DP unit), with its class index.

- `ClassificationDataset`: the whole brain of a case, cropped to the non-zero box and z-scored as
  for segmentation (`transforms.preprocess`), resampled to a cube of `size`^3 voxels (trilinear,
  anti-aliased), lightly augmented (flips, intensity scale and shift); item
  `(image float32 [4, size, size, size], class index int64)`. No mask is needed.
- `MultitaskDataset`: a `PatientDataset` (segmentation patches) whose items also carry the class
  index: `(image, (regions, class index))`.

Preprocessed cubes are kept in RAM ("memory"), in .npy files ("disk", keyed like PatientDataset's
cache, so a changed case is preprocessed again) or recomputed at every access (None).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from fedbrats.shared.atomic import atomic_write
from fedbrats.shared.data.cases import Case
from fedbrats.shared.data.dataset import CacheMode, PatientDataset, cache_key
from fedbrats.shared.data.problems import CaseError, CaseProblem
from fedbrats.shared.data.transforms import preprocess
from fedbrats.shared.data.volumes import load_case

log = logging.getLogger(__name__)

#: Bump when the classifier's preprocessing changes, so every cached cube is rebuilt.
CLASS_CACHE_VERSION = 1


def resample_cube(image: np.ndarray, size: int) -> np.ndarray:
    """[C, X, Y, Z] -> [C, size, size, size] float32: trilinear, Gaussian anti-aliasing when shrinking."""
    from monai.transforms import Resize  # heavy import: only classification runs pay for it

    resized = Resize((size,) * 3, mode="trilinear", anti_aliasing=True)(np.asarray(image, np.float32))
    out = resized.numpy() if hasattr(resized, "numpy") else np.asarray(resized)
    return np.ascontiguousarray(out, dtype=np.float32)


def case_cube(case: Case, size: int) -> np.ndarray:
    """The classifier's input of one case [4, size, size, size]: brain-cropped, z-scored, resampled.

    The one definition, used by the dataset and by `fedbrats evaluate`/`predict` on one case."""
    image, _, _ = preprocess(load_case(case, with_labels=False))
    return resample_cube(image, size)


def _label_indices(cases: Sequence[Case], label_of: Mapping[str, int]) -> None:
    missing = [c.case_id for c in cases if c.case_id not in label_of]
    if missing:
        raise ValueError(f"no class label for {len(missing)} case(s): {', '.join(missing[:20])}")


class ClassificationDataset(Dataset):
    """Whole-brain cubes and class indices; `.cases` are the usable cases, `.skipped` why others are not."""

    def __init__(
        self,
        cases: Sequence[Case],
        label_of: Mapping[str, int],
        size: int,
        *,
        augment: bool = True,
        cache: CacheMode = "memory",
        cache_dir: Path | None = None,
        seed: int = 0,
    ):
        if cache not in ("memory", "disk", None):
            raise ValueError(f"cache={cache!r}; expected 'memory', 'disk' or None")
        if cache == "disk" and cache_dir is None:
            raise ValueError("cache='disk' needs cache_dir, the folder for the preprocessed .npy files")
        if size < 1:
            raise ValueError(f"size={size}; expected a positive edge length in voxels")
        _label_indices(cases, label_of)
        self.size = int(size)
        self.augment = augment
        self.cache = cache
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.seed = seed
        self.skipped: list[CaseProblem] = []
        self.cases: list[Case] = []
        self._memory: dict[str, np.ndarray] = {}
        for case in cases:
            try:
                cube = self._cube(case)
            except CaseError as error:
                self.skipped.extend(error.problems)
                continue
            if cache == "memory":
                self._memory[case.case_id] = cube
            self.cases.append(case)
        if self.skipped:
            log.warning("skipped %d unusable case(s): %s", len({p.case_id for p in self.skipped}),
                        "; ".join(str(p) for p in self.skipped))  # fmt: skip
        self.labels = [int(label_of[c.case_id]) for c in self.cases]
        self._rng = np.random.default_rng(seed)
        self._worker_seed: int | None = None

    # --- preprocessing and cache ---------------------------------------------------------------
    def _path(self, case: Case) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / f"{cache_key(case)}.class{self.size}v{CLASS_CACHE_VERSION}.npy"

    def _cube(self, case: Case) -> np.ndarray:
        if self.cache == "disk":
            path = self._path(case)
            if path.is_file():
                return np.load(path)
        cube = case_cube(case, self.size)
        if self.cache == "disk":
            buffer = io.BytesIO()
            np.save(buffer, cube)
            atomic_write(self._path(case), buffer.getbuffer())
        return cube

    def image(self, i: int) -> np.ndarray:
        """The preprocessed, unaugmented cube of case `i` [4, size, size, size] (evaluation, prediction)."""
        case = self.cases[i]
        if self.cache == "memory":
            return self._memory[case.case_id]
        return self._cube(case)

    # --- Dataset protocol --------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.cases)

    def reseed(self, seed: int) -> None:
        """Restart the augmentation random stream (same seed, same sequence of augmentations)."""
        self._rng = np.random.default_rng(seed % 2**32)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        info = get_worker_info()
        if info is not None and self._worker_seed != info.seed:
            self._worker_seed = info.seed
            self.reseed(self.seed * 1_000_003 + info.seed)
        image = self.image(i)
        if self.augment:  # as the segmentation recipe: flips p=0.5 per axis, scale and shift p=0.8
            axes = [a + 1 for a in range(3) if self._rng.random() < 0.5]
            image = np.flip(image, axis=axes) if axes else image
            if self._rng.random() < 0.8:
                image = image * np.float32(1.0 + self._rng.uniform(-0.1, 0.1))
            if self._rng.random() < 0.8:
                image = image + np.float32(self._rng.uniform(-0.1, 0.1))
        tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        return tensor, torch.tensor(self.labels[i], dtype=torch.int64)

    def case_ids(self) -> list[str]:
        return [c.case_id for c in self.cases]


class MultitaskDataset(Dataset):
    """Segmentation patches of a `PatientDataset` with each case's class index: `(image, (regions, index))`."""

    def __init__(self, patients: PatientDataset, label_of: Mapping[str, int]):
        _label_indices(patients.cases, label_of)
        self.patients = patients
        self.labels = [int(label_of[c.case_id]) for c in patients.cases]

    @property
    def cases(self) -> list[Case]:
        return self.patients.cases

    @property
    def skipped(self) -> list[CaseProblem]:
        return self.patients.skipped

    def __len__(self) -> int:
        return len(self.patients)

    def reseed(self, seed: int) -> None:
        self.patients.reseed(seed)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        image, regions = self.patients[i]
        return image, (regions, torch.tensor(self.labels[i], dtype=torch.int64))

    def volume(self, i: int):
        """The whole preprocessed case, for sliding-window validation (as `PatientDataset.volume`)."""
        return self.patients.volume(i)

    def case_ids(self) -> list[str]:
        return self.patients.case_ids()
