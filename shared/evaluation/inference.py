"""Whole-volume inference: sliding window, flip TTA, post-processing, labels, uncertainty, files.

Follows DESIGN section 4: MONAI's sliding window with Gaussian blending; flips averaged on the logits
before the sigmoid (as the UNet++ BraTS 2020 paper does); threshold 0.5; an ET smaller than
`min_et_voxels` becomes necrotic core; uncertainty u = 200(1-p) if p >= 0.5 else 200p (TuNet).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedbrats.shared.constants import REGIONS, LabelSet
from fedbrats.shared.evaluation.postprocess import (
    MIN_ET_MM3,
    min_et_voxels,
    postprocess,
    uncertainty,
)
from fedbrats.shared.labels import region_label_values, regions_to_labels

#: Spatial flips (axes of the [X, Y, Z] volume) averaged by TTA: identity and every combination, as nnU-Net.
TTA_FLIPS: tuple[tuple[int, ...], ...] = tuple(
    axes for n in range(4) for axes in itertools.combinations((0, 1, 2), n)
)

#: Windows per forward pass. Batch 1 is the slowest choice on CPU: PyTorch runs a small 3D convolution
#: of batch 1 through its generic `slow_conv3d` kernel and larger batches through oneDNN (measured
#: about 9x faster per 32^3 window with 4 windows a pass on the width-8 ResUNet).
SW_BATCH_SIZE = 4

def get_device(preference: str | torch.device | None = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu; 'cuda' without a GPU is an error saying so."""
    if isinstance(preference, torch.device):
        preference = str(preference)
    pref = (preference or "auto").lower()
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {preference!r} requested but no CUDA GPU is available; use 'auto' or 'cpu'")
    try:
        device = torch.device(pref)
    except RuntimeError as err:
        raise ValueError(f"unknown device {preference!r}; expected 'auto', 'cpu' or 'cuda[:N]'") from err
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed patch sizes: let cuDNN pick its fastest 3D kernels
    return device


def first_output(output: Any) -> torch.Tensor:
    """Full-resolution logits whether the model returns a tensor or a deep-supervision list."""
    if isinstance(output, list | tuple):
        return output[0]
    return output


def fast_layout(x: torch.Tensor) -> torch.Tensor:
    """Channels-last copy of a CPU batch [B, C, X, Y, Z]: oneDNN's 3D convolutions run 1.3-1.4x faster on it
    (measured: width-8 ResUNet, 32^3 patches, training batch 2 and inference batch 4; no gain at batch 1).
    Unchanged on GPU and for other shapes."""
    if x.device.type == "cpu" and x.ndim == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def predict_logits(
    model: nn.Module,
    image: torch.Tensor,
    *,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    tta: bool = True,
    flips: Sequence[Sequence[int]] = TTA_FLIPS,
    device: torch.device | str | None = None,
    sw_batch_size: int = SW_BATCH_SIZE,
) -> torch.Tensor:
    """Mean logits [3, X, Y, Z] (CPU, fp32) of `model` over a [4, X, Y, Z] image, averaged over flips if `tta`.

    Flips are applied per window (flip, predict, flip back, average), then windows are blended with
    Gaussian weights: one sliding-window pass whatever the number of flips.
    """
    from monai.inferers import sliding_window_inference

    if image.ndim != 4 or image.shape[0] != 4:
        raise ValueError(f"image has shape {tuple(image.shape)}; expected [4, X, Y, Z] (t1, t1ce, t2, flair)")
    device = get_device(device)
    model = model.to(device)
    was_training = model.training
    model.eval()
    x = torch.as_tensor(image, dtype=torch.float32)[None].to(device)
    passes = [[a + 2 for a in axes] for axes in (flips if tta else [()])]

    def predictor(window: torch.Tensor) -> torch.Tensor:
        total = None
        with _autocast(device):
            for dims in passes:
                out = first_output(model(fast_layout(torch.flip(window, dims) if dims else window))).float()
                out = torch.flip(out, dims) if dims else out
                total = out if total is None else total + out
        return total / len(passes)

    try:
        with torch.inference_mode():
            out = sliding_window_inference(
                x, tuple(int(p) for p in patch_size), sw_batch_size, predictor, overlap=overlap, mode="gaussian"
            )
    finally:
        model.train(was_training)
    return out[0].float().cpu()


