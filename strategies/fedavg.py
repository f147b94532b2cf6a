"""FedAvg and FedProx, registered on our aggregation (``ReweightedFedAvg``).

Equal to Flower's ``FedAvg``/``FedProx`` to float32 rounding (tests/test_strategies.py: one fused BLAS
axpy per update and block, where Flower multiplies and adds), one pass over the updates without Flower's
copy of every update (benchmarks/RESULTS.md); with the round loop's hooks, a
reply without ``num-examples`` is left out with that reason instead of failing the round. Registered
here, not in ``registry.py``: the registry stays free of strategy modules (``base`` imports nothing
of the registry, so neither direction makes a cycle).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedProx

from fedbrats.strategies.base import ReweightedFedAvg
from fedbrats.strategies.registry import register_strategy


class ReweightedFedProx(ReweightedFedAvg, FedProx):
    """Flower's FedProx (Li et al., 2020): FedAvg on the server, ``proximal-mu`` in every site's config.

    Parameters
    ----------
    proximal_mu : float (default: 0.0)
        Weight of the proximal term ``(mu / 2) ||w - w_global||^2`` the sites add to their loss.
    """


register_strategy("fedavg")(ReweightedFedAvg)
register_strategy("fedprox")(ReweightedFedProx)
