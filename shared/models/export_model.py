"""The model under export and the check every export passes (`fedbrats.shared.models.export`).

A checkpoint becomes an `ExportModel`: the network in eval mode on CPU in fp32, its metadata, the names
of its outputs, and check inputs shaped as in training: `[B, 4, *patch_size]` (t1, t1ce, t2, flair,
z-scored) for segmentation, giving region logits `[B, 3, ...]` (ET, TC, WT; sigmoid applied outside);
a case classifier's `[B, 4, s, s, s]` cube (`class_input_size`), giving class logits `[B, n_classes]`.
A second check input has another batch size (and, for the U-Net, another spatial shape), so an export
whose axes are not really dynamic fails its check. Models are traced, not scripted: their Python
branches depend only on the configuration (deep supervision is off in eval mode, a classification head
exists or not), which a trace fixes.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedbrats.shared.checkpoint import load_checkpoint
from fedbrats.shared.constants import MODALITIES, REGIONS

#: Largest accepted |exported - PyTorch| on the check inputs (fp32 logits).
TOLERANCE = 1e-4


class ExportError(ValueError):
    """An export that cannot be done as asked (format, output path, model, or a failed check)."""


@dataclass(frozen=True)
class ExportModel:
    """A checkpoint's model ready to export: eval mode, CPU, fp32, with its metadata and I/O names."""

    model: nn.Module
    meta: dict[str, Any]
    source: Path
    inputs: tuple[torch.Tensor, ...]  # check inputs: the training patch first, then another batch and shape
    output_names: tuple[str, ...]
    spatial_dynamic: bool = True  # False: the export runs on the first input's spatial shape only
    references: dict[int, list[torch.Tensor]] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def classifies_only(self) -> bool:
        return self.output_names == ("class_logits",)

    @property
    def trace_input(self) -> torch.Tensor:
        """The example a trace records: the smaller input (less time and memory than a 128^3 patch) when the
        axes are dynamic, since the check runs the result on both; the patch itself when they are fixed."""
        return self.inputs[-1] if self.spatial_dynamic else self.inputs[0]

    def fixed(self) -> ExportModel:
        """The same export with the spatial axes fixed: the second check input is a batch of 2 of the first's shape."""
        second = torch.randn((2, *self.inputs[0].shape[1:]), generator=torch.Generator().manual_seed(1))
        return replace(self, inputs=(self.inputs[0], second), spatial_dynamic=False)

    def summary(self) -> dict[str, Any]:
        """The metadata every exported file carries: what the model is and what its channels mean."""
        keep = ("task", "patch_size", "round", "strategy", "digest", "classes", "label_column", "class_input_size")
        return {
            "source": self.source.name,
            "model_name": self.meta["model_name"],
            "model_config": self.meta["model_config"],
            **{k: self.meta[k] for k in keep if k in self.meta},
            "input": {"name": "image", "channels": list(MODALITIES), "normalisation": "z-score over non-zero voxels"},
            "outputs": list(self.output_names),
            "spatial_axes": "dynamic" if self.spatial_dynamic else "fixed to the first check input",
            "regions": [] if self.classifies_only else list(REGIONS),
        }


def _case_classifier(meta: dict[str, Any]) -> bool:
    """As `evaluation.predict_class.is_case_classifier`, without importing MONAI's transforms (tens of seconds)."""
    from fedbrats.shared.config import RunConfig
    from fedbrats.shared.tasks import task_for

    task = task_for(RunConfig(task=str(meta.get("task", "segmentation"))))
    return task.classifies and not task.needs_masks


def prepare_model(checkpoint: str | Path) -> ExportModel:
    """Load the checkpoint and choose the check inputs from its metadata (patch or class cube)."""
    checkpoint = Path(checkpoint)
    model, meta = load_checkpoint(checkpoint)
    model = model.float().cpu().eval()
    generator = torch.Generator().manual_seed(0)
    if _case_classifier(meta):
        size = int(meta.get("class_input_size") or 64)
        shapes = [(1, len(MODALITIES), size, size, size), (2, len(MODALITIES), size, size, size)]
    else:
        if "patch_size" not in meta:
            raise ExportError(
                f"checkpoint {checkpoint} has no patch_size in its metadata; the export needs the training patch "
                "(checkpoints written by fedbrats train or simulate carry it)"
            )
        patch = [int(p) for p in meta["patch_size"]]
        multiple = getattr(model, "size_multiple", None)
        # another batch and shape, so axes that a trace froze fail the check (unknown constraints: the batch only)
        small = [int(multiple) * k for k in (2, 3, 2)] if multiple else patch
        shapes = [(1, len(MODALITIES), *patch), (2, len(MODALITIES), *small)]
    inputs = tuple(torch.randn(shape, generator=generator) for shape in shapes)
    with torch.no_grad():
        out = model(inputs[-1])  # the smaller input: this forward only names the outputs
    if isinstance(out, tuple | list) and len(out) == 2 and out[1].ndim == 2:
        names: tuple[str, ...] = ("logits", "class_logits")
    elif isinstance(out, torch.Tensor) and out.ndim == 2:
        names = ("class_logits",)
    elif isinstance(out, torch.Tensor):
        names = ("logits",)
    else:
        raise ExportError(f"{checkpoint}: model {meta['model_name']!r} returns {type(out).__name__}; expected "
                          "logits, class logits, or both")  # fmt: skip
    return ExportModel(model, meta, checkpoint, inputs, names)


