"""Synthetic scanner exports for the `data prepare` tests: phantom heads as DICOM series, moved by known transforms.

A phantom case (skull-stripped, on the atlas grid) gets a skull-like shell (dark bone, bright scalp)
and background noise, is moved by a random rigid transform (the patient's head in the scanner; each
series adds a little motion of its own) and sampled on a scanner grid of its own (oblique slices,
other spacing), then written slice by slice with pydicom under meaningless, shuffled file names.
The transforms are returned, so a test can measure how well `prepare` recovers them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from scipy import ndimage

from fedbrats.shared.constants import MODALITIES
from fedbrats.shared.data.phantom import PhantomCase, draw_site_profiles, make_case
from fedbrats.shared.data.phantom.anatomy import load_template, make_grid
from fedbrats.shared.data.prepare.atlas import Atlas, atlas_from_arrays
from fedbrats.shared.data.prepare.geometry import image_from_array, voxel_points

PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-0042-SECRET"
DESCRIPTIONS = {"t1": "t1_mprage_sag", "t1ce": "AX T1 POST GAD", "t2": "t2_tse_tra", "flair": "AX FLAIR"}
#: Shell intensities relative to the brain's median (T1-like: bright scalp fat, dark bone).
SCALP = {"t1": 1.3, "t1ce": 1.3, "t2": 0.9, "flair": 0.8}


@dataclass(frozen=True)
class TinyCase:
    """A small brain-like volume (no nilearn, no phantom): enough structure for a rigid registration."""

    images: dict[str, np.ndarray]
    affine: np.ndarray
    voxel_size: float


@lru_cache(maxsize=2)
def tiny_case(voxel_size: float = 4.0) -> TinyCase:
    """An ellipsoid brain with a grey rim, off-centre ventricles and a lesion, in a box with room for a skull."""
    shape = tuple(int(round(e / voxel_size)) for e in (160.0, 176.0, 140.0))
    affine = np.diag([voxel_size, voxel_size, voxel_size, 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) * voxel_size / 2
    mm = np.stack(np.meshgrid(*(voxel_size * (np.arange(n) - (n - 1) / 2) for n in shape), indexing="ij"))
    radius = np.sqrt(((mm / np.array([55.0, 65.0, 45.0])[:, None, None, None]) ** 2).sum(0))
    brain = radius < 1.0
    ventricles = (
        (
            (mm - np.array([8.0, -6.0, 6.0])[:, None, None, None])
            / np.array([9.0, 22.0, 10.0])[:, None, None, None]
        )
        ** 2
    ).sum(0) < 1  # noqa: E501
    lesion = (((mm - np.array([-25.0, 20.0, 12.0])[:, None, None, None]) / 11.0) ** 2).sum(0) < 1
    tissue = {
        "wm": brain & (radius < 0.8),
        "gm": brain & (radius >= 0.8),
        "csf": ventricles & brain,
        "lesion": lesion,
    }
    levels = {  # wm, gm, csf, lesion
        "t1": (1000, 700, 300, 500), "t1ce": (1000, 720, 320, 1500), "t2": (550, 800, 1600, 1300),
        "flair": (650, 850, 160, 1400),
    }  # fmt: skip
    images = {}
    for modality, values in levels.items():
        image = np.zeros(shape, np.float32)
        for name, value in zip(("wm", "gm", "csf", "lesion"), values, strict=True):
            image[tissue[name]] = value
        images[modality] = np.where(brain, ndimage.gaussian_filter(image, 0.7), 0).astype(np.int16)
        images[modality][brain] = np.maximum(images[modality][brain], 1)
    return TinyCase(images, affine, voxel_size)


@lru_cache(maxsize=2)
def phantom_case(voxel_size: float = 3.0, seed: int = 0) -> PhantomCase:
    """One phantom case at `voxel_size` (skull-stripped, on the MNI-based BraTS grid)."""
    site = draw_site_profiles(1, seed=seed, cases_per_site=1)[0]
    return make_case(seed, site, 1, make_grid(voxel_size), load_template(voxel_size))


def brain_of(case: PhantomCase | TinyCase) -> np.ndarray:
    return case.images["t1"] > 0  # phantom images are exactly 0 outside the brain, >= 1 inside


def phantom_atlas(case: PhantomCase | TinyCase) -> Atlas:
    """The untransformed case as the atlas: its T1ce and its brain mask, on its own grid."""
    return atlas_from_arrays("phantom", case.images["t1ce"], brain_of(case), case.affine)


def head(case: PhantomCase | TinyCase, modality: str, rng: np.random.Generator) -> np.ndarray:
    """The phantom's brain inside a shell: 0-4 mm dark bone, 4-9 mm bright scalp, then noisy air."""
    brain = brain_of(case)
    image = case.images[modality].astype(np.float32)
    level = float(np.median(image[brain]))
    distance = ndimage.distance_transform_edt(~brain, sampling=case.voxel_size)
    image[(distance > 0) & (distance <= 4)] = 0.08 * level
    image[(distance > 4) & (distance <= 9)] = SCALP[modality] * level
    image += np.abs(rng.normal(0.0, 0.02 * level, image.shape)).astype(np.float32)
    return image


