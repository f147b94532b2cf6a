"""Any 2D network as a model of the 3D pipeline: the axial slices of a volume become a batch of images.

`Slicewise(net2d)` takes the input every model takes, `[B, C, X, Y, Z]`, folds the axial axis Z into the
batch (`[B*Z, C, X, Y]`), runs the 2D network once on all slices, and unfolds what it returns
(`[B*Z, K, X, Y]` -> `[B, K, X, Y, Z]`; lists and tuples of outputs alike). Nothing else changes:

- training: a patch of the dataset is a stack of axial slices, so a batch of patches is slice sampling
  (every slice of every patch is a 2D training image; the foreground-biased crop keeps tumor slices in);
- inference: the sliding window returns a 3D volume in the input's geometry, computed slice by slice in
  batches of `windows x Z` slices;
- checkpoints, federation and evaluation see an ordinary model.

DP-SGD: the patient is the privacy unit, one item of the batch, and a slice is not one. Opacus computes
per-sample gradients per layer, along the batch axis each layer sees, which inside a 2D network is
`B*Z` slices: every slice would be clipped alone and a patient's sensitivity would grow Z-fold. But
Opacus treats a module that holds parameters of its own and has no grad sampler as ONE unit and
differentiates its whole forward per sample with functorch (`vmap` over its own batch axis). The
wrapper therefore owns a parameter, `gain` (one learned intensity gain per input channel, 1 at start,
redundant with the first convolution and harmless): the per-sample gradients are then per patient,
in Opacus' `functorch` and `hooks` modes alike (tests/test_model_resfcn2d.py checks them against each
patient's own backward). `vmap` refuses random operations, so a 2D network with active dropout cannot
be trained with DP-SGD; `Slicewise.dp_problem` says so and Opacus' `ModuleValidator` reports it, so a
site refuses before its first step.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

#: The axis of `[B, C, X, Y, Z]` that is folded into the batch: the axial one (BraTS volumes are X, Y, Z axial).
SLICE_AXIS = 4


def fold_slices(x: torch.Tensor) -> torch.Tensor:
    """`[B, C, X, Y, Z]` -> `[B*Z, C, X, Y]`, slices of a patient next to each other."""
    b, c, sx, sy, sz = x.shape
    return x.permute(0, 4, 1, 2, 3).reshape(b * sz, c, sx, sy)


def unfold_slices(output: Any, batch: int) -> Any:
    """`[B*Z, *rest]` -> `[B, *rest, Z]` for a tensor, a list or a tuple of them (deep supervision, heads)."""
    if isinstance(output, list | tuple):
        return type(output)(unfold_slices(o, batch) for o in output)
    if not isinstance(output, torch.Tensor) or output.ndim < 1 or output.shape[0] % batch:
        raise ValueError(f"a 2D network must return tensors [B*Z, ...]; got {type(output).__name__} "
                         f"{tuple(getattr(output, 'shape', ()))} for a batch of {batch}")  # fmt: skip
    y = output.reshape(batch, output.shape[0] // batch, *output.shape[1:])
    return y.movedim(1, -1)


class Slicewise(nn.Module):
    """A 2D network applied to every axial slice; input and outputs in the 3D layout of the pipeline.

    Args:
        net: the 2D network: `[N, in_channels, X, Y]` -> `[N, K, X, Y]` (or a list/tuple of such).
        in_channels: input channels (4 modalities).
        size_multiple: in-plane sizes must be multiples of it (2^(levels-1) of the 2D network); Z is free.
    """

    def __init__(self, net: nn.Module, in_channels: int, size_multiple: int = 1):
        super().__init__()
        if size_multiple < 1:
            raise ValueError(f"size_multiple must be >= 1, got {size_multiple}")
        self.in_channels = in_channels
        self.in_plane_multiple = size_multiple
        # Makes Opacus differentiate the whole wrapper per patient (module docstring); a real, learned gain.
        self.gain = nn.Parameter(torch.ones(in_channels))
        self.net = net

    @property
    def size_multiple(self) -> int:
        """In-plane sizes must be multiples of this (the axial size may be anything)."""
        return self.in_plane_multiple

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError naming the shape when the input cannot pass through the 2D network."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input [B, {self.in_channels}, X, Y, Z], got shape {tuple(x.shape)}")
        bad = [s for s in x.shape[2:4] if s % self.size_multiple]
        if bad:
            raise ValueError(f"in-plane sizes {tuple(x.shape[2:4])} must be multiples of {self.size_multiple} "
                             "(the 2D network's downsampling); the axial size is free")  # fmt: skip

    def forward(self, x: torch.Tensor) -> Any:
        self.check_input(x)
        x = x * self.gain.view(1, -1, 1, 1, 1).to(x.dtype)
        return unfold_slices(self.net(fold_slices(x)), x.shape[0])

    def dp_problem(self) -> str | None:
        """Why DP-SGD cannot train this model (active dropout: per-patient gradients are computed under
        `vmap`, which refuses random operations), or None."""
        dropouts = [m for m in self.net.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
        if not dropouts:
            return None
        name = getattr(self, "model_name", type(self).__name__)
        return (f"slice-wise model {name!r} has dropout, which DP-SGD cannot run: its per-patient gradients are "
                "computed under vmap, which refuses random operations; set model-dropout = 0 "
                f"({len(dropouts)} dropout layer(s), p = {dropouts[0].p})")  # fmt: skip

    def train(self, mode: bool = True) -> Slicewise:
        if mode and "opacus" in sys.modules:  # a DP site: let Opacus' ModuleValidator see `dp_problem`
            register_dp_check()
        return super().train(mode)


def _subclasses(cls: type) -> list[type]:
    found = [cls]
    for sub in cls.__subclasses__():
        found += _subclasses(sub)
    return found


def _validate(module: Slicewise) -> list:
    from opacus.validators.errors import UnsupportedModuleError

    problem = module.dp_problem()
    return [] if problem is None else [UnsupportedModuleError(problem)]


def register_dp_check() -> None:
    """Register `Slicewise.dp_problem` (for every subclass) with Opacus' `ModuleValidator` (imports Opacus).

    Opacus looks validators up by exact type. `Slicewise.train` calls this when Opacus is loaded (a DP
    site validates after `model.train()`); `classifier.dp_problem` calls it before validating.
    """
    from opacus.validators.module_validator import ModuleValidator

    for cls in _subclasses(Slicewise):
        ModuleValidator.VALIDATORS.setdefault(cls, _validate)
