"""PatientDataset: one item = one patient (the privacy unit), a random patch cut at every access.

Cases that cannot be used are listed in `.skipped` and logged, never dropped silently. Preprocessed
arrays can be kept in RAM ("memory"), in .npy files ("disk", memory-mapped so an access reads little
more than its patch) or recomputed from the NIfTI files at every access (None). No file handle is kept
open between accesses, so the dataset can be copied into DataLoader workers.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from rich.progress import track
from torch.utils.data import Dataset, get_worker_info

from fedbrats.shared.atomic import atomic_write, atomic_write_text
from fedbrats.shared.data.cases import Case
from fedbrats.shared.data.problems import CaseError, CaseProblem
from fedbrats.shared.data.rules import grid_problems, image_problems, unreadable_problem
from fedbrats.shared.data.transforms import IMAGE, LABEL, preprocess, train_augmentation
from fedbrats.shared.data.volumes import load_case, read_grid

log = logging.getLogger(__name__)

#: Bump when preprocessing changes, so every disk cache is rebuilt.
CACHE_VERSION = 1
CACHE_FILES = (".json", ".image.npy", ".regions.npy")  # the .json is written last: it marks a complete entry
CacheMode = Literal["memory", "disk"] | None
Preprocessed = tuple[np.ndarray, np.ndarray, tuple[float, float, float]]


def _digest(*parts: object) -> str:
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()


def cache_key(case: Case) -> str:
    """`<case>-<folder hash>-<content hash>`: the content hash covers sizes and mtimes of every file."""
    stats = [(m, p.name, (st := p.stat()).st_size, st.st_mtime_ns) for m, p in sorted(case.files.items())]
    return f"{case.case_id}-{_digest(str(case.folder.resolve()))[:8]}-{_digest(CACHE_VERSION, stats)[:12]}"


def _npy_bytes(array: np.ndarray) -> memoryview:
    """The .npy file of `array` in memory (a view, not a second copy), for the atomic write."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getbuffer()