def predict_probabilities(
    model: nn.Module,
    image: torch.Tensor,
    *,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    tta: bool = True,
    device: torch.device | str | None = None,
    sw_batch_size: int = SW_BATCH_SIZE,
) -> torch.Tensor:
    """Region probabilities [3, X, Y, Z] (ET, TC, WT): sigmoid of the (flip-averaged) logits."""
    logits = predict_logits(
        model, image, patch_size=patch_size, overlap=overlap, tta=tta, device=device, sw_batch_size=sw_batch_size
    )
    return torch.sigmoid(logits)


def _nifti(data: np.ndarray, affine: np.ndarray, header: Any):
    import nibabel as nib

    hdr = header.copy() if header is not None else nib.Nifti1Header()
    hdr.set_data_dtype(np.uint8)
    img = nib.Nifti1Image(data.astype(np.uint8), affine, hdr)
    img.header.set_slope_inter(1.0, 0.0)
    return img


def save_overlay(flair: np.ndarray, labels: np.ndarray, label_set: LabelSet, path: Path, title: str) -> Path:
    """PNG of the axial slice through the middle of the predicted tumour (middle slice if none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    zs = np.nonzero(labels.any(axis=(0, 1)))[0]
    z = int(zs[len(zs) // 2]) if len(zs) else labels.shape[2] // 2
    et, ncr, ed = region_label_values(label_set)
    colors = np.zeros((max(et, ncr, ed) + 1, 4))
    colors[ed] = (0.1, 0.8, 0.1, 0.5)
    colors[ncr] = (0.9, 0.1, 0.1, 0.6)
    colors[et] = (1.0, 0.9, 0.0, 0.7)
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.imshow(np.rot90(flair[:, :, z]), cmap="gray")
    ax.imshow(np.rot90(labels[:, :, z]), cmap=ListedColormap(colors), vmin=0, vmax=len(colors) - 1,
              interpolation="nearest")
    ax.set_title(f"{title} z={z}: ED green, core red, ET yellow", fontsize=8)
    ax.axis("off")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


@dataclass(frozen=True)
class Predictor:
    """A model and the patch it was trained on (its sliding-window size); `source` names it (a checkpoint)."""

    model: nn.Module
    patch_size: tuple[int, ...]
    source: str = ""


def training_patch(meta: dict[str, Any], checkpoint_path: str | Path) -> tuple[int, ...]:
    """The patch a checkpoint was trained on (metadata `patch_size`), which inference uses as its window."""
    if "patch_size" not in meta:
        raise ValueError(f"checkpoint {checkpoint_path} has no patch_size in its metadata; cannot run inference")
    return tuple(int(p) for p in meta["patch_size"])


def mean_probabilities(
    predictors: Sequence[Predictor],
    image: torch.Tensor,
    *,
    overlap: float = 0.5,
    tta: bool = True,
    device: torch.device | str | None = None,
    sw_batch_size: int = SW_BATCH_SIZE,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean region probabilities [3, X, Y, Z] of the predictors (each with its own window and flip TTA) and
    their standard deviation over the predictors (None for one). One model at a time, Welford's running
    mean and sum of squares in fp32, each model back on the CPU after its pass: memory stays flat."""
    if not predictors:
        raise ValueError("no model to predict with")
    mean = m2 = None
    for k, predictor in enumerate(predictors, start=1):
        probs = predict_probabilities(predictor.model, image, patch_size=predictor.patch_size, overlap=overlap,
                                      tta=tta, device=device, sw_batch_size=sw_batch_size)  # fmt: skip
        if len(predictors) > 1:
            predictor.model.cpu()
        if mean is None:
            mean, m2 = probs, torch.zeros_like(probs)
            continue
        delta = probs - mean
        mean = mean + delta / k
        m2 = m2 + delta * (probs - mean)
    return mean, (torch.sqrt(m2 / len(predictors)) if len(predictors) > 1 else None)


