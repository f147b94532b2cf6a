"""The site-side halves of aggregation algorithms: FedBN's local norms and SCAFFOLD's control variate.

Both keep state at the site between rounds, on the site's disk (``work_dir``), because in a
deployment every message starts a fresh ClientApp process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from safetensors.numpy import load_file, save_file

from fedbrats.strategies.fedbn import keep_local_norms, norm_param_names
from fedbrats.strategies.scaffold import CONTROL, CONTROL_DELTA, client_control_update, gradient_correction


def _save(arrays: dict[str, np.ndarray], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
    tmp.replace(path)


def _load(path: Path) -> dict[str, np.ndarray] | None:
    return load_file(str(path)) if path.is_file() else None


class LocalNorms:
    """FedBN: this site's normalisation parameters never leave it and survive restarts."""

    def __init__(self, work_dir: Path) -> None:
        self.path = Path(work_dir) / "fedbn_norms.safetensors"

    def apply(self, model: torch.nn.Module) -> None:
        """Put the site's own norms (if any yet) into a model that holds the global weights."""
        kept = _load(self.path)
        if kept:
            state = keep_local_norms(model.state_dict(), {k: torch.from_numpy(v) for k, v in kept.items()})
            model.load_state_dict(state)

    def keep(self, model: torch.nn.Module) -> None:
        state = model.state_dict()
        _save({n: state[n].detach().cpu().numpy() for n in norm_param_names(model)}, self.path)

    @staticmethod
    def hide(model: torch.nn.Module, reply: ArrayRecord, incoming: ArrayRecord) -> ArrayRecord:
        """The reply with the incoming global norms in place of the site's own."""
        names = set(norm_param_names(model))
        return ArrayRecord({k: (incoming[k] if k in names else v) for k, v in reply.items()})


class ControlVariate:
    """SCAFFOLD at a site: correct every gradient by c - c_i, then update c_i (option II)."""

    def __init__(self, work_dir: Path, incoming: ArrayRecord) -> None:
        self.path = Path(work_dir) / "scaffold_control.safetensors"
        self.c_global = {k: v.numpy() for k, v in incoming.items()}
        self.c_local = _load(self.path)
        self._handles: list = []

    def correction(self) -> dict[str, np.ndarray]:
        """c - c_i per parameter name (DP-SGD adds it after the noise, not through hooks)."""
        return gradient_correction(self.c_global, self.c_local)

    def attach(self, model: torch.nn.Module) -> None:
        correction = self.correction()
        for name, param in model.named_parameters():
            if name in correction:
                delta = torch.from_numpy(np.asarray(correction[name], dtype=np.float32))
                self._handles.append(param.register_hook(lambda g, d=delta: g + d.to(g.device)))

    def finish(self, model: torch.nn.Module, x_global: ArrayRecord, steps: int, mean_lr: float) -> ArrayRecord:
        """Detach the hooks, store the new c_i, return the ``control-delta`` record for the server."""
        for handle in self._handles:
            handle.remove()
        y_local = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        x = {k: v.numpy() for k, v in x_global.items()}
        c_new, delta = client_control_update(self.c_local, self.c_global, x, y_local, steps=steps, lr=mean_lr)
        _save(c_new, self.path)
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in delta.items()})


__all__ = ["CONTROL", "CONTROL_DELTA", "ControlVariate", "LocalNorms"]
