"""Anatomy of the phantom: the MNI152 2009 template nilearn ships, resampled onto a BraTS-like grid.

nilearn keeps the 1 mm T1, grey- and white-matter maps inside its package, so nothing is
downloaded. The output grid is 240x240x155 mm (BraTS) at the chosen voxel size, its affine
carries the spacing and keeps MNI millimetres as world coordinates. Each case samples the 1 mm
maps once through its own deformation (affine + smooth elastic + tumor mass effect), so there is
one interpolation per case and no resampling of already resampled data.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

#: BraTS field of view in mm (240x240x155 voxels at 1 mm).
FIELD_OF_VIEW_MM = (240.0, 240.0, 155.0)
#: Work box margin around the template brain: the deformation never moves the brain further.
MARGIN_MM = 12.0
#: Brain top sits this far below the top of the field of view (the brainstem bottom is cropped).
TOP_MARGIN_MM = 12.0


@dataclass(frozen=True)
class Template:
    """The 1 mm template maps (mask, GM, WM) pre-smoothed for one voxel size, and tumor seed spots."""

    maps: np.ndarray  # float32 [3, X, Y, Z]: brain mask, GM, WM
    inv_affine: np.ndarray  # world (mm) -> template voxel
    seeds_world: np.ndarray  # (N, 3) deep white-matter points (mm), supratentorial
    seeds_depth: np.ndarray  # (N,) distance of each seed to the brain edge (mm)
    brain_centre: np.ndarray  # (3,) world mm


@dataclass(frozen=True)
class Grid:
    """The output canvas: shape, affine (spacing on the diagonal) and the work box holding the brain."""

    voxel_size: float
    shape: tuple[int, int, int]
    affine: np.ndarray
    box: tuple[slice, slice, slice]


@lru_cache(maxsize=2)
def _raw_template() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """T1, GM, WM arrays and the affine from nilearn's packaged files (no download)."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=1)
    gm = datasets.load_mni152_gm_template(resolution=1)
    wm = datasets.load_mni152_wm_template(resolution=1)
    affine = np.asarray(t1.affine, dtype=float)
    arrays = [np.asarray(img.dataobj, dtype=np.float32) for img in (t1, gm, wm)]
    return arrays[0], arrays[1], arrays[2], affine


@lru_cache(maxsize=1)
def _brain() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Brain mask, deep white-matter seed points (world mm), their depth, and the brain centre."""
    t1, _, wm, affine = _raw_template()
    mask = t1 > 0.2  # nilearn's own brain-mask rule (load_mni152_brain_mask)
    # Depth below the brain surface on a 2 mm grid (a full 1 mm EDT costs seconds); holes filled.
    coarse = ndimage.binary_fill_holes(mask[::2, ::2, ::2])
    depth = ndimage.distance_transform_edt(coarse, sampling=2.0)
    idx = np.argwhere((wm[::2, ::2, ::2] > 0.9) & (depth > 12)) * 2
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    keep = world[:, 2] > -15.0  # supratentorial, where BraTS gliomas mostly are
    bbox = np.argwhere(mask)
    centre = (bbox.min(0) + bbox.max(0)) / 2.0 @ affine[:3, :3].T + affine[:3, 3]
    return mask, world[keep], depth[tuple(idx[keep].T // 2)].astype(np.float32), centre


@lru_cache(maxsize=4)
def load_template(voxel_size: float) -> Template:
    """Template maps smoothed for `voxel_size` (partial volume of a larger voxel), cached per size."""
    _, gm, wm, affine = _raw_template()
    mask, seeds, depth, centre = _brain()
    sigma = 0.3 * np.sqrt(max(voxel_size**2 - 1.0, 0.0))
    maps = np.stack([mask.astype(np.float32), gm, wm])
    if sigma > 0.05:
        maps = np.stack([ndimage.gaussian_filter(m, sigma, mode="constant") for m in maps])
    return Template(np.ascontiguousarray(maps), np.linalg.inv(affine), seeds, depth, centre)


@lru_cache(maxsize=4)
def make_grid(voxel_size: float) -> Grid:
    """BraTS field of view at `voxel_size`: 1 mm gives 240x240x155, 3 mm gives 80x80x52."""
    if not 0.5 <= voxel_size <= 6.0:
        raise ValueError(f"voxel_size must be between 0.5 and 6 mm, got {voxel_size}")
    t1, _, _, affine = _raw_template()
    shape = tuple(int(round(f / voxel_size)) for f in FIELD_OF_VIEW_MM)
    bbox = np.argwhere(t1 > 0.2)
    lo = bbox.min(0) @ affine[:3, :3].T + affine[:3, 3]
    hi = bbox.max(0) @ affine[:3, :3].T + affine[:3, 3]
    extent = np.array(shape) * voxel_size
    origin = (lo + hi) / 2.0 - extent / 2.0 + voxel_size / 2.0
    origin[2] = hi[2] + TOP_MARGIN_MM - extent[2] + voxel_size
    origin = np.round(origin)  # whole millimetres: at 1 mm the grid is the template's own grid
    grid_affine = np.diag([voxel_size, voxel_size, voxel_size, 1.0])
    grid_affine[:3, 3] = origin
    box_lo = np.floor((lo - MARGIN_MM - origin) / voxel_size).astype(int)
    box_hi = np.ceil((hi + MARGIN_MM - origin) / voxel_size).astype(int) + 1
    box_lo = np.clip(box_lo, 0, shape)
    box_hi = np.clip(box_hi, 0, shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(box_lo, box_hi, strict=True))
    return Grid(float(voxel_size), shape, grid_affine, box)  # type: ignore[arg-type]


def random_rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    """Rotation about a random axis by up to `max_degrees` (Rodrigues)."""
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(-max_degrees, max_degrees))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


@dataclass(frozen=True)
class Deformation:
    """Output world -> template world: x' = C + A (x - C) + t + elastic(x), then mass effect around `push_at`."""

    centre: np.ndarray
    matrix: np.ndarray
    shift: np.ndarray
    elastic: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # per displaced axis: amp, freq, phase
    push_at: np.ndarray | None = None  # template world point the tumor grows from
    push_strength: float = 0.0
    push_radius: float = 1.0

    def to_output(self, world_template: np.ndarray) -> np.ndarray:
        """Approximate inverse (affine part only): where a template point lands in the output."""
        return self.centre + np.linalg.solve(self.matrix, world_template - self.centre - self.shift)


