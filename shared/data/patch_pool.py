"""Random patch-size training (bag-of-tricks seed paper, DESIGN section 4): a pool of batch shapes.

Large patches give context but allow only small batches (noisy gradients); small patches allow large
batches but see less. The paper keeps a pool of batches of different patch sizes, a large patch with
a small batch, and draws one at random for every step (its pool: 64x15, 80x8, 96x4, 112x2, 128x1, 144x1).

Run configuration: ``patch-pool = "64x4,96x2,128x1"`` (PATCH x BATCH, cubic patches; "" = off, every
batch is ``batch-size`` patches of ``patch-size``). ``patch-size`` stays the sliding-window size of
inference. Every pool patch must pass through the model (a multiple of 2^(depth-1)), as ``patch-size``.

An epoch is still about one pass over the patients: ceil(cases / mean pool batch size) steps, each
taking the next patients of a shuffled order (every patient once per pass, none twice in a batch).
The pool applies to the segmentation task without DP-SGD: DP-SGD samples each patient at a fixed rate
(Poisson), which a batch size drawn per step would break; the configuration refuses the combination.

The batch sampler yields keys ``(case index, (p, p, p))``; `PatientDataset.__getitem__` cuts a patch of
that size for such a key.
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple

import numpy as np

_ENTRY = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")
KEY = "patch-pool"


class PoolEntry(NamedTuple):
    """One batch shape of the pool: cubic patches of edge `patch`, `batch` of them."""

    patch: int
    batch: int


def parse_patch_pool(text: str) -> tuple[PoolEntry, ...]:
    """The pool of ``"PATCHxBATCH,..."`` (e.g. ``"48x2,64x1"``); "" is the empty pool. Errors name the entry."""
    entries: list[PoolEntry] = []
    for part in text.split(","):
        if not part.strip():
            if text.strip():
                raise ValueError(
                    f"{KEY} {text!r} has an empty entry; expected PATCHxBATCH pairs such as '48x2,64x1'"
                )
            continue
        match = _ENTRY.match(part)
        if match is None:
            raise ValueError(f"{KEY} entry {part.strip()!r} must be PATCHxBATCH, two positive integers "
                             "such as 48x2 (cubic patch edge x patches per batch)")  # fmt: skip
        entry = PoolEntry(int(match[1]), int(match[2]))
        if entry.patch < 1 or entry.batch < 1:
            raise ValueError(f"{KEY} entry {part.strip()!r}: patch edge and batch size must be >= 1")
        if any(e.patch == entry.patch for e in entries):
            raise ValueError(
                f"{KEY} lists patch size {entry.patch} twice; give each patch size one batch size"
            )
        entries.append(entry)
    return tuple(entries)


def pool_problems(text: str, *, multiple: int, dp: bool, task: str) -> list[str]:
    """What is wrong with a run's ``patch-pool`` (RunConfig validation); [] when it is "" or usable."""
    if not text.strip():
        return []
    try:
        pool = parse_patch_pool(text)
    except ValueError as err:
        return [str(err)]
    problems = []
    bad = [e.patch for e in pool if e.patch % multiple]
    if bad:
        problems.append(f"{KEY} patch sizes {bad} must be multiples of 2^(model-depth - 1) = {multiple}")
    if dp:
        problems.append(f"{KEY} does not combine with dp = true: DP-SGD samples patients at a fixed rate "
                        "(Poisson), a batch size drawn per step would break it; use patch-size and batch-size")  # fmt: skip
    if task != "segmentation":
        problems.append(f"{KEY} applies to task 'segmentation' (it varies the patches cut from region masks), "
                        f"got task {task!r}")  # fmt: skip
    return problems


def mean_batch(pool: tuple[PoolEntry, ...]) -> float:
    """The expected batch size of one step (entries are drawn with equal probability)."""
    return sum(e.batch for e in pool) / len(pool)


def batches_per_pass(n_items: int, pool: tuple[PoolEntry, ...]) -> int:
    """Steps of one epoch: about one pass over `n_items` patients."""
    if not pool:
        raise ValueError(f"{KEY} is empty")
    return max(1, math.ceil(n_items / mean_batch(pool)))


class PatchPoolBatches:
    """A DataLoader `batch_sampler`: each batch draws a pool entry, then that many patients of a shuffled pass.

    Deterministic for a given `seed`; successive passes (epochs) continue the same random stream.
    """

    def __init__(self, n_items: int, pool: tuple[PoolEntry, ...], *, seed: int = 0):
        if n_items < 1:
            raise ValueError(
                "cannot sample batches from an empty dataset; the site has no usable training case"
            )
        if not pool:
            raise ValueError(f"{KEY} is empty")
        self.n_items = n_items
        self.pool = tuple(PoolEntry(*e) for e in pool)
        self._rng = np.random.default_rng(seed)
        self._queue: list[int] = []

    def __len__(self) -> int:
        return batches_per_pass(self.n_items, self.pool)

    def _take(self, size: int) -> list[int]:
        size = min(size, self.n_items)
        batch, self._queue = self._queue[:size], self._queue[size:]
        if len(batch) < size:  # the pass ran out: the next pass's first patients not already in this batch
            fresh = self._rng.permutation(self.n_items).tolist()
            held = set(batch)
            picked = [i for i in fresh if i not in held][: size - len(batch)]
            taken = set(picked)
            batch, self._queue = batch + picked, [i for i in fresh if i not in taken]
        return batch

    def __iter__(self):
        for _ in range(len(self)):
            entry = self.pool[int(self._rng.integers(len(self.pool)))]
            yield [(i, (entry.patch,) * 3) for i in self._take(entry.batch)]


def pool_loader(dataset: Any, pool: tuple[PoolEntry, ...], *, seed: int, num_workers: int = 0,
                pin_memory: bool = False) -> Any:  # fmt: skip
    """A DataLoader over `dataset` (a `PatientDataset`) whose batches follow the pool."""
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_sampler=PatchPoolBatches(len(dataset), pool, seed=seed),
                      num_workers=num_workers, pin_memory=pin_memory)  # fmt: skip
