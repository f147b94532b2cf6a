"""Post-processing of predicted regions: nesting, the small-ET rule, brain masking, uncertainty.

DESIGN section 4: an ET smaller than `min_et_voxels` becomes necrotic core; uncertainty
u = 200(1-p) if p >= 0.5 else 200p (TuNet).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

#: The 500-voxel ET rule of the seed papers is meant for 1 mm voxels: predict_case scales it by voxel volume.
MIN_ET_MM3 = 500.0


def as_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def postprocess(regions: Any, min_et_voxels: int = 500, *, brain: Any = None) -> np.ndarray:
    """Nest the regions (ET in TC in WT) and turn an ET of fewer than `min_et_voxels` voxels into core.

    Small predicted ET is mostly false positive on low-grade cases, where an empty truth makes any
    ET voxel cost Dice 1 -> 0; the voxels stay in TC (so they become necrotic core, label 1).
    `brain` (bool [X, Y, Z], e.g. any modality non-zero) removes predictions outside the brain.
    """
    r = as_numpy(regions).astype(bool, copy=True)
    if r.ndim != 4 or r.shape[0] != 3:
        raise ValueError(f"regions have shape {r.shape}; expected [3, X, Y, Z] (ET, TC, WT)")
    if brain is not None:
        mask = as_numpy(brain).astype(bool)
        if mask.shape != r.shape[1:]:
            raise ValueError(f"brain mask has shape {mask.shape}; expected {r.shape[1:]} like the regions")
        r &= mask[None]
    r[1] |= r[0]
    r[2] |= r[1]
    if r[0].sum() < min_et_voxels:
        r[0] = False
    return r


def min_et_voxels(spacing: Sequence[float], min_et_mm3: float = MIN_ET_MM3) -> int:
    """The ET size threshold in voxels of this spacing (500 at 1 mm, 19 at 3 mm)."""
    return int(round(min_et_mm3 / float(np.prod(spacing))))


def uncertainty(probs: Any) -> np.ndarray:
    """Per-region uncertainty in [0, 100] (float32, REGIONS order): 0 where p is 0 or 1, 100 at p = 0.5."""
    p = np.clip(as_numpy(probs).astype(np.float32), 0.0, 1.0)
    return np.where(p >= 0.5, 200.0 * (1.0 - p), 200.0 * p).astype(np.float32)


# --- one case from files to files ------------------------------------------------------------