def draw_deformation(rng: np.random.Generator, template: Template) -> Deformation:
    """Small random affine (5 deg, 6 % scale, 3 mm) and a cheap smooth elastic field (about 2 mm rms)."""
    matrix = random_rotation(rng, 5.0) @ np.diag(np.exp(rng.uniform(-0.06, 0.06, 3)))
    shift = rng.uniform(-3.0, 3.0, 3)
    elastic = []
    for _ in range(3):  # per displaced axis: 4 separable cosine products, wavelengths 60-160 mm
        amp = rng.normal(0.0, 2.5, 4)
        freq = 2 * np.pi / rng.uniform(60.0, 160.0, (4, 3))
        phase = rng.uniform(0, 2 * np.pi, (4, 3))
        elastic.append((amp, freq, phase))
    return Deformation(template.brain_centre, matrix, shift, elastic)


def sample_anatomy(grid: Grid, template: Template, deform: Deformation) -> np.ndarray:
    """Deformed tissue maps in the grid's work box: float32 [3, *box] (mask, GM, WM).

    Coordinates are built from 1-D axes by broadcasting (affine part), separable cosine products
    (elastic part) and, on a sub-box around the tumor only, the radial mass effect; then one
    linear interpolation of the 1 mm maps (GM and WM only where the brain mask is non-zero).
    """
    lin, off = template.inv_affine[:3, :3], template.inv_affine[:3, 3]
    if not np.allclose(lin, np.diag(np.diag(lin))):
        raise ValueError("the template affine must be axis-aligned (nilearn's MNI152 is)")
    scale = np.diag(lin)
    # Output world x -> template voxel: v = L A (x - C) + L (C + t) + o + L e(x), L diagonal.
    matrix = (lin @ deform.matrix).astype(np.float32)
    const = lin @ (deform.centre + deform.shift) + off
    rel = []
    for d in range(3):
        idx = np.arange(grid.box[d].start, grid.box[d].stop, dtype=np.float32)
        shape = [1, 1, 1]
        shape[d] = -1
        rel.append((grid.affine[d, 3] + grid.voxel_size * idx - np.float32(deform.centre[d])).reshape(shape))
    nx, ny, nz = (r.size for r in rel)
    coords = np.empty((3, nx, ny, nz), dtype=np.float32)
    for d in range(3):
        # field(x, y, z) = sum_j B_j(x, y) h_j(z): one matrix product writes the whole volume.
        amp, freq, phase = deform.elastic[d]
        planes = [
            matrix[d, 0] * rel[0] + matrix[d, 1] * rel[1] + np.float32(const[d]),
            np.full((1, 1, 1), 1.0),
        ]
        profiles = [np.ones(nz, np.float32), matrix[d, 2] * rel[2].ravel()]
        for a, f, p in zip(amp, freq, phase, strict=True):
            c0, c1, c2 = (np.cos(f[k] * rel[k] + p[k]).astype(np.float32) for k in range(3))
            planes.append(np.float32(a * scale[d]) * c0 * c1)
            profiles.append(c2.ravel())
        basis = np.stack([np.broadcast_to(b, (nx, ny, 1)).reshape(nx * ny) for b in planes], axis=1)
        np.matmul(basis.astype(np.float32), np.stack(profiles), out=coords[d].reshape(nx * ny, nz))
    if deform.push_at is not None and deform.push_strength > 0:
        _push(
            coords, grid, deform, lin @ deform.push_at + off, deform.push_radius * float(np.abs(scale).mean())
        )
    out = np.zeros((3, *coords.shape[1:]), dtype=np.float32)
    ndimage.map_coordinates(template.maps[0], coords, output=out[0], order=1, mode="constant", cval=0.0)
    inside = out[0] > 0.01
    points = coords[:, inside]
    for i in (1, 2):
        out[i][inside] = ndimage.map_coordinates(template.maps[i], points, order=1, mode="constant", cval=0.0)
    return out


def _push(coords: np.ndarray, grid: Grid, deform: Deformation, centre: np.ndarray, radius: float) -> None:
    """Mass effect: near the seed, sample from closer to it, so tissue is pushed outwards (in place)."""
    assert deform.push_at is not None
    at = (deform.to_output(deform.push_at) - grid.affine[:3, 3]) / grid.voxel_size
    at -= np.array([s.start for s in grid.box])
    half = 3.5 * radius / grid.voxel_size
    region = tuple(
        slice(int(max(np.floor(a - half), 0)), int(min(np.ceil(a + half) + 1, n)))
        for a, n in zip(at, coords.shape[1:], strict=True)
    )
    sub = coords[(slice(None), *region)]
    diff = sub - centre.astype(np.float32).reshape(3, 1, 1, 1)
    r2 = (diff**2).sum(axis=0)
    shrink = 1.0 - deform.push_strength * np.exp(-r2 / np.float32(2 * radius**2))
    coords[(slice(None), *region)] = centre.astype(np.float32).reshape(3, 1, 1, 1) + diff * shrink