class PatientDataset(Dataset):
    """Patches of BraTS cases for training: `ds[i] -> (image float32 [4,*patch], regions float32 [3,*patch])`.

    Only usable cases are items (`.cases`); the others are in `.skipped`. With cache "memory" or "disk"
    every case is loaded and checked here, with a progress bar; with None only headers are checked here
    and a case whose data is corrupt raises CaseError when accessed (run `fedbrats data check` first).
    """

    def __init__(
        self,
        cases: Sequence[Case],
        patch_size: tuple[int, int, int],
        *,
        foreground_prob: float = 0.5,
        augment: bool = True,
        cache: CacheMode = "memory",
        cache_dir: Path | None = None,
        seed: int = 0,
        progress: bool = True,
    ):
        if cache not in ("memory", "disk", None):
            raise ValueError(f"cache={cache!r}; expected 'memory', 'disk' or None")
        if cache == "disk":
            if cache_dir is None:
                raise ValueError("cache='disk' needs cache_dir, the folder for the preprocessed .npy files")
            cache_dir = Path(cache_dir)
            cache_dir.mkdir(parents=True, exist_ok=True)
        if len(patch_size) != 3 or min(patch_size) < 1:
            raise ValueError(f"patch_size={patch_size}; expected three positive ints")
        self.patch_size = tuple(int(p) for p in patch_size)
        self.foreground_prob = foreground_prob
        self.augment = augment
        self.cache = cache
        self.cache_dir = cache_dir
        self.seed = seed
        self.skipped: list[CaseProblem] = []
        self._memory: dict[str, Preprocessed] = {}
        self._keys: dict[str, str] = {}
        self.cases: list[Case] = []
        for case in track(list(cases), description="loading cases", disable=not progress or cache is None):
            problems = self._prepare(case)
            if any(p.fatal for p in problems):
                self.skipped.extend(problems)
            else:
                self.cases.append(case)
        if self.skipped:
            ids = sorted({p.case_id for p in self.skipped})
            log.warning("skipped %d unusable case(s): %s", len(ids), "; ".join(str(p) for p in self.skipped))
        self._transform = train_augmentation(self.patch_size, foreground_prob, augment=augment, seed=seed)
        self._worker_seed: int | None = None

    # ------------------------------------------------------------------ loading and caching

    def _prepare(self, case: Case) -> list[CaseProblem]:
        """Load/check one case for the chosen cache; returns its problems (fatal ones mean skip it)."""
        if "seg" not in case.files:
            seg = case.layout.filename(case.case_id, "seg")
            return [CaseProblem(case.case_id, seg, f"no segmentation; training needs {seg}")]
        if self.cache is None:
            return self._header_problems(case)
        if self.cache == "disk":
            try:
                key = self._keys[case.case_id] = cache_key(case)
            except OSError as error:  # a file vanished since discovery
                return [unreadable_problem(case.case_id, Path(error.filename or "").name, error)]
            if all((self.cache_dir / f"{key}{ext}").exists() for ext in CACHE_FILES):
                return []
        try:
            data = self._load(case)
        except CaseError as error:
            return error.problems
        if self.cache == "memory":
            self._memory[case.case_id] = data
        else:
            self._write_cache(case, data)
        return []

    @staticmethod
    def _header_problems(case: Case) -> list[CaseProblem]:
        problems: list[CaseProblem] = []
        ref = None
        for path in case.files.values():
            grid, found = read_grid(case.case_id, path)  # header only, never decompresses the voxels
            if grid is None:
                problems.extend(found)
                continue
            shape, affine = grid
            found = image_problems(case.case_id, path.name, shape, None)
            if not found and ref is not None:
                found = grid_problems(case.case_id, path.name, shape, affine, *ref)
            ref = ref or (path.name, shape, affine)
            problems.extend(found)
        return problems

    @staticmethod
    def _load(case: Case) -> Preprocessed:
        volume = load_case(case, with_labels=True)
        image, regions, _ = preprocess(volume)
        return image, regions, volume.spacing

    def _write_cache(self, case: Case, data: Preprocessed) -> None:
        key = self._keys[case.case_id]
        image, regions, spacing = data
        atomic_write(self.cache_dir / f"{key}.image.npy", _npy_bytes(image))
        atomic_write(self.cache_dir / f"{key}.regions.npy", _npy_bytes(regions))
        meta = {"case_id": case.case_id, "spacing": list(spacing), "version": CACHE_VERSION}
        # the .json goes last: its presence marks a complete entry
        atomic_write_text(self.cache_dir / f"{key}.json", json.dumps(meta))
        prefix = key.rsplit("-", 1)[0] + "-"
        for stale in self.cache_dir.glob(f"{prefix}*"):  # same case and folder, older content
            if not stale.name.startswith(key + ".") and not stale.name.startswith("."):
                stale.unlink(missing_ok=True)

    def _arrays(self, i: int, *, mmap: bool) -> Preprocessed:
        case = self.cases[i]
        if self.cache == "memory":
            return self._memory[case.case_id]
        if self.cache == "disk":
            key = self._keys[case.case_id]
            mode = "r" if mmap else None
            image = np.load(self.cache_dir / f"{key}.image.npy", mmap_mode=mode)
            regions = np.load(self.cache_dir / f"{key}.regions.npy", mmap_mode=mode)
            spacing = tuple(json.loads((self.cache_dir / f"{key}.json").read_text())["spacing"])
            return image, regions, spacing
        return self._load(case)

    # ------------------------------------------------------------------ Dataset protocol

    def __len__(self) -> int:
        return len(self.cases)

    def reseed(self, seed: int) -> None:
        """Restart the augmentation random stream (same seed, same sequence of patches)."""
        self._transform.set_random_state(seed=seed % 2**32)

    def __getitem__(self, key: int | tuple[int, tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """A patch of case `i`: `key` is i (a patch of `patch_size`) or (i, patch size), as a patch pool draws it."""
        i, patch = key if isinstance(key, tuple) else (key, self.patch_size)
        info = get_worker_info()
        if info is not None and self._worker_seed != info.seed:
            # each worker got a copy of one random state: give it its own stream (deterministic
            # given torch.manual_seed in the main process, new every epoch)
            self._worker_seed = info.seed
            self.reseed(self.seed * 1_000_003 + info.seed)
        image, regions, _ = self._arrays(i, mmap=True)
        self._transform.transforms[0].patch_size = tuple(patch)  # the crop (shared.data.patch_pool varies it)
        out = self._transform({IMAGE: image, LABEL: regions})
        return _tensor(out[IMAGE]), _tensor(out[LABEL])

    def volume(self, i: int) -> Preprocessed:
        """Preprocessed whole case for sliding-window validation.

        Returns (image float32 [4,...], regions uint8 [3,...], spacing), cropped to the brain. With the
        memory cache these are the cached arrays themselves: read them, do not modify them in place.
        """
        image, regions, spacing = self._arrays(i, mmap=False)
        return np.asarray(image), np.asarray(regions), spacing

    def case_ids(self) -> list[str]:
        return [c.case_id for c in self.cases]


def _tensor(x) -> torch.Tensor:
    t = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(np.asarray(x))
    return t.to(torch.float32).contiguous()
