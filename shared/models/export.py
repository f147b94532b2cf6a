"""A checkpoint in the formats other tools load: TorchScript, ONNX, a MONAI bundle (`fedbrats export`).

The consortium's global model is a safetensors file that only FedBraTS can rebuild. Clinical and
research tools load TorchScript (libtorch, MONAI Deploy), ONNX (onnxruntime, 3D Slicer plugins,
vendors' runtimes) or MONAI bundles (MONAI Label, the model zoo). Every export is checked before it is
written: the exported model runs on the same inputs as the PyTorch model (`export_model`) and the
largest absolute difference of their outputs is reported; over `TOLERANCE` nothing is written.
Batch and spatial axes stay dynamic, so a sliding window of any size can use an exported U-Net.
"""

from __future__ import annotations

import copy
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedbrats.shared.atomic import atomic_write
from fedbrats.shared.constants import MODALITIES
from fedbrats.shared.models.export_bundle import write_bundle
from fedbrats.shared.models.export_model import (
    TOLERANCE,
    ExportError,
    ExportModel,
    checked_export,
    prepare_model,
    quiet_tracing,
    torchscript_bytes,
)
from fedbrats.shared.models.registry import count_parameters

__all__ = ["FORMATS", "OPSET", "TOLERANCE", "ExportError", "ExportResult", "export_checkpoint"]

FORMATS: tuple[str, ...] = ("torchscript", "onnx", "monai-bundle")
#: ONNX opset: 17 is read by onnxruntime >= 1.13 and most vendors' runtimes.
OPSET = 17


@dataclass(frozen=True)
class ExportResult:
    """What was written and how well the exported model matches the PyTorch one."""

    format: str
    path: Path
    seconds: float
    max_abs_diff: float
    check_shapes: tuple[tuple[int, ...], ...]
    parameters: int
    notes: tuple[str, ...] = field(default_factory=tuple)


def check_output_path(out: str | Path, *, force: bool, folder: bool) -> Path:
    """Refuse an existing output unless --force; never replace a folder by a file or a foreign folder."""
    out = Path(out)
    if not out.exists():
        if not out.parent.is_dir():
            raise ExportError(f"cannot write {out}: its folder {out.parent} does not exist")
        return out
    if not force:
        raise ExportError(f"{out} already exists; pass --force to replace it, or choose another --out")
    if folder and not (out.is_dir() and (out / "configs" / "metadata.json").is_file()):
        raise ExportError(f"{out} exists and is not a MONAI bundle; --force replaces only a bundle folder")
    if not folder and out.is_dir():
        raise ExportError(f"{out} is a folder; the export writes one file: choose a file name")
    return out


def _axes_note(em: ExportModel) -> str:
    if em.spatial_dynamic:
        return "batch and spatial axes dynamic"
    patch = "x".join(str(s) for s in em.inputs[0].shape[2:])
    return (f"batch axis dynamic; spatial axes fixed to {patch} (the model's forward depends on the shape): "
            "use it through a sliding window of that roi")  # fmt: skip


def export_torchscript(em: ExportModel, out: Path) -> tuple[ExportModel, float, list[str]]:
    """The traced model, checked against PyTorch, written atomically."""
    em, data, diff = torchscript_bytes(em)
    atomic_write(out, data)
    return em, diff, [f"load with torch.jit.load(path); {_axes_note(em)}; metadata in the extra file fedbrats.json"]


def _staged_mean(x: torch.Tensor, start: int) -> torch.Tensor:
    """Mean over the axes from `start` on, one axis at a time. onnxruntime sums a reduction in one fp32 pass:
    over a 128^3 patch a GroupNorm drifts by ~3e-3 and the default ResUNet by ~1e-3 (measured); per-axis means
    keep it at PyTorch's own accuracy (~1e-6 against fp64) for ~15 % more GroupNorm time."""
    for axis in range(x.ndim - 1, start - 1, -1):
        x = x.mean(axis, keepdim=True)
    return x


