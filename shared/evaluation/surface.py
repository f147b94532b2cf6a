"""Surface distances and HD95 in the two definitions in use, with scipy distance transforms.

`pooled` (the default) is MedPy's `hd95`, which the BraTS evaluators use (brats-evaluation, panoptica,
BraTS 2023+): the 95th percentile of the distances of both directions pooled into one set. `max` is
MONAI's `compute_hausdorff_distance(percentile=95)`: the larger of the two directed 95th percentiles.
The pooled percentile lies (up to interpolation) between the two directed ones, so `max` is not the
smaller; it is much larger when, e.g., a small false-positive blob far from the truth holds more than
5 % of the prediction's surface but less than 5 % of the pool. Reports name the definition they use.

A surface voxel is a mask voxel with a background 6-neighbour (the mask minus its binary erosion with
the 3D cross; voxels on the image border count as surface, as in MedPy). Distances are in mm from
each surface voxel of one mask to the nearest surface voxel of the other (Euclidean distance
transform with the voxel spacing). Both masks are cropped to their union's bounding box first: every
surface voxel lies inside it, so the distances are exact and the work is proportional to the tumour.
Empty masks are the caller's business (`shared.evaluation.metrics` applies the CaPTk/FeTS convention).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

#: The HD95 definitions (RunConfig `hd95-definition`); the first is the default.
HD95_DEFINITIONS = ("pooled", "max")
DEFAULT_HD95 = HD95_DEFINITIONS[0]
#: What each definition is, for report captions and CSV notes.
HD95_DESCRIPTIONS = {
    "pooled": "95th percentile of both directions' surface distances pooled (MedPy, BraTS evaluators)",
    "max": "max of the two directed 95th percentiles (MONAI)",
}


def check_definition(definition: str) -> str:
    """`definition` if it is one of HD95_DEFINITIONS, else a ValueError naming the choices."""
    if definition not in HD95_DEFINITIONS:
        raise ValueError(f"HD95 definition {definition!r}; expected one of {', '.join(HD95_DEFINITIONS)}")
    return definition


def union_box(a: np.ndarray, b: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of a | b (at least one of them non-empty)."""
    union = a | b
    box = []
    for axis in range(union.ndim):
        other = tuple(i for i in range(union.ndim) if i != axis)
        hits = np.flatnonzero(union.any(axis=other))
        box.append(slice(hits[0], hits[-1] + 1))
    return tuple(box)


def surface(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with a background 6-neighbour (or on the array border)."""
    cross = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=cross, border_value=0)


def directed_distances(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """(pred surface -> truth surface, truth surface -> pred surface) distances in mm; both masks non-empty."""
    box = union_box(pred, truth)
    a, b = surface(pred[box]), surface(truth[box])
    to_b = ndimage.distance_transform_edt(~b, sampling=spacing)
    to_a = ndimage.distance_transform_edt(~a, sampling=spacing)
    return to_b[a], to_a[b]


def hd95_of(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], definition: str = DEFAULT_HD95
) -> float:
    """HD95 in mm of two non-empty boolean masks in `definition` (percentiles interpolate linearly, as numpy's)."""
    check_definition(definition)
    forward, backward = directed_distances(pred, truth, spacing)
    if definition == "pooled":
        return float(np.percentile(np.concatenate([forward, backward]), 95))
    return float(max(np.percentile(forward, 95), np.percentile(backward, 95)))
