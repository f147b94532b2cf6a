"""Preprocessing and training augmentation (MONAI), as in the seed papers (DESIGN section 2).

Preprocessing runs once per case (its result is what the dataset caches); augmentation runs per patch
on dicts {"image": [4,X,Y,Z], "label": [3,X,Y,Z]} and crops first, so every later transform touches
only the patch.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from monai.transforms import (
    Compose,
    CropForeground,
    MapTransform,
    RandFlipd,
    Randomizable,
    RandScaleIntensityd,
    RandShiftIntensityd,
)

from fedbrats.shared.constants import REGIONS

IMAGE, LABEL = "image", "label"
_WT = REGIONS.index("WT")  # WT contains every tumor voxel: the foreground for sampling


def _nonzero(x):
    """Foreground = any non-zero voxel (a module function pickles into DataLoader workers, a lambda not)."""
    return x != 0


@dataclass(frozen=True)
class CropBox:
    """Where a preprocessed volume sits in the original grid: [start, end) per spatial axis."""

    start: tuple[int, int, int]
    end: tuple[int, int, int]
    shape: tuple[int, int, int]  # original spatial shape

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(s, e) for s, e in zip(self.start, self.end, strict=True))

    def uncrop(self, array: np.ndarray, fill: float = 0) -> np.ndarray:
        """Pad a [..., *cropped] array (e.g. a prediction) back to [..., *original shape]."""
        out = np.full((*array.shape[:-3], *self.shape), fill, dtype=array.dtype)
        out[(..., *self.slices)] = array
        return out


def zscore_nonzero(image: np.ndarray) -> np.ndarray:
    """Per-channel z-score over non-zero voxels; zeros stay 0. Same result as MONAI's
    NormalizeIntensity(nonzero=True, channel_wise=True) (tested), ~10x faster: sums replace its boolean
    gather/scatter (2 s -> 0.2 s for a 1 mm case), which matters when preprocessing runs at every access."""
    out = np.zeros(image.shape, dtype=np.float32)
    for c in range(image.shape[0]):
        x = image[c]
        mask = x != 0
        n = np.count_nonzero(mask)
        if n == 0:
            continue
        mean = float(x.sum(dtype=np.float64)) / n  # zeros add nothing to the sums
        var = max(float(np.square(x, dtype=np.float64).sum()) / n - mean * mean, 0.0)
        std = np.sqrt(var) or 1.0  # a flat brain keeps (x - mean), as MONAI does
        np.subtract(x, np.float32(mean), out=out[c], where=mask)
        np.divide(out[c], np.float32(std), out=out[c], where=mask)
    return out


def preprocess(volume) -> tuple[np.ndarray, np.ndarray | None, CropBox]:
    """Crop the zero border (union over modalities), z-score each modality over its non-zero voxels.

    Takes a CaseVolume; returns (image float32 [4,...], regions uint8 [3,...] or None, box).
    Background stays exactly 0 after normalisation, so padding with 0 later matches it.
    """
    image = np.asarray(volume.image)
    shape = tuple(int(s) for s in image.shape[1:])
    start, end = CropForeground(select_fn=_nonzero, margin=0, allow_smaller=True).compute_bounding_box(image)
    start, end = tuple(int(s) for s in start), tuple(int(e) for e in end)
    if any(
        e <= s for s, e in zip(start, end, strict=True)
    ):  # all zero: nothing to crop (validation forbids it)
        start, end = (0, 0, 0), shape
    box = CropBox(start, end, shape)
    image_out = zscore_nonzero(image[(slice(None), *box.slices)])
    regions = volume.regions
    regions_out = None if regions is None else np.ascontiguousarray(regions[(slice(None), *box.slices)])
    return image_out, regions_out, box


class ForegroundBiasedCropd(Randomizable, MapTransform):
    """Random patch crop: with probability `foreground_prob` centred on a random tumor voxel, else uniform.

    A tumor-centred patch always contains that voxel, so foreground_prob=1 guarantees tumor in every
    patch of a case that has any. A case without tumor falls back to a uniform crop. Spatial axes smaller
    than the patch are taken whole and zero-padded. Works on numpy arrays, including memory maps, and
    reads only the patch from them.
    """

    def __init__(
        self, keys: Sequence[str], label_key: str, patch_size: Sequence[int], foreground_prob: float
    ):
        MapTransform.__init__(self, keys)
        if not 0.0 <= foreground_prob <= 1.0:
            raise ValueError(f"foreground_prob={foreground_prob}; expected a probability in [0, 1]")
        self.label_key = label_key
        self.patch_size = tuple(int(p) for p in patch_size)
        self.foreground_prob = float(foreground_prob)
        self._start: tuple[int, ...] = ()

    def randomize(self, label: np.ndarray) -> None:
        shape = label.shape[1:]
        size = [min(p, s) for p, s in zip(self.patch_size, shape, strict=True)]
        centre = None
        if self.R.rand() < self.foreground_prob:
            tumor = np.flatnonzero(np.asarray(label[_WT]))
            if tumor.size:
                centre = np.unravel_index(tumor[self.R.randint(tumor.size)], shape)
        if centre is None:
            self._start = tuple(int(self.R.randint(s - z + 1)) for s, z in zip(shape, size, strict=True))
        else:
            self._start = tuple(
                int(np.clip(c - z // 2, 0, s - z)) for c, z, s in zip(centre, size, shape, strict=True)
            )

    def __call__(self, data: Mapping[Hashable, np.ndarray]) -> dict:
        d = dict(data)
        self.randomize(d[self.label_key])
        for key in self.key_iterator(d):
            d[key] = self._cut(d[key])
        return d

    def _cut(self, array: np.ndarray) -> np.ndarray:
        """The patch as a new array; axes shorter than the patch are zero-padded symmetrically
        (like SpatialPad), in the same copy, since a separate pad step costs as much as the crop."""
        shape = array.shape[1:]
        sizes = [min(p, n) for p, n in zip(self.patch_size, shape, strict=True)]
        source = tuple(slice(s, s + z) for s, z in zip(self._start, sizes, strict=True))
        offsets = [(p - z) // 2 for p, z in zip(self.patch_size, sizes, strict=True)]
        target = tuple(slice(o, o + z) for o, z in zip(offsets, sizes, strict=True))
        out = np.zeros((array.shape[0], *self.patch_size), dtype=array.dtype)
        out[(slice(None), *target)] = array[(slice(None), *source)]  # copy: detaches from caches and memmaps
        return out


def train_augmentation(
    patch_size: Sequence[int], foreground_prob: float = 0.5, *, augment: bool = True, seed: int | None = 0
) -> Compose:
    """Foreground-biased crop (zero-padded where the volume is smaller than the patch), then flips and
    intensity jitter on the patch only.

    Input/output: dict with "image" [4,X,Y,Z] and "label" [3,X,Y,Z]. `augment=False` keeps the crop and
    pad only. Flips p=0.5 per axis; intensity scale factor in [0.9, 1.1] and shift in [-0.1, 0.1], each
    p=0.8 (on all channels together, as in MONAI's BraTS recipe). Call `.set_random_state(seed)` to replay.
    """
    keys = [IMAGE, LABEL]
    steps = [ForegroundBiasedCropd(keys, LABEL, patch_size, foreground_prob)]
    if augment:
        steps += [RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(3)]
        steps += [
            RandScaleIntensityd(IMAGE, factors=0.1, prob=0.8),
            RandShiftIntensityd(IMAGE, offsets=0.1, prob=0.8),
        ]
    compose = Compose(steps)
    if seed is not None:
        compose.set_random_state(seed=seed)
    return compose