class StagedGroupNorm(nn.Module):
    """`nn.GroupNorm` as the same function with staged means (`_staged_mean`), for the ONNX graph only."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.groups, self.eps, self.weight, self.bias = norm.num_groups, norm.eps, norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            return F.group_norm(x, self.groups, self.weight, self.bias, self.eps)
        grouped = x.reshape(x.shape[0], self.groups, -1, x.shape[3], x.shape[4])  # [B, G, C/G * X, Y, Z]
        centred = grouped - _staged_mean(grouped, 2)
        y = (centred * torch.rsqrt(_staged_mean(centred * centred, 2) + self.eps)).reshape(x.shape)
        if self.weight is None:
            return y
        return y * self.weight.view(1, -1, 1, 1, 1) + self.bias.view(1, -1, 1, 1, 1)


class StagedGlobalPool(nn.Module):
    """`nn.AdaptiveAvgPool3d(1)` (squeeze-and-excitation, classification heads) with staged means."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _staged_mean(x, 2)


def onnx_friendly(model: nn.Module) -> nn.Module:
    """A copy of `model` whose GroupNorms and global poolings onnxruntime computes as accurately as PyTorch."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            setattr(parent, name, _staged(child))
    return _staged(model).eval()


def _staged(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.GroupNorm):
        return StagedGroupNorm(module)
    if isinstance(module, nn.AdaptiveAvgPool3d) and module.output_size in (1, (1, 1, 1)):
        return StagedGlobalPool()
    return module


def _onnx_bytes(em: ExportModel, opset: int) -> bytes:
    """The legacy (TorchScript-based) exporter: the dynamo one needs onnxscript, which we do not install, and
    traces these convolution-only graphs no better."""
    axes_of = {0: "batch", 2: "x", 3: "y", 4: "z"} if em.spatial_dynamic else {0: "batch"}
    axes = {"image": axes_of}
    for name in em.output_names:
        axes[name] = {0: "batch"} if name == "class_logits" else axes_of
    buffer = io.BytesIO()
    with quiet_tracing(), torch.no_grad():
        torch.onnx.export(
            onnx_friendly(em.model), (em.trace_input,), buffer, dynamo=False, input_names=["image"],
            output_names=list(em.output_names), dynamic_axes=axes, opset_version=opset, do_constant_folding=True,
        )  # fmt: skip
    return buffer.getvalue()


def export_onnx(em: ExportModel, out: Path, opset: int = OPSET) -> tuple[ExportModel, float, list[str]]:
    """Export, stamp the metadata into the model's properties, check the graph, compare with onnxruntime."""
    import onnx
    import onnxruntime as ort

    def build(candidate: ExportModel) -> tuple[bytes, Callable[[torch.Tensor], Any]]:
        proto = onnx.load_from_string(_onnx_bytes(candidate, opset))
        summary = candidate.summary()
        onnx.helper.set_model_props(proto, {
            "fedbrats": json.dumps(summary), "modalities": ",".join(MODALITIES),
            "regions": ",".join(summary["regions"]),
        })  # fmt: skip
        onnx.checker.check_model(proto)
        data = proto.SerializeToString()
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        options.log_severity_level = 4  # a failed run is our check's error message, not onnxruntime's log line
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        return data, lambda x: session.run(list(candidate.output_names), {"image": x.numpy()})

    em, data, diff = checked_export(em, build, "ONNX (onnxruntime)")
    atomic_write(out, data)
    return em, diff, [f"opset {opset}; input 'image', outputs {', '.join(repr(n) for n in em.output_names)}; "
                      f"{_axes_note(em)}; metadata in the model properties (key 'fedbrats')"]  # fmt: skip


def export_checkpoint(
    checkpoint: str | Path,
    fmt: str,
    out: str | Path,
    *,
    force: bool = False,
    label_set: str | None = None,
    opset: int = OPSET,
) -> ExportResult:
    """Export `checkpoint` as `fmt` to `out`: checked against PyTorch first, written atomically after."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    out = check_output_path(out, force=force, folder=fmt == "monai-bundle")
    start = time.perf_counter()
    em = prepare_model(checkpoint)
    if fmt == "torchscript":
        em, diff, notes = export_torchscript(em, out)
    elif fmt == "onnx":
        em, diff, notes = export_onnx(em, out, opset)
    else:
        em, diff, notes = write_bundle(em, out, label_set=label_set)
    return ExportResult(
        fmt, out, time.perf_counter() - start, diff, tuple(tuple(x.shape) for x in em.inputs),
        count_parameters(em.model), tuple(notes),
    )  # fmt: skip


