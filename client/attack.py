"""Simulated attacks: named simulated sites misbehave, so the server's defences can be measured.

``--set attack=scale|signflip|noise|inflate --set attack-sites=ID[,ID...] --set attack-scale=S``
makes the sites whose IDs (partition IDs, the site names of a simulation) are listed transform
what they trained just before replying:

- ``scale``: the update (trained model minus the model received) times S (default 1e6);
- ``signflip``: the update times -S (default 1: the plain sign flip);
- ``noise``: the update replaced by Gaussian noise of S times its RMS per element (default 100);
- ``inflate``: the sign-flipped update, reported with ``num-examples`` = S (default 1e12), so that
  under weighted averaging it wins the weighting.

A label-flip attack (training on inverted tumor masks) is not offered: it needs a hook in the
site's data pipeline before training, and the reply-level hook here cannot reach the labels.

Only simulated sites (a node config with ``partition-id`` and no ``site-name``) ever attack: a
real hospital's SuperNode ignores the setting, whatever a submitted run asks for.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from fedbrats.strategies.arithmetic import record_views, to_record

log = logging.getLogger("fedbrats.client")

#: The attacks, as the run configuration names them ("none" is no attack).
ATTACKS: tuple[str, ...] = ("none", "scale", "signflip", "noise", "inflate")

#: Strength when ``attack-scale`` is 0.
DEFAULT_SCALES: dict[str, float] = {"scale": 1e6, "signflip": 1.0, "noise": 100.0, "inflate": 1e12}


def attack_sites(spec: str) -> list[str]:
    """The site IDs of ``attack-sites`` ("1, 3" -> ["1", "3"])."""
    return [s.strip() for s in str(spec).split(",") if s.strip()]


def strength(kind: str, scale: float = 0.0) -> float:
    if kind not in DEFAULT_SCALES:
        raise ValueError(f"attack must be one of {', '.join(ATTACKS[1:])}, got {kind!r}")
    return float(scale) if scale > 0 else DEFAULT_SCALES[kind]


def attacks_here(config: Any, node_config: Mapping[str, Any], site_name: str) -> bool:
    """Whether this site is a simulated site the run configuration names as an attacker."""
    if config.attack == "none" or site_name not in attack_sites(config.attack_sites):
        return False
    if "partition-id" not in node_config or node_config.get("site-name"):
        log.warning("attack %r names site %s, which is not a simulated site: ignored", config.attack, site_name)
        return False
    return True


def poison_update(
    kind: str, received: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray], scale: float = 0.0,
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """The arrays an attacking site sends instead of `trained` (floating-point arrays only change)."""
    s = strength(kind, scale)
    floats = [n for n, v in received.items() if v.dtype.kind == "f"]
    changes = {n: np.asarray(trained[n], np.float64) - received[n] for n in floats}
    if kind == "noise":
        count = sum(c.size for c in changes.values())
        rms = math.sqrt(sum(float(np.sum(c * c)) for c in changes.values()) / max(count, 1))
        rng = rng or np.random.default_rng(0)
        changes = {n: rng.normal(0.0, s * rms, c.shape) for n, c in changes.items()}
    else:
        factor = {"scale": s, "signflip": -s, "inflate": -1.0}[kind]
        changes = {n: c * factor for n, c in changes.items()}
    poisoned = dict(trained)
    for name, change in changes.items():
        poisoned[name] = (received[name] + change).astype(received[name].dtype)
    return poisoned


def poison_metrics(kind: str, metrics: Mapping[str, float], scale: float = 0.0) -> dict[str, float]:
    """The metrics an attacking site sends: ``inflate`` claims `scale` (default 1e12) training cases."""
    out = dict(metrics)
    if kind == "inflate":
        out["num-examples"] = strength(kind, scale)
    return out


def misbehave(
    config: Any, node_config: Mapping[str, Any], site_name: str, received: ArrayRecord, reply: ArrayRecord,
    metrics: dict[str, float], server_round: int,
) -> tuple[ArrayRecord, dict[str, float]]:
    """The site's reply arrays and metrics, transformed when the run makes this site an attacker."""
    if not attacks_here(config, node_config, site_name):
        return reply, metrics
    rng = np.random.default_rng([config.seed, server_round, zlib.crc32(site_name.encode())])
    arrays = poison_update(config.attack, record_views(received), record_views(reply), config.attack_scale, rng)
    log.warning("round %d: site %s attacks (%s, strength %g)", server_round, site_name, config.attack,
                strength(config.attack, config.attack_scale))  # fmt: skip
    return to_record(arrays), poison_metrics(config.attack, metrics, config.attack_scale)
