"""The site-side halves of aggregation algorithms: FedBN's local norms and SCAFFOLD's control variate.

Both keep state at the site between rounds, on the site's disk, because in a deployment every
message starts a fresh ClientApp process. The folder is the run's own (`Site.run_dir`), so a new
run starts without them, and each file is versioned by the round that wrote it: round r reads the
newest version written before r, so a round repeated after a server restart sees exactly what it
saw the first time.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from safetensors.numpy import load_file
from safetensors.numpy import save as safetensors_bytes

from fedbrats.shared.atomic import atomic_write
from fedbrats.strategies.fedbn import keep_local_norms, norm_param_names
from fedbrats.strategies.scaffold import CONTROL, CONTROL_DELTA, client_control_update, gradient_correction

#: Versions of a state file kept: the newest and the one before it (what a repeated round needs).
VERSIONS_KEPT = 2


class RoundFiles:
    """One kind of array state in a run folder, one file per round that wrote it: ``<stem>.r0003.safetensors``."""

    def __init__(self, folder: Path, stem: str) -> None:
        self.folder = Path(folder)
        self.stem = stem
        self._pattern = re.compile(rf"{re.escape(stem)}\.r(\d+)\.safetensors")

    def rounds(self) -> list[int]:
        """The rounds that wrote a version, oldest first."""
        if not self.folder.is_dir():
            return []
        found = (self._pattern.fullmatch(p.name) for p in self.folder.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def path(self, server_round: int) -> Path:
        return self.folder / f"{self.stem}.r{server_round:04d}.safetensors"

    def latest(self, *, upto_round: int) -> dict[str, np.ndarray] | None:
        """The newest version written in a round <= `upto_round`, or None."""
        earlier = [r for r in self.rounds() if r <= upto_round]
        return load_file(str(self.path(earlier[-1]))) if earlier else None

    def save(self, arrays: dict[str, np.ndarray], server_round: int) -> None:
        """Write the version of `server_round` atomically, then drop all but the `VERSIONS_KEPT` newest."""
        data = safetensors_bytes({k: np.ascontiguousarray(v) for k, v in arrays.items()})
        atomic_write(self.path(server_round), data)
        for old in self.rounds()[:-VERSIONS_KEPT]:
            self.path(old).unlink(missing_ok=True)


class LocalNorms:
    """FedBN: this site's normalisation parameters never leave it and survive restarts (within a run)."""

    def __init__(self, run_dir: Path) -> None:
        self.files = RoundFiles(run_dir, "fedbn_norms")

    def apply(self, model: torch.nn.Module, *, upto_round: int) -> None:
        """Put the site's own norms (kept in a round <= `upto_round`, if any) into a model holding global weights.

        Training in round r passes r - 1; evaluating after round r passes r.
        """
        kept = self.files.latest(upto_round=upto_round)
        if kept:
            state = keep_local_norms(model.state_dict(), {k: torch.from_numpy(v) for k, v in kept.items()})
            model.load_state_dict(state)

    def keep(self, model: torch.nn.Module, server_round: int) -> None:
        state = model.state_dict()
        self.files.save({n: state[n].detach().cpu().numpy() for n in norm_param_names(model)}, server_round)

    @staticmethod
    def hide(model: torch.nn.Module, reply: ArrayRecord, incoming: ArrayRecord) -> ArrayRecord:
        """The reply with the incoming global norms in place of the site's own."""
        names = set(norm_param_names(model))
        return ArrayRecord({k: (incoming[k] if k in names else v) for k, v in reply.items()})


class ControlVariate:
    """SCAFFOLD at a site: correct every gradient by c - c_i, then update c_i (option II)."""

    def __init__(self, run_dir: Path, incoming: ArrayRecord, server_round: int, average: float = 0.0) -> None:
        self.files = RoundFiles(run_dir, "scaffold_control")
        self.server_round = server_round
        self.average = average  # `control-average`: the share of the previous c_i kept (client_control_update)
        self.c_global = {k: v.numpy() for k, v in incoming.items()}
        self.c_local = self.files.latest(upto_round=server_round - 1)
        self._handles: list = []
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}

    def correction(self) -> dict[str, np.ndarray]:
        """c - c_i per parameter name (DP-SGD adds it after the noise, not through hooks)."""
        return gradient_correction(self.c_global, self.c_local)

    def observe(self, name: str, grad: torch.Tensor) -> None:
        """One step's gradient of `name` as the optimiser would get it, before the correction: the new c_i is
        their mean (`client_control_update`'s `mean_gradients`; DP-SGD passes its noisy gradients)."""
        g = grad.detach().to("cpu", torch.float64)
        self._sums[name] = self._sums[name] + g if name in self._sums else g.clone()
        self._counts[name] = self._counts.get(name, 0) + 1

    def attach(self, model: torch.nn.Module) -> None:
        correction = self.correction()
        for name, param in model.named_parameters():
            if name in correction and param.requires_grad:  # a frozen parameter (`trainable`) has no gradient
                delta = torch.from_numpy(np.asarray(correction[name], dtype=np.float32))

                def corrected(g: torch.Tensor, name: str = name, d: torch.Tensor = delta) -> torch.Tensor:
                    self.observe(name, g)
                    return g + d.to(g.device)

                self._handles.append(param.register_hook(corrected))

    def finish(self, model: torch.nn.Module, x_global: ArrayRecord, steps: int, mean_lr: float) -> ArrayRecord:
        """Detach the hooks, store the new c_i for this round, return the ``control-delta`` record for the server."""
        for handle in self._handles:
            handle.remove()
        y_local = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        x = {k: v.numpy() for k, v in x_global.items()}
        seen = {k: (total / self._counts[k]).numpy() for k, total in self._sums.items()}
        c_new, delta = client_control_update(self.c_local, self.c_global, x, y_local, steps=steps, lr=mean_lr,
                                             mean_gradients=seen, average=self.average)  # fmt: skip
        self.files.save(c_new, self.server_round)
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in delta.items()})


__all__ = ["CONTROL", "CONTROL_DELTA", "ControlVariate", "LocalNorms", "RoundFiles"]
