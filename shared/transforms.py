"""Preprocessing and training augmentation (MONAI), as in the seed papers (DESIGN section 2).

Preprocessing runs once per case (its result is what the dataset caches); augmentation runs per patch
on dicts {"image": [4,X,Y,Z], "label": [3,X,Y,Z]} and crops first, so every later transform touches
only the patch.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import (
    Compose,
    CropForeground,
    MapTransform,
    NormalizeIntensity,
    RandFlipd,
    Randomizable,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)

from shared.constants import REGIONS

IMAGE, LABEL = "image", "label"
_WT = REGIONS.index("WT")  # WT contains every tumor voxel: the foreground for sampling


def _nonzero(x):
    """Foreground = any non-zero voxel (a module function, unlike a lambda, pickles into DataLoader workers)."""
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


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def preprocess(volume) -> tuple[np.ndarray, np.ndarray | None, CropBox]:
    """Crop the zero border (union over modalities), z-score each modality over its non-zero voxels.

    Takes a CaseVolume; returns (image float32 [4,...], regions uint8 [3,...] or None, box).
    Background stays exactly 0 after normalisation, so padding with 0 later matches it.
    """
    image = volume.image
    shape = tuple(int(s) for s in image.shape[1:])
    start, end = CropForeground(select_fn=_nonzero, margin=0, allow_smaller=True).compute_bounding_box(image)
    start, end = tuple(int(s) for s in start), tuple(int(e) for e in end)
    if any(e <= s for s, e in zip(start, end, strict=True)):  # all zero: nothing to crop (validation forbids it)
        start, end = (0, 0, 0), shape
    box = CropBox(start, end, shape)
    cropped = np.ascontiguousarray(image[(slice(None), *box.slices)])
    normed = NormalizeIntensity(nonzero=True, channel_wise=True, dtype=np.float32)(torch.from_numpy(cropped))
    image_out = np.ascontiguousarray(_numpy(normed), dtype=np.float32)
    regions = volume.regions
    regions_out = None if regions is None else np.ascontiguousarray(regions[(slice(None), *box.slices)])
    return image_out, regions_out, box


class ForegroundBiasedCropd(Randomizable, MapTransform):
    """Random patch crop: with probability `foreground_prob` centred on a random tumor voxel, else uniform.

    A tumor-centred patch always contains that voxel, so foreground_prob=1 guarantees tumor in every
    patch of a case that has any. A case without tumor falls back to a uniform crop. Spatial axes smaller
    than the patch are taken whole (pad afterwards). Works on numpy arrays, including memory maps, and
    reads only the patch from them.
    """

    def __init__(self, keys: Sequence[str], label_key: str, patch_size: Sequence[int], foreground_prob: float):
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
            shape = d[key].shape[1:]
            window = tuple(
                slice(s, s + min(p, n)) for s, p, n in zip(self._start, self.patch_size, shape, strict=True)
            )
            d[key] = np.array(d[key][(slice(None), *window)])  # copy: detaches from caches and memmaps
        return d


def train_augmentation(
    patch_size: Sequence[int], foreground_prob: float = 0.5, *, augment: bool = True, seed: int | None = 0
) -> Compose:
    """Crop (foreground-biased), pad to the patch, then flips and intensity jitter on the patch only.

    Input/output: dict with "image" [4,X,Y,Z] and "label" [3,X,Y,Z]. `augment=False` keeps the crop and
    pad only. Flips p=0.5 per axis; intensity scale factor in [0.9, 1.1] and shift in [-0.1, 0.1], each
    p=0.8 (on all channels together, as in MONAI's BraTS recipe). Call `.set_random_state(seed)` to replay.
    """
    keys = [IMAGE, LABEL]
    steps = [
        ForegroundBiasedCropd(keys, LABEL, patch_size, foreground_prob),
        SpatialPadd(keys, spatial_size=tuple(patch_size), mode="constant"),
    ]
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
