"""Local trainer: lr schedule, learning, determinism, FedProx pull, loss without update, evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedbrats.client.settings import train_config
from fedbrats.client.trainer import (
    TrainConfig,
    evaluate_local,
    flat_metrics,
    get_device,
    loss_on,
    lr_at,
    train_local,
)
from fedbrats.shared.config import RunConfig
from fedbrats.shared.constants import REGIONS
from fedbrats.shared.models import create_model

PATCH = (16, 16, 16)


class BlobDataset(torch.utils.data.Dataset):
    """Synthetic cases: a bright blob (its ET core brighter) in noise; random flips use torch's RNG.

    Stands in for PatientDataset: items are (image [4, *patch], regions [3, *patch]) and
    `.volume(i)` gives a whole (slightly larger, non-multiple) volume for sliding-window validation.
    """

    def __init__(self, n: int = 4, shape=(20, 18, 22), seed: int = 0):
        rng = np.random.default_rng(seed)
        self.cases = [f"case_{i}" for i in range(n)]
        self.volumes = []
        grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
        for _ in range(n):
            centre = np.array([rng.uniform(6, s - 6) for s in shape])[:, None, None, None]
            dist = np.sqrt(((grid - centre) ** 2).sum(0))
            wt, tc, et = dist < 5, dist < 3, dist < 2
            image = rng.normal(0, 0.3, (4, *shape)).astype(np.float32)
            image[:, wt] += 1.0
            image[1, et] += 1.5
            image[2, tc] -= 0.5
            self.volumes.append((image, np.stack([et, tc, wt]).astype(np.uint8)))

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, i):
        image, regions = self.volumes[i]
        x = torch.from_numpy(image[:, : PATCH[0], : PATCH[1], : PATCH[2]].copy())
        y = torch.from_numpy(regions[:, : PATCH[0], : PATCH[1], : PATCH[2]].astype(np.float32))
        if torch.rand(()) < 0.5:  # augmentation drawn from torch's RNG: seeding must cover it
            x, y = x.flip(1), y.flip(1)
        return x, y

    def volume(self, i):
        image, regions = self.volumes[i]
        return image, regions, (1.0, 1.0, 1.0)


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return create_model("resunet", width=8, depth=2)


def _lrs(config: TrainConfig, start: int, n: int) -> list[float]:
    return [lr_at(s, config) for s in range(start, start + n)]


def test_lr_schedule_warms_up_then_decays_to_zero():
    for schedule in ("cosine", "poly"):
        config = TrainConfig(steps=1, lr=1e-3, warmup_steps=10, schedule=schedule, total_steps=100)
        warm = _lrs(config, 0, 10)
        assert all(b > a for a, b in zip(warm, warm[1:], strict=False))
        assert warm[-1] == pytest.approx(1e-3)
        decay = _lrs(config, 10, 90)
        assert all(b < a for a, b in zip(decay, decay[1:], strict=False))
        assert lr_at(99, config) < 0.02e-3 and lr_at(100, config) == 0.0 and lr_at(500, config) == 0.0
    cosine = TrainConfig(steps=1, warmup_steps=0, total_steps=100)
    assert lr_at(50, cosine) == pytest.approx(0.5e-3)
    poly = TrainConfig(steps=1, warmup_steps=0, total_steps=100, schedule="poly")
    assert lr_at(50, poly) == pytest.approx(1e-3 * 0.5**0.9)
    assert lr_at(1000, TrainConfig(steps=1, total_steps=None)) == 1e-3  # no schedule length: constant


def test_two_calls_of_n_steps_follow_the_schedule_of_one_call_of_2n():
    config = TrainConfig(steps=3, lr=1e-2, warmup_steps=2, total_steps=6, batch_size=2)
    seen: list[float] = []

    def record(done, total, loss, lr):
        seen.append(lr)

    first = train_local(_model(), BlobDataset(), config, start_step=0, progress=record)
    second = train_local(_model(), BlobDataset(), config, start_step=first.end_step, progress=record)
    assert (first.end_step, second.end_step) == (3, 6)
    one = []
    train_local(_model(), BlobDataset(), TrainConfig(**{**config.__dict__, "steps": 6}), progress=lambda *a: one.append(a[3]))
    assert seen == one == _lrs(config, 0, 6)
    assert seen[-1] < seen[1]


def test_epochs_count_batches_and_examples():
    result = train_local(_model(), BlobDataset(n=5), TrainConfig(epochs=2, batch_size=2, lr=1e-3))
    assert result.steps == 6 and result.examples == 10 and result.end_step == 6
    assert math.isfinite(result.mean_loss) and result.seconds > 0


def test_training_overfits_a_tiny_dataset():
    dataset = BlobDataset(n=2)
    losses: list[float] = []
    model = _model()
    before = loss_on(model, dataset, 2, seed=1)
    train_local(model, dataset, TrainConfig(steps=40, lr=1e-2, batch_size=2),
                progress=lambda d, t, loss, lr: losses.append(loss))
    after = loss_on(model, dataset, 2, seed=1)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert after < 0.7 * before


def test_same_seed_gives_identical_weights_on_cpu():
    config = TrainConfig(steps=4, lr=1e-2, batch_size=2, seed=7)
    a, b, c = _model(), _model(), _model()
    train_local(a, BlobDataset(), config)
    train_local(b, BlobDataset(), config)
    train_local(c, BlobDataset(), TrainConfig(**{**config.__dict__, "seed": 8}))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def _distance(model, reference) -> float:
    return math.sqrt(sum(float(((p.detach() - q) ** 2).sum()) for p, q in zip(model.parameters(), reference, strict=True)))


def test_proximal_term_pulls_towards_the_global_weights():
    start = [p.detach().clone() for p in _model().parameters()]
    free, prox = _model(), _model()
    train_local(free, BlobDataset(), TrainConfig(steps=8, lr=1e-2, proximal_mu=0.0))
    train_local(prox, BlobDataset(), TrainConfig(steps=8, lr=1e-2, proximal_mu=50.0))
    assert _distance(prox, start) < 0.5 * _distance(free, start)


def test_loss_on_does_not_update_and_is_repeatable():
    model, dataset = _model(), BlobDataset()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    first = loss_on(model, dataset, 3, seed=2)
    assert loss_on(model, dataset, 3, seed=2) == first
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert math.isfinite(first) and first > 0


def test_evaluate_local_scores_every_case_per_region():
    dataset = BlobDataset(n=2)
    result = evaluate_local(_model(), dataset, patch_size=PATCH)
    assert [row["case_id"] for row in result["cases"]] == ["case_0", "case_1"]
    for region in REGIONS:
        dices = [row[region]["dice"] for row in result["cases"]]
        assert result["mean"][region]["dice"] == pytest.approx(np.mean(dices))
        assert all(0.0 <= d <= 1.0 for d in dices)
    assert result["mean_dice"] == pytest.approx(np.mean([result["mean"][r]["dice"] for r in REGIONS]))
    flat = flat_metrics(result)
    assert {"dice_ET", "hd95_WT", "sensitivity_TC", "specificity_ET", "mean_dice"} <= set(flat)


def test_bad_configs_and_devices_are_explained():
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0, steps=None)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="step")
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got nan"):
        TrainConfig(lr=float("nan"))  # an lr from the server's round config is checked too
    with pytest.raises(ValueError, match="proximal_mu must be a finite number >= 0, got inf"):
        TrainConfig(proximal_mu=float("inf"))
    assert get_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert get_device("auto").type == "cpu"
        with pytest.raises(ValueError, match="no CUDA"):
            get_device("cuda")
    with pytest.raises(ValueError, match="empty"):
        train_local(_model(), BlobDataset(n=0), TrainConfig(steps=1))


def test_deep_supervision_outputs_and_the_wrap_hook():
    torch.manual_seed(0)
    model = create_model("resunet", width=8, depth=3, deep_supervision=True)
    calls = []

    def wrap(m, optimizer, loader):  # what a DP engine does: may replace all three
        calls.append(type(optimizer).__name__)
        return m, optimizer, loader

    result = train_local(model, BlobDataset(), TrainConfig(steps=2), wrap=wrap)
    assert calls == ["SiteAdam"] and result.steps == 2 and math.isfinite(result.mean_loss)
    assert math.isfinite(loss_on(model, BlobDataset(), 1))


def test_run_config_schedule_spans_every_round():
    by_epochs = train_config(RunConfig(rounds=10, local_epochs=2, batch_size=2, lr_schedule="poly"), 5)
    assert by_epochs.total_steps == 10 * 2 * 3 and by_epochs.steps is None and by_epochs.schedule == "poly"
    by_steps = train_config(RunConfig(rounds=4, local_steps=7, proximal_mu=0.1), 5)
    assert (by_steps.steps, by_steps.total_steps, by_steps.proximal_mu) == (7, 28, 0.1)
    assert lr_at(by_steps.total_steps, by_steps) == 0.0


class LabelledBlobs(BlobDataset):
    """Multitask items: (image, (regions, class index)), the class being whether the blob is on the left."""

    def __getitem__(self, i):
        image, regions = super().__getitem__(i)
        return image, (regions, torch.tensor(i % 2))


def test_a_task_loss_trains_both_heads_on_nested_targets():
    from fedbrats.shared.tasks import MultitaskTask

    torch.manual_seed(0)
    model = create_model("resunet", width=8, depth=2, n_classes=2)
    head_before = model.class_head.linear.weight.detach().clone()
    task = MultitaskTask(weight=1.0)
    data = LabelledBlobs(4)
    config = TrainConfig(steps=3, batch_size=2, lr=1e-2)
    result = train_local(model, data, config, loss_fn=task.loss)
    assert result.steps == 3 and math.isfinite(result.mean_loss)
    assert not torch.equal(model.class_head.linear.weight, head_before)
    before = loss_on(model, data, 2, seed=1, loss_fn=task.loss)
    assert loss_on(model, data, 2, seed=1, loss_fn=task.loss) == before  # no update, same batches
