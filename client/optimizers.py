"""A site's local optimiser (`local-optimizer`: adam | sgd) for non-private training, without `torch.optim`'s
start-up cost.

Every `torch.optim.Optimizer` imports `torch._dynamo` when it is built (`add_param_group` is wrapped
by `torch._disable_dynamo`) and again in `step`: about 1.6 CPU s, paid by every deployed train
message since Flower starts a fresh ClientApp process for each (benchmarks/RESULTS.md, "A light site
process"). `SiteAdam` is the same update as `torch.optim.Adam` (L2 `weight_decay`, no amsgrad), on
the same state, with the foreach kernels PyTorch's own multi-tensor Adam uses; the duck-typed surface
the trainer and `torch.amp.GradScaler` touch (`param_groups`, `zero_grad`, `step`) and nothing more.
`SiteSGD` is `torch.optim.SGD` (momentum, L2 `weight_decay`, no dampening or Nesterov) in the same way:
SCAFFOLD's control variates and its analysis assume SGD steps at the sites (Karimireddy et al. 2020).
DP-SGD keeps `torch.optim.Adam` / `torch.optim.SGD`: Opacus wraps a real optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

#: `local-optimizer` values (shared.config.CHOICES keeps a copy)
OPTIMIZERS = ("adam", "sgd")


class _SiteOptimizer:
    """One parameter group and per-parameter state, as `torch.optim`'s; subclasses say how a step moves."""

    def __init__(self, params: Iterable[torch.nn.Parameter], **group: Any) -> None:
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        self.param_groups = [{"params": params, **group}]
        self.state: dict[torch.Tensor, dict] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.param_groups[0]["params"]:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.detach_().zero_()

    def _decayed_gradients(self) -> tuple[dict, list[torch.Tensor], list[torch.Tensor]]:
        """(group, parameters that have a gradient, their gradients plus L2 weight decay)."""
        group = self.param_groups[0]
        params = [p for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        if params and group["weight_decay"]:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        return group, params, grads


class SiteAdam(_SiteOptimizer):
    """`torch.optim.Adam(params, lr, betas, eps, weight_decay)`: one parameter group, tested equal to it."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    @torch.no_grad()
    def step(self) -> None:
        group, params, grads = self._decayed_gradients()
        if not params:
            return
        beta1, beta2 = group["betas"]
        states = [self.state.setdefault(p, {"step": 0, "exp_avg": torch.zeros_like(p),
                                            "exp_avg_sq": torch.zeros_like(p)}) for p in params]  # fmt: skip
        for s in states:
            s["step"] += 1  # per parameter: one that had no gradient yet starts its bias correction later
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, [(1 - beta2 ** s["step"]) ** 0.5 for s in states])
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_addcdiv_(params, exp_avgs, denom, [-group["lr"] / (1 - beta1 ** s["step"]) for s in states])


class SiteSGD(_SiteOptimizer):
    """`torch.optim.SGD(params, lr, momentum, weight_decay)`: one parameter group, tested equal to it."""

    def __init__(
        self, params: Iterable[torch.nn.Parameter], lr: float = 1e-2, momentum: float = 0.0, weight_decay: float = 0.0
    ) -> None:  # fmt: skip
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay)

    @torch.no_grad()
    def step(self) -> None:
        group, params, grads = self._decayed_gradients()
        if not params:
            return
        if group["momentum"]:
            buffers = []
            for p, g in zip(params, grads, strict=True):
                buf = self.state.setdefault(p, {}).get("momentum_buffer")
                if buf is None:  # first step: the buffer is the gradient itself, as torch's
                    buf = self.state[p]["momentum_buffer"] = torch.clone(g).detach()
                else:
                    buf.mul_(group["momentum"]).add_(g)
                buffers.append(buf)
            grads = buffers
        torch._foreach_add_(params, grads, alpha=-group["lr"])


def site_optimizer(name: str, params: Iterable[torch.nn.Parameter], *, lr: float, weight_decay: float = 0.0,
                   momentum: float = 0.0) -> SiteAdam | SiteSGD:  # fmt: skip
    """The local optimiser `local-optimizer` names (momentum is SGD's; Adam has its betas)."""
    if name == "adam":
        return SiteAdam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return SiteSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"local-optimizer must be one of {OPTIMIZERS}, got {name!r}")


__all__ = ["OPTIMIZERS", "SiteAdam", "SiteSGD", "site_optimizer"]