def spread_map(std: torch.Tensor | np.ndarray) -> np.ndarray:
    """How much the models disagree per voxel, uint8 in [0, 100]: 200 x the standard deviation of their
    probabilities (at most 0.5 for values in [0, 1]), the scale of the uncertainty maps."""
    return np.clip(np.rint(200.0 * np.asarray(std, dtype=np.float32)), 0, 100).astype(np.uint8)


def predict_case(
    checkpoint_path: str | Path,
    case_dir: str | Path,
    out_dir: str | Path,
    *,
    tta: bool = True,
    device: str = "auto",
    overlap: float = 0.5,
    min_et_mm3: float = MIN_ET_MM3,
) -> dict[str, Path]:
    """Segment one case folder with one checkpoint (`segment_case`); several: `ensemble.predict_ensemble`."""
    from fedbrats.shared.checkpoint import load_checkpoint

    model, meta = load_checkpoint(checkpoint_path)
    predictor = Predictor(model, training_patch(meta, checkpoint_path), str(checkpoint_path))
    return segment_case([predictor], case_dir, out_dir, tta=tta, device=device, overlap=overlap,
                        min_et_mm3=min_et_mm3)  # fmt: skip


def segment_case(
    predictors: Sequence[Predictor],
    case_dir: str | Path,
    out_dir: str | Path,
    *,
    tta: bool = True,
    device: str = "auto",
    overlap: float = 0.5,
    min_et_mm3: float = MIN_ET_MM3,
) -> dict[str, Path]:
    """Segment one case folder; write labels, three uncertainty maps and an overlay PNG into `out_dir`.

    Outputs have exactly the input shape and affine: the prediction of the cropped, normalised volume
    is padded back with the crop box. The label values follow the case's layout (ET = 4 for BraTS
    2017-2021 files, 3 for 2023+). Several predictors (an ensemble): the mean of their probabilities is
    segmented and its uncertainty mapped, and three maps of their spread (`spread_<region>`) are added.
    """
    from fedbrats.shared.constants import label_sets_for
    from fedbrats.shared.data.cases import find_case
    from fedbrats.shared.data.transforms import preprocess
    from fedbrats.shared.data.volumes import load_case

    case = find_case(Path(case_dir))
    volume = load_case(case, with_labels=False)
    image, _, box = preprocess(volume)
    probs, std = mean_probabilities(predictors, torch.as_tensor(image), overlap=overlap, tta=tta, device=device)
    regions = postprocess(probs.numpy() >= 0.5, min_et_voxels(volume.spacing, min_et_mm3), brain=(image != 0).any(0))
    label_set = getattr(volume, "label_set", None) or label_sets_for(case.layout)[0]
    labels = box.uncrop(regions_to_labels(regions, label_set))
    maps = {"uncertainty": (box.uncrop(np.rint(uncertainty(probs)).astype(np.uint8)), "unc")}
    if std is not None:
        maps["spread"] = (box.uncrop(spread_map(std)), "spread")

    import nibabel as nib

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {"labels": out_dir / f"{case.case_id}_pred.nii.gz"}
    nib.save(_nifti(labels, volume.affine, volume.header), written["labels"])
    for kind, (values, suffix) in maps.items():
        for i, region in enumerate(REGIONS):
            written[f"{kind}_{region}"] = out_dir / f"{case.case_id}_{suffix}_{region}.nii.gz"
            nib.save(_nifti(values[i], volume.affine, volume.header), written[f"{kind}_{region}"])
    title = case.case_id if len(predictors) == 1 else f"{case.case_id}, ensemble of {len(predictors)}"
    overlay = out_dir / f"{case.case_id}_overlay.png"
    written["overlay"] = save_overlay(volume.image[3], labels, label_set, overlay, title)
    return written
