"""`init-checkpoint`: the initial model from a checked fedbrats checkpoint, recorded once, never re-applied on resume."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from fedbrats.client.training_run import run_train
from fedbrats.server.app import initial_model, make_strategy, run_server
from fedbrats.server.federation import Federation
from fedbrats.server.history import INITIAL_MODEL, read_events, read_history
from fedbrats.server.state import load_state, weights_digest
from fedbrats.shared.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fedbrats.shared.config import RunConfig
from fedbrats.shared.models import create_model
from fedbrats.shared.records import model_to_record, record_digest
from fedbrats.shared.warm_start import load_warm_start
from fedbrats.simulations.report import write_report

from .local_grid import LocalGrid, tiny_phantom

TINY = dict(  # resunet: the parameter names and counts below are its own
    model="resunet", model_width=8, model_depth=2, patch_size=16, batch_size=2, local_steps=2, local_epochs=1, cache="memory"
)


def _checkpoint(path, *, seed: int = 7, width: int = 8, task: str = "segmentation", **extra):
    torch.manual_seed(seed)
    model = create_model("resunet", width=width, depth=2)
    return save_checkpoint(path, model, extra={"task": task, **extra}), model


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_initial_model_is_the_checkpoint_and_empty_keeps_the_seeded_init(tmp_path):
    path, trained = _checkpoint(tmp_path / "warm.safetensors")
    seeded = initial_model(RunConfig(**TINY))
    torch.manual_seed(0)
    assert _same(seeded, create_model("resunet", **RunConfig(**TINY).model_config))  # "" changes nothing
    warm = initial_model(RunConfig(**TINY, init_checkpoint=str(path)))
    assert _same(warm, trained) and not _same(warm, seeded)
    source = load_warm_start(create_model("resunet", **RunConfig(**TINY).model_config),
                             RunConfig(**TINY, init_checkpoint=str(path)))  # fmt: skip
    assert source.digest == record_digest(model_to_record(trained)) and source.path == str(path.resolve())
    assert f"warm start from {path.resolve()} (digest {source.digest[:12]})" == source.describe()


def test_a_checkpoint_older_than_a_model_argument_warm_starts_with_its_default(tmp_path):
    """A checkpoint written before `n_classes` and `class_head` existed was built with their defaults."""
    torch.manual_seed(7)
    model = create_model("resunet", width=8, depth=2)
    for newer in ("n_classes", "class_head"):
        del model.config[newer]
    path = save_checkpoint(tmp_path / "old.safetensors", model, extra={"task": "segmentation"})
    assert "class_head" not in json.dumps(load_checkpoint(path)[1]["model_config"])
    for head in ("profile", "bottleneck"):  # a segmentation run builds no class head, whichever kind is set
        warm = initial_model(RunConfig(**TINY, init_checkpoint=str(path), model_class_head=head))
        assert _same(warm, model)
    with pytest.raises(CheckpointError, match=r"width \(model-width\): expected 16, found 8"):
        initial_model(RunConfig(**{**TINY, "model_width": 16}, init_checkpoint=str(path)))


def test_a_segmentation_checkpoint_starts_a_multitask_u_net_whose_head_starts_as_built(tmp_path):
    """A consortium with a segmentation model adds a case label: every U-Net weight from the file, the head new."""
    path, segmenter = _checkpoint(tmp_path / "seg.safetensors")
    for head in ("profile", "bottleneck"):
        config = RunConfig(**TINY, task="multitask", model_class_head=head, init_checkpoint=str(path))
        torch.manual_seed(config.seed)  # as initial_model seeds
        built = create_model("resunet", **config.model_config)
        warm = initial_model(config)
        u_net = {k: v for k, v in warm.state_dict().items() if not k.startswith("class_head.")}
        assert u_net.keys() == segmenter.state_dict().keys()
        assert all(torch.equal(v, segmenter.state_dict()[k]) for k, v in u_net.items())
        heads = [k for k in warm.state_dict() if k.startswith("class_head.")]
        assert heads and all(torch.equal(warm.state_dict()[k], built.state_dict()[k]) for k in heads)
    wide = RunConfig(**{**TINY, "model_width": 16}, task="multitask", init_checkpoint=str(path))
    with pytest.raises(CheckpointError, match=r"width \(model-width\): expected 16, found 8"):
        initial_model(wide)
    torch.manual_seed(0)
    multitask = create_model("resunet", width=8, depth=2, n_classes=2, class_head="profile")
    save_checkpoint(tmp_path / "mislabelled.safetensors", multitask, extra={"task": "segmentation"})
    with pytest.raises(CheckpointError, match=r"mislabelled\.safetensors: its weights do not fit.*unexpected "
                                              r"\[.*'class_head\.linear\.weight'"):  # fmt: skip
        initial_model(RunConfig(**TINY, task="multitask", init_checkpoint=str(tmp_path / "mislabelled.safetensors")))
    save_checkpoint(tmp_path / "mt.safetensors", multitask, extra={"task": "multitask"})
    with pytest.raises(CheckpointError, match=r"mt\.safetensors holds a multitask model.*task is segmentation"):
        initial_model(RunConfig(**TINY, init_checkpoint=str(tmp_path / "mt.safetensors")))


def test_untrusted_checkpoints_are_refused_naming_the_file_and_the_reason(tmp_path):
    config = RunConfig(**{**TINY, "model_width": 16, "model_se": True}, init_checkpoint=str(tmp_path / "missing.st"))
    with pytest.raises(CheckpointError, match=r"missing\.st does not exist"):
        initial_model(config)
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.safetensors is not a safetensors checkpoint"):
        initial_model(config.replace(init_checkpoint=str(tmp_path / "junk.safetensors")))
    path, _ = _checkpoint(tmp_path / "narrow.safetensors")  # width 8, no SE
    with pytest.raises(CheckpointError) as err:
        initial_model(config.replace(init_checkpoint=str(path)))
    assert str(path) in str(err.value)
    assert "width (model-width): expected 16, found 8" in str(err.value)
    assert "se (model-se): expected True, found False" in str(err.value)
    with pytest.raises(CheckpointError, match=r"model: expected 'selfensemble', found 'resunet'"):
        initial_model(RunConfig(**{**TINY, "model": "selfensemble"}, init_checkpoint=str(path)))
    torch.manual_seed(0)
    classifier = create_model("resclassifier", width=8, depth=2, n_classes=2)
    save_checkpoint(tmp_path / "grade.safetensors", classifier, extra={"task": "classification"})
    with pytest.raises(
        CheckpointError, match=r"grade\.safetensors holds a classification model.*task is segmentation"
    ):
        initial_model(RunConfig(**TINY, init_checkpoint=str(tmp_path / "grade.safetensors")))
    damaged, _ = _checkpoint(tmp_path / "damaged.safetensors", digest="0" * 64)
    with pytest.raises(CheckpointError, match="do not match the digest"):
        initial_model(RunConfig(**TINY, init_checkpoint=str(damaged)))


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return tiny_phantom(tmp_path_factory.mktemp("phantom"), cases_per_site=3)


def _config(phantom, out, **changes):
    values = dict(rounds=1, min_sites=1, data_dir=str(phantom), partition=str(phantom / "partitioning_1.csv"),
                  out_dir=str(out))  # fmt: skip
    return RunConfig(**{**values, **TINY, **changes})


@pytest.mark.slow
def test_a_federation_records_its_warm_start_once_and_resume_keeps_its_own_rounds(phantom, tmp_path):
    path, trained = _checkpoint(tmp_path / "warm.safetensors")
    out = tmp_path / "run"
    config = _config(phantom, out, init_checkpoint=str(path), trainable="decoder.*,head.*")
    run_server(LocalGrid(config.to_flower(), sites=2), config)
    round0 = load_state(out / "server")  # round 1 completed
    assert round0.round == 1
    events = [e for e in read_events(out / "history.jsonl") if e["event"] == INITIAL_MODEL]
    digest = record_digest(model_to_record(trained))
    assert events == [
        {"event": INITIAL_MODEL, "source": "warm start", "path": str(path.resolve()), "digest": digest}
    ]
    report = (write_report(out)).read_text()
    assert (
        f"Initial model: warm start from `{path.resolve()}` (digest {digest[:12]}); sites train only"
        in report
    )
    # Resuming: the federation continues from round 1's weights, not from the checkpoint again.
    resumed = config.replace(rounds=2)
    federation = Federation(LocalGrid(resumed.to_flower(), sites=2), resumed, make_strategy(resumed),
                            model_to_record(initial_model(resumed)), out_dir=out)  # fmt: skip
    assert (
        federation.start_round == 1
        and weights_digest(federation.arrays) == weights_digest(round0.arrays) != digest
    )
    run_server(LocalGrid(resumed.to_flower(), sites=2), resumed)
    assert len([e for e in read_events(out / "history.jsonl") if e["event"] == INITIAL_MODEL]) == 1
    plain = _config(phantom, tmp_path / "plain")
    run_server(LocalGrid(plain.to_flower(), sites=2), plain)
    assert read_events(tmp_path / "plain" / "history.jsonl") == []  # no warm start: nothing new recorded
    assert "Initial model" not in write_report(tmp_path / "plain").read_text()


@pytest.mark.slow
def test_fedbrats_train_starts_from_another_seeds_checkpoint(phantom, tmp_path):
    base = RunConfig(**{**TINY, "rounds": 1})
    first = run_train(
        base.replace(seed=5), phantom, out=tmp_path / "public", device="cpu", console=Console(quiet=True)
    )
    assert "initial_model" not in first and "trainable" not in first  # the defaults change nothing
    warm = base.replace(
        init_checkpoint=str(tmp_path / "public" / "checkpoint.safetensors"), trainable="head.*"
    )
    summary = run_train(warm, phantom, out=tmp_path / "tuned", device="cpu", console=Console(quiet=True))
    assert summary["initial_model"]["path"] == str((tmp_path / "public" / "checkpoint.safetensors").resolve())
    assert summary["trained_parameters"] == 8 * 3 + 3 and summary["trainable"] == "head.*"
    metrics = json.loads((tmp_path / "tuned" / "metrics.json").read_text())
    assert metrics["initial_model"]["digest"] == summary["initial_model"]["digest"]
    tuned, meta = load_checkpoint(tmp_path / "tuned" / "last.safetensors")
    start, _ = load_checkpoint(tmp_path / "public" / "checkpoint.safetensors")
    assert meta["initial_model"]["source"] == "warm start"
    frozen = [n for n in tuned.state_dict() if not n.startswith("head.")]
    assert all(torch.equal(tuned.state_dict()[n], start.state_dict()[n]) for n in frozen)
    assert not torch.equal(tuned.state_dict()["head.weight"], start.state_dict()["head.weight"])


@pytest.mark.slow
def test_dp_sgd_trains_only_the_grade_head_on_a_frozen_segmentation_checkpoint(phantom, tmp_path):
    """The grade under DP (docs/privacy.md): a public segmentation model, the profile head trained by DP-SGD."""
    from fedbrats.client.ledger import PrivacyLedger

    path, segmenter = _checkpoint(tmp_path / "seg.safetensors")
    out = tmp_path / "run"
    config = _config(phantom, out, task="multitask", model_class_head="profile", init_checkpoint=str(path),
                     trainable="class_head.*", lr=0.01, dp=True, dp_noise_multiplier=1.0, dp_epsilon=50.0)  # fmt: skip
    run_server(LocalGrid(config.to_flower(), sites=2), config)
    assert all(e["dropped"] is None and e["epsilon"] > 0 for e in read_history(out / "history.jsonl")[0]["train"])
    global_model, _ = load_checkpoint(out / "global_model.safetensors")
    weights = global_model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in segmenter.state_dict().items())  # the U-Net: bit for bit
    assert weights["class_head.linear.weight"].abs().sum() > 0  # the head left zero
    assert PrivacyLedger.at(out / "sites" / "1").rows()[0].steps == config.local_steps


def test_simulate_makes_file_keys_absolute_and_refuses_a_missing_checkpoint_before_flower(tmp_path, monkeypatch):
    """The simulated apps run in another folder: a relative init-checkpoint must mean the user's folder."""
    from fedbrats.simulations.simulate import with_absolute_files

    (tmp_path / "pub").mkdir()
    (tmp_path / "pub" / "checkpoint.safetensors").write_bytes(b"x")
    (tmp_path / "labels.csv").write_text("Subject_ID,Grade\n")
    monkeypatch.chdir(tmp_path)
    config = with_absolute_files(RunConfig(init_checkpoint="pub/checkpoint.safetensors", labels="labels.csv"))
    assert config.init_checkpoint == str(tmp_path.resolve() / "pub" / "checkpoint.safetensors")
    assert config.labels == str(tmp_path.resolve() / "labels.csv")
    assert with_absolute_files(RunConfig(labels="under_the_data_folder.csv")).labels == "under_the_data_folder.csv"
    with pytest.raises(FileNotFoundError, match="init-checkpoint pub/missing.safetensors: no such file"):
        with_absolute_files(RunConfig(init_checkpoint="pub/missing.safetensors"))


def test_dp_recipe_notes_name_the_measured_pitfalls():
    """DP-SGD with Adam, or from random weights on every parameter, is announced before the run; the
    measured recipe (SGD, a warm start, a subset) runs without a note, and so does a run without DP."""
    from fedbrats.shared.dp_recipe import recipe_notes

    cold_adam = recipe_notes(RunConfig(dp=True))
    assert len(cold_adam) == 2
    assert "Adam" in cold_adam[0] and "local-optimizer=sgd" in cold_adam[0]
    assert "random weights" in cold_adam[1]
    recipe = RunConfig(dp=True, local_optimizer="sgd", sgd_momentum=0.9, lr=0.05, init_checkpoint="public.safetensors",
                       trainable="*norm*,heads.*")  # fmt: skip
    assert recipe_notes(recipe) == []
    assert recipe_notes(recipe.replace(init_checkpoint="")) == []  # a subset without a warm start: not cold on all
    assert recipe_notes(RunConfig()) == []
