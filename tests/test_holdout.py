"""Leave one institution out: train without a site, then score the global model on all of its cases."""

from __future__ import annotations

import json

import pytest

from fedbrats.shared.checkpoint import save_checkpoint
from fedbrats.shared.config import RunConfig
from fedbrats.shared.data.partition import read_partition
from fedbrats.shared.models import create_model
from fedbrats.simulations import simulate as simulate_module
from fedbrats.simulations.holdout import split_holdout
from tests.data_fixtures import case_id_for, write_case
from tests.test_compare import record, write_run


def _partition(root, sites=(1, 1, 2, 2, 3, 3), train_or_val=False):
    header = "Partition_ID,Subject_ID" + (",TrainOrVal" if train_or_val else "")
    rows = [f"{site},{case_id_for(i + 1)}" + (",val" if train_or_val and i % 2 else ",train" if train_or_val else "")
            for i, site in enumerate(sites)]  # fmt: skip
    path = root / "partitioning_1.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_the_held_out_site_trains_nowhere_and_keeps_every_case(tmp_path):
    train_csv, external_csv = split_holdout(_partition(tmp_path, train_or_val=True), "2", tmp_path / "run")
    train, external = read_partition(train_csv), read_partition(external_csv)
    assert list(train.sites) == ["1", "3"] and external.sites == {"2": [case_id_for(3), case_id_for(4)]}
    assert set(train.train_or_val) == {case_id_for(i) for i in (1, 2, 5, 6)}  # the fixed split stays
    assert external.train_or_val == {}  # an external site is scored on all its cases


@pytest.mark.parametrize(("sites", "site", "message"), [
    ((1, 2), "7", "holdout-site '7' is not a site of .*partitioning_1.csv; its sites are 1, 2"),
    ((1, 1), "1", "holdout-site '1': .* has no other site to train the federation"),
])  # fmt: skip
def test_a_bad_holdout_site_is_refused_naming_the_partition(tmp_path, sites, site, message):
    with pytest.raises(ValueError, match=message):
        split_holdout(_partition(tmp_path, sites), site, tmp_path / "run")


def test_simulate_scores_the_global_model_at_the_left_out_site(tmp_path, monkeypatch):
    data = tmp_path / "data"
    for i in range(6):
        write_case(data, seed=i)
    partition = _partition(data)
    trained_on = []

    def fake_federation(config, data_dir, partition_csv, out, **_):  # the federation, as far as the run folder goes
        trained_on.append(sorted(read_partition(partition_csv).sites))
        save_checkpoint(out / "global_model.safetensors", create_model("resunet", width=8, depth=2),
                        extra={"patch_size": [16, 16, 16]})  # fmt: skip
        write_run(out, [record(1, {"1": 0.5, "2": 0.4})], {"strategy": "fedavg", "hd95-definition": "pooled"})
        return True

    monkeypatch.setattr(simulate_module, "simulate", fake_federation)
    config = RunConfig(holdout_site="3", val_fraction=0.5)
    assert simulate_module.run_simulate(config, data, partition, tmp_path / "run") == 0
    assert trained_on == [["1", "2"]]
    external = json.loads((tmp_path / "run" / "external_evaluation.json").read_text())
    assert external["cases"] == 2 and external["sites"] == {"3": 2} and "--split all" in external["pipeline"]
    final = json.loads((tmp_path / "run" / "final_evaluation.json").read_text())
    assert final["sites"] == {"1": 1, "2": 1}  # the training sites' validation halves
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## External site 3 (left out of training)" in report and "## Final evaluation" in report


def test_a_deployed_server_refuses_holdout_site_before_any_round(tmp_path):
    from flwr.superlink.grid import HttpGrid

    from fedbrats.server.app import run_server

    grid = HttpGrid.__new__(HttpGrid)  # a SuperLink's grid; never used: the refusal comes first
    with pytest.raises(ValueError, match="holdout-site = '3' applies to simulations"):
        run_server(grid, RunConfig(holdout_site="3", out_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()