def random_rigid(
    rng: np.random.Generator, centre, max_degrees: float, max_mm: float
) -> sitk.Euler3DTransform:
    transform = sitk.Euler3DTransform()
    transform.SetCenter(tuple(float(c) for c in centre))
    transform.SetRotation(*np.deg2rad(rng.uniform(-max_degrees, max_degrees, 3)))
    transform.SetTranslation(tuple(rng.uniform(-max_mm, max_mm, 3)))
    return transform


def scanner_grid(centre, spacing, size, tilt_degrees: float = 0.0) -> sitk.Image:
    """An empty scanner grid of `size` voxels centred on `centre` (LPS mm), slices tilted about x."""
    grid = sitk.Image([int(s) for s in size], sitk.sitkInt16)
    grid.SetSpacing(tuple(float(s) for s in spacing))
    a = np.deg2rad(tilt_degrees)
    direction = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    grid.SetDirection(tuple(direction.ravel()))
    half = direction @ ((np.asarray(size) - 1) * np.asarray(spacing) / 2)
    grid.SetOrigin(tuple(np.asarray(centre, float) - half))
    return grid


def write_series(
    folder: Path, image: sitk.Image, description: str, number: int, study_uid: str, rng: np.random.Generator
) -> str:
    """`image` (whole numbers) as one DICOM file per slice, shuffled names; returns the SeriesInstanceUID."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    voxels = sitk.GetArrayFromImage(image)  # [k, j, i]: slice k, row j, column i
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    sx, sy, sz = image.GetSpacing()
    names = rng.permutation(len(voxels))
    for k, plane in enumerate(voxels):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT_NAME, PATIENT_ID, "19700101"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = (
            study_uid,
            series_uid,
            generate_uid(),
        )
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", number, k + 1
        ds.SeriesDescription = ds.ProtocolName = description
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*direction[:, 0], *direction[:, 1])]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))]
        ds.PixelSpacing = [f"{sy:.6f}", f"{sx:.6f}"]  # row spacing (between rows), column spacing
        ds.SliceThickness = ds.SpacingBetweenSlices = f"{sz:.6f}"
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = np.ascontiguousarray(plane, dtype="<i2").tobytes()
        pydicom.dcmwrite(folder / f"IM{names[k]:05d}", ds, enforce_file_format=True)
    return series_uid


@dataclass
class Scan:
    """A written patient: folder, the true transform per modality (atlas point -> that series' scanner point)."""

    folder: Path
    to_scanner: dict[str, sitk.Transform]
    native_brain: sitk.Image  # the true brain on the T1ce's scanner grid
    series_uids: dict[str, str]


def write_patient(
    folder: Path,
    case: PhantomCase | TinyCase,
    seed: int,
    *,
    max_degrees: float = 12.0,
    max_mm: float = 15.0,
    motion_degrees: float = 3.0,
    motion_mm: float = 3.0,
    modalities=MODALITIES,
) -> Scan:
    """Four DICOM series of `case` moved by a random rigid transform, each with a little motion of its own."""
    rng = np.random.default_rng(seed)
    brain = brain_of(case)
    brain_image = image_from_array(brain.astype(np.uint8), case.affine)
    centre = voxel_points(brain_image).mean(axis=0)
    head_pose = random_rigid(rng, centre, max_degrees, max_mm)  # atlas point -> scanner point
    study = generate_uid()
    to_scanner, uids, native_brain = {}, {}, None
    for number, modality in enumerate(MODALITIES, start=2):
        pose = head_pose
        if modality != "t1ce":  # the patient moves a little between series
            motion = random_rigid(rng, head_pose.TransformPoint(tuple(centre)), motion_degrees, motion_mm)
            pose = sitk.CompositeTransform([motion, head_pose])
        spacing = (case.voxel_size, case.voxel_size, case.voxel_size * (1.25 if modality == "t2" else 1.0))
        size = np.ceil(np.array([200.0, 230.0, 190.0]) / np.asarray(spacing)).astype(int)
        grid = scanner_grid(
            pose.TransformPoint(tuple(centre)), spacing, size, tilt_degrees=rng.uniform(-15, 15)
        )
        inverse = (
            pose.GetInverse()
        )  # scanner point -> atlas point: what resampling onto the scanner grid needs
        source = image_from_array(head(case, modality, rng), case.affine)
        native = sitk.Resample(source, grid, inverse, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        native = sitk.Cast(sitk.Round(native), sitk.sitkInt16)
        if modality == "t1ce":
            native_brain = sitk.Resample(brain_image, grid, inverse, sitk.sitkNearestNeighbor, 0)
        to_scanner[modality] = pose
        if modality in modalities:
            uids[modality] = write_series(folder / f"S{number:03d}", native, DESCRIPTIONS[modality], number,
                                          study, rng)  # fmt: skip
    return Scan(folder, to_scanner, native_brain, uids)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))
