"""Which parameters a site trains (run key `trainable`): fnmatch patterns over the model's parameter names.

DP-SGD adds noise of the same scale to every trained coordinate, so the noise's norm grows with the
square root of the number of trained parameters while the clipped signal does not: fine-tuning a
subset (the decoder's last stage and the head) of a warm-started model is how DP-SGD learns at a
few hundred patients. Frozen parameters get ``requires_grad = False`` before the optimiser and
Opacus see the model, so they are neither clipped, nor noised, nor changed. Patterns are matched
case-sensitively (`fnmatch.fnmatchcase`), ``*`` also crosses dots: ``decoder.*`` is the whole decoder.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn

#: Every parameter (the default): nothing frozen.
ALL = "*"


def parse_patterns(trainable: str) -> list[str]:
    """The comma-separated patterns of `trainable`; none at all is an error (it would freeze everything)."""
    patterns = [p.strip() for p in str(trainable).split(",") if p.strip()]
    if not patterns:
        raise ValueError(f"trainable = {trainable!r} names no parameter and would freeze the whole model; "
                         f"use {ALL!r} to train every parameter, or patterns such as 'decoder.*,head.*'")  # fmt: skip
    return patterns


def _examples(names: list[str]) -> str:
    """A few real names and the top-level groups, for an error message."""
    groups = list(dict.fromkeys(n.split(".")[0] + ".*" for n in names))
    picked = list(dict.fromkeys([*names[:2], names[len(names) // 2], names[-1]])) if names else []
    return f"its parameters are named like {', '.join(picked)} (groups {', '.join(groups)})"


def trainable_names(model: nn.Module, trainable: str) -> list[str]:
    """The names of the parameters `trainable` selects, in the model's order.

    A pattern that matches no parameter is an error naming it and a few real names: a typo would
    otherwise freeze what the user meant to train, without a word.
    """
    patterns = parse_patterns(trainable)
    names = [name for name, _ in model.named_parameters()]
    what = getattr(model, "model_name", type(model).__name__)
    unmatched = [p for p in patterns if not any(fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise ValueError(f"trainable pattern(s) {', '.join(repr(p) for p in unmatched)} match no parameter of "
                         f"model {what!r}; {_examples(names)}")  # fmt: skip
    return [n for n in names if any(fnmatchcase(n, p) for p in patterns)]


def frozen_parameters(model: nn.Module, trainable: str) -> frozenset[str]:
    """The parameters `trainable` leaves out: the server keeps them as they are (buffers are not parameters)."""
    chosen = set(trainable_names(model, trainable))
    return frozenset(name for name, _ in model.named_parameters() if name not in chosen)


def apply_trainable(model: nn.Module, trainable: str) -> tuple[int, int]:
    """Set ``requires_grad`` of every parameter (True where `trainable` selects it, False elsewhere).

    Every parameter is set, not only the frozen ones, so a model reused under another configuration
    carries nothing over. Returns (trained, total) parameter counts (elements, not tensors).
    """
    chosen = set(trainable_names(model, trainable))
    trained = total = 0
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
        total += param.numel()
        trained += param.numel() if name in chosen else 0
    return trained, total


def trainable_summary(trained: int, total: int, trainable: str) -> str:
    """One line for logs: how much of the model is trained."""
    share = 100.0 * trained / total if total else 0.0
    return f"training {trained:,} of {total:,} parameters ({share:.2f}%, trainable = {trainable!r})"
