"""Class-balanced training items: each case's target carries its class weight (run configuration `class-balance`).

A site's rare class (the LGG among mostly HGG) would otherwise weigh little in the loss. The weight of
class c at a site is n / (k * n_c): n training cases, k classes present there, n_c of class c, so the
mean weight over the site's cases is 1 and the loss keeps its scale (a one-class site: weight 1).
Computed from the site's own training labels: nothing about other sites' labels is needed.

The weight travels in the target (`[index, weight]`, float) rather than in a loss built per site, so
the loss stays a plain function of (outputs, targets) wherever a task's loss is called, DP-SGD
included: `shared.tasks.ClassificationTask.loss` reads the two columns.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils.data import Dataset


def class_weights(labels: list[int]) -> dict[int, float]:
    """Inverse class frequency, normalised so the mean weight over `labels` is 1: n / (k * n_c)."""
    counts = Counter(int(x) for x in labels)
    n, k = len(labels), len(counts)
    return {c: n / (k * m) for c, m in counts.items()}


class ClassBalanced(Dataset):
    """A classification dataset whose items are `(image, [class index, class weight])`; the rest is the wrapped one's."""

    def __init__(self, dataset: Any):
        self.dataset = dataset
        self.weights = class_weights(dataset.labels)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, index = self.dataset[i]
        return image, torch.tensor([float(index), self.weights[int(index)]], dtype=torch.float32)

    def __getattr__(self, name: str) -> Any:  # labels, cases, skipped, image, reseed, case_ids, ...
        if name == "dataset":  # not yet set (unpickling in a worker): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)
