"""Simulated attacks: named simulated sites misbehave, so the server's defences can be measured.

``--set attack=scale|signflip|noise|inflate --set attack-sites=ID[,ID...] --set attack-scale=S``
makes the sites whose IDs (partition IDs, the site names of a simulation) are listed transform
what they trained just before replying:

- ``scale``: the update (trained model minus the model received) times S (default 1e6);
- ``signflip``: the update times -S (default 1: the plain sign flip);
- ``noise``: the update replaced by Gaussian noise of S times its RMS per element (default 100);
- ``inflate``: the sign-flipped update, reported with ``num-examples`` = S (default 1e12), so that
  under weighted averaging it wins the weighting.

One attack corrupts what the site trains on instead (`attacked_site`, called where ``handle_train``
opens the site; S is ignored), and the site then replies honestly with what it learnt:

- ``labelflip``: every training case's region masks (ET, TC, WT) are replaced by their complement
  inside the brain (the voxels where any modality is non-zero, before augmentation: healthy brain
  becomes "tumor" and the tumor background), and a case's class index k becomes (k + 1) mod K
  (K = ``model-classes``); a multi-task case gets both. The site's validation cases stay untouched.

Only simulated sites (a node config with ``partition-id`` and no ``site-name``) ever attack: a
real hospital's SuperNode ignores the setting, whatever a submitted run asks for.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch.utils.data import Dataset, get_worker_info

from fedbrats.strategies.arithmetic import record_views, to_record

if TYPE_CHECKING:  # the data stack (MONAI) is imported by the labelflip attack only, when it runs
    from fedbrats.shared.data.class_dataset import ClassificationDataset
    from fedbrats.shared.data.dataset import PatientDataset

log = logging.getLogger("fedbrats.client")

#: The attacks, as the run configuration names them ("none" is no attack).
ATTACKS: tuple[str, ...] = ("none", "scale", "signflip", "noise", "inflate", "labelflip")
#: The attacks on the site's training data rather than on its reply.
DATA_ATTACKS: tuple[str, ...] = ("labelflip",)

#: Strength when ``attack-scale`` is 0.
DEFAULT_SCALES: dict[str, float] = {"scale": 1e6, "signflip": 1.0, "noise": 100.0, "inflate": 1e12}


def attack_sites(spec: str) -> list[str]:
    """The site IDs of ``attack-sites`` ("1, 3" -> ["1", "3"])."""
    return [s.strip() for s in str(spec).split(",") if s.strip()]


def strength(kind: str, scale: float = 0.0) -> float:
    if kind not in DEFAULT_SCALES:
        raise ValueError(f"an update attack must be one of {', '.join(DEFAULT_SCALES)}, got {kind!r}")
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
    if config.attack in DATA_ATTACKS or not attacks_here(config, node_config, site_name):
        return reply, metrics
    rng = np.random.default_rng([config.seed, server_round, zlib.crc32(site_name.encode())])
    arrays = poison_update(config.attack, record_views(received), record_views(reply), config.attack_scale, rng)
    log.warning("round %d: site %s attacks (%s, strength %g)", server_round, site_name, config.attack,
                strength(config.attack, config.attack_scale))  # fmt: skip
    return to_record(arrays), poison_metrics(config.attack, metrics, config.attack_scale)


# --- labelflip: the site trains on corrupted labels ------------------------------------------------
def complement_regions(image: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """Each region channel [3, ...] replaced by its complement inside the brain of `image` [4, ...]
    (the voxels where any modality is non-zero; preprocessing keeps the background exactly 0)."""
    brain = np.any(np.asarray(image) != 0, axis=0)
    return (brain[None] & ~np.asarray(regions, dtype=bool)).astype(np.asarray(regions).dtype)


def rotate_class(index: int, n_classes: int) -> int:
    """Class k -> (k + 1) mod K: every case gets a wrong class, and the class counts stay the same."""
    if n_classes < 2:
        raise ValueError(f"a label flip needs at least 2 classes (model-classes), got {n_classes}")
    return (int(index) + 1) % n_classes


class FlippedRegions(Dataset):
    """A `PatientDataset` whose patches are cut from its volumes with complemented regions.

    The complement is taken on the whole preprocessed volume, before the crop and the intensity
    augmentation (which shifts the background off 0); the patches then go through the same
    augmentation recipe as the honest dataset's, on a stream of their own.
    """

    def __init__(self, patients: PatientDataset):
        from fedbrats.shared.data.transforms import train_augmentation

        self.patients = patients
        self.seed = patients.seed
        self._transform = train_augmentation(patients.patch_size, patients.foreground_prob,
                                             augment=patients.augment, seed=patients.seed)  # fmt: skip
        self._worker_seed: int | None = None

    @property
    def cases(self) -> list:
        return self.patients.cases

    @property
    def skipped(self) -> list:
        return self.patients.skipped

    def __len__(self) -> int:
        return len(self.patients)

    def reseed(self, seed: int) -> None:
        self._transform.set_random_state(seed=seed % 2**32)

    def volume(self, i: int) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
        image, regions, spacing = self.patients.volume(i)
        return image, complement_regions(image, regions), spacing

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        info = get_worker_info()
        if info is not None and self._worker_seed != info.seed:  # as PatientDataset: a stream per worker
            self._worker_seed = info.seed
            self.reseed(self.seed * 1_000_003 + info.seed)
        from fedbrats.shared.data.transforms import IMAGE, LABEL

        image, regions, _ = self.volume(i)
        out = self._transform({IMAGE: image, LABEL: regions})
        return _tensor(out[IMAGE]), _tensor(out[LABEL])

    def case_ids(self) -> list[str]:
        return self.patients.case_ids()


def _tensor(x: Any) -> torch.Tensor:
    t = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(np.asarray(x))
    return t.to(torch.float32).contiguous()


class FlippedClasses(Dataset):
    """A `ClassificationDataset` whose class indices are rotated (k -> (k + 1) mod K)."""

    def __init__(self, dataset: ClassificationDataset, n_classes: int):
        self.dataset = dataset
        self.labels = [rotate_class(k, n_classes) for k in dataset.labels]

    @property
    def cases(self) -> list:
        return self.dataset.cases

    @property
    def skipped(self) -> list:
        return self.dataset.skipped

    def __len__(self) -> int:
        return len(self.dataset)

    def reseed(self, seed: int) -> None:
        self.dataset.reseed(seed)

    def image(self, i: int) -> np.ndarray:
        return self.dataset.image(i)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, _ = self.dataset[i]
        return image, torch.tensor(self.labels[i], dtype=torch.int64)

    def case_ids(self) -> list[str]:
        return self.dataset.case_ids()


def flip_labels(dataset: Dataset, n_classes: int) -> Dataset:
    """`dataset` (a task's training dataset, `shared.tasks`) with every case's labels corrupted."""
    from fedbrats.shared.data.class_dataset import ClassificationDataset, MultitaskDataset
    from fedbrats.shared.data.dataset import PatientDataset

    if isinstance(dataset, PatientDataset):
        return FlippedRegions(dataset)
    if isinstance(dataset, MultitaskDataset):
        rotated = {c.case_id: rotate_class(k, n_classes) for c, k in zip(dataset.cases, dataset.labels, strict=True)}
        return MultitaskDataset(FlippedRegions(dataset.patients), rotated)  # type: ignore[arg-type]
    if isinstance(dataset, ClassificationDataset):
        return FlippedClasses(dataset, n_classes)
    raise TypeError(f"labelflip cannot corrupt a {type(dataset).__name__}; expected a task's training dataset "
                    "(PatientDataset, ClassificationDataset or MultitaskDataset)")  # fmt: skip


def attacked_site(config: Any, node_config: Mapping[str, Any], site: Any) -> Any:
    """`site` as it trains in this run: with its training labels corrupted when the run makes it a
    ``labelflip`` attacker (a copy: the cached site and its validation cases stay honest), else itself."""
    if config.attack not in DATA_ATTACKS or not attacks_here(config, node_config, site.name):
        return site
    log.warning("site %s attacks (%s): it trains on corrupted labels", site.name, config.attack)
    return dataclasses.replace(site, train=flip_labels(site.train, config.model_classes))