def as_outputs(out: Any) -> list[torch.Tensor]:
    """A model's output as a list of tensors (one for a plain model, two for a multi-task U-Net)."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [torch.as_tensor(o) for o in out]


def reference_outputs(em: ExportModel) -> list[list[torch.Tensor]]:
    """The PyTorch model's outputs on each check input: what every export is compared with."""
    with torch.no_grad():
        for x in em.inputs:  # computed once per input: at a 128^3 patch each forward takes seconds
            if id(x) not in em.references:
                em.references[id(x)] = as_outputs(em.model(x))
    return [em.references[id(x)] for x in em.inputs]


def max_abs_diff(expected: list[list[torch.Tensor]], actual: list[list[Any]]) -> float:
    """Largest |actual - expected| over all inputs and outputs; a shape mismatch is an error."""
    worst = 0.0
    for want_all, got_all in zip(expected, actual, strict=True):
        for want, got in zip(want_all, got_all, strict=True):
            got = torch.as_tensor(got)
            if tuple(got.shape) != tuple(want.shape):
                raise ExportError(f"the exported model gives shape {tuple(got.shape)}; PyTorch gives {tuple(want.shape)}")
            worst = max(worst, float((got.float() - want.float()).abs().max()))
    return worst


@contextlib.contextmanager
def quiet_tracing() -> Iterator[None]:
    """Tracing warns about every Python branch on a shape (our input checks: fixed at export, expected), and
    recent torch (2.13 here) calls TorchScript and the legacy ONNX exporter deprecated: both still work (docs/export.md)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def require_match(diff: float, what: str) -> None:
    """Refuse an export whose outputs differ from PyTorch by more than TOLERANCE (or are NaN)."""
    if not diff <= TOLERANCE:  # also catches NaN
        raise ExportError(f"{what} output differs from PyTorch by up to {diff:.3g} (> {TOLERANCE:g}); nothing written")


#: Builds an export of a candidate: (the bytes to write, a function running them on one input).
Build = Callable[[ExportModel], tuple[bytes, Callable[[torch.Tensor], Any]]]


def checked_export(em: ExportModel, build: Build, what: str) -> tuple[ExportModel, bytes, float]:
    """Build, then run the result on every check input and compare with PyTorch. When it fails on the second
    (other) shape, a trace froze a shape-dependent loop of the model (e.g. over slices): build once more with
    the spatial axes fixed to the training patch, which a sliding window of that roi still feeds."""
    failure = ""
    for candidate in (em, em.fixed()) if em.spatial_dynamic and not em.classifies_only else (em,):
        data, run = build(candidate)
        try:
            got = [as_outputs(run(x)) for x in candidate.inputs]
            diff = max_abs_diff(reference_outputs(candidate), got)
        except Exception as err:  # noqa: BLE001 - any failure of the exported model is a failed check
            first = (str(err).strip().splitlines() or [type(err).__name__])[-1]
            failure = f"{what} does not run on the check inputs {_shapes(candidate)}: {first[:300]}"
            continue
        if diff <= TOLERANCE:
            return candidate, data, diff
        failure = f"{what} output differs from PyTorch by up to {diff:.3g} (> {TOLERANCE:g}) on {_shapes(candidate)}"
    raise ExportError(f"{failure}; nothing written")


def _shapes(em: ExportModel) -> str:
    return ", ".join("x".join(str(s) for s in x.shape) for x in em.inputs)


def torchscript_bytes(em: ExportModel) -> tuple[ExportModel, bytes, float]:
    """Trace the model, save it with the metadata as `fedbrats.json`, reload the bytes and compare."""

    def build(candidate: ExportModel) -> tuple[bytes, Callable[[torch.Tensor], Any]]:
        with quiet_tracing(), torch.no_grad():
            traced = torch.jit.trace(candidate.model, candidate.trace_input, check_trace=False)
            buffer = io.BytesIO()
            torch.jit.save(traced, buffer, _extra_files={"fedbrats.json": json.dumps(candidate.summary())})
            loaded = torch.jit.load(io.BytesIO(buffer.getvalue()), map_location="cpu")

        def run(x: torch.Tensor) -> Any:
            with quiet_tracing(), torch.no_grad():
                return loaded(x)

        return buffer.getvalue(), run

    return checked_export(em, build, "TorchScript")
