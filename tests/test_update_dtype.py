"""update-dtype: a site's update travels in float16 or bfloat16, the weights stay float32 at both ends.

The bfloat16 helpers (`shared.wire`) are checked against their definition (round to nearest, ties to
even) and against torch's own bfloat16 cast; the round loop against in-process sites (tests/fake_sites.py):
half the bytes up, the same model within the rounding of the update, and a reply that travels in
another dtype than the run's is dropped with the reason. One slow test runs the real ClientApp.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedbrats.server.federation import Federation
from fedbrats.server.history import read_history
from fedbrats.shared.config import CHOICES, RunConfig
from fedbrats.shared.wire import (
    UPDATE_DTYPES,
    WireError,
    decode_update,
    encode_update,
    from_bfloat16_bits,
    to_bfloat16_bits,
)
from fedbrats.strategies import build_strategy

from .fake_sites import Sites


def test_the_config_copy_of_the_choices_agrees_and_float32_is_the_default():
    assert CHOICES["update_dtype"] == UPDATE_DTYPES
    assert RunConfig().update_dtype == "float32"
    with pytest.raises(ValueError, match="update-dtype"):
        RunConfig(update_dtype="int8")


# --- bfloat16 as uint16 -------------------------------------------------------------------------------
def test_every_finite_bfloat16_survives_the_round_trip_exactly():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    values = from_bfloat16_bits(bits)
    finite = ~np.isnan(values)
    assert np.array_equal(to_bfloat16_bits(values[finite]), bits[finite])  # infinities and signed zeros too
    assert np.isnan(from_bfloat16_bits(to_bfloat16_bits(values[~finite]))).all()


def test_bfloat16_rounds_to_nearest_ties_to_even_within_half_an_ulp():
    one = 1.0
    ties = np.array([one + 2**-8, one + 3 * 2**-8, -(one + 2**-8)], np.float32)  # exactly halfway
    assert from_bfloat16_bits(to_bfloat16_bits(ties)).tolist() == [1.0, one + 2**-6, -1.0]
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(200_000) * 10.0 ** rng.uniform(-30, 30, 200_000)).astype(np.float32)
    back = from_bfloat16_bits(to_bfloat16_bits(x))
    assert np.all(np.abs(back.astype(np.float64) - x) <= 2.0**-8 * np.abs(x.astype(np.float64)))
    ours = to_bfloat16_bits(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)


def test_wrong_carrier_is_refused():
    with pytest.raises(WireError, match="uint16"):
        from_bfloat16_bits(np.zeros(3, np.int16))


# --- records: what a site sends and what the server rebuilds ----------------------------------------
def _records(seed: int = 0, n: int = 4096) -> tuple[ArrayRecord, ArrayRecord]:
    rng = np.random.default_rng(seed)
    sent = {
        "w": rng.standard_normal((n,)).astype(np.float32),
        "b": rng.standard_normal(16).astype(np.float32),
    }
    trained = {k: v + (rng.standard_normal(v.shape) * 1e-3).astype(np.float32) for k, v in sent.items()}
    steps = {"steps": np.array([7], np.int64)}
    return ArrayRecord({k: Array(v) for k, v in {**sent, **steps}.items()}), ArrayRecord(
        {k: Array(v) for k, v in {**trained, **steps}.items()}
    )


@pytest.mark.parametrize(
    ("dtype", "unit", "floor"), [("float16", 2.0**-11, 2.0**-25), ("bfloat16", 2.0**-8, 0.0)]
)
def test_the_server_rebuilds_the_weights_within_the_rounding_of_the_update(dtype, unit, floor):
    """Relative error 2^-11 (float16) or 2^-8 (bfloat16) of the update; float16's subnormals (below 2^-14)
    round to multiples of 2^-24, hence its absolute floor."""
    sent, trained = _records()
    wire = encode_update(sent, trained, dtype)
    assert (
        wire["w"].dtype == ("float16" if dtype == "float16" else "uint16") and wire["steps"].dtype == "int64"
    )
    rebuilt = decode_update(sent, wire, dtype)
    for name in ("w", "b"):
        weights, update = trained[name].numpy(), trained[name].numpy() - sent[name].numpy()
        assert rebuilt[name].dtype == "float32"
        error = np.abs(rebuilt[name].numpy() - weights)
        assert np.all(error <= unit * np.abs(update) + floor + 2 * np.spacing(np.abs(weights)))
    assert rebuilt["steps"].numpy().tolist() == [7]


def test_float32_sends_the_weights_unchanged():
    sent, trained = _records()
    assert encode_update(sent, trained, "float32") is trained
    assert decode_update(sent, trained, "float32") is trained


def test_the_server_accepts_exactly_the_configured_dtype():
    sent, trained = _records()
    with pytest.raises(
        WireError, match="travels as float32; with update-dtype float16 the run expects float16 only"
    ):
        decode_update(sent, trained, "float16")
    with pytest.raises(WireError, match="travels as uint16; with update-dtype float16"):
        decode_update(sent, encode_update(sent, trained, "bfloat16"), "float16")
    huge = ArrayRecord({**dict(trained.items()), "w": Array(np.full(4096, 1e6, np.float32))})
    with pytest.raises(WireError, match="non-finite"):  # beyond float16's range
        decode_update(sent, encode_update(sent, huge, "float16"), "float16")


# --- a federated round with in-process sites --------------------------------------------------------
class WireSites(Sites):
    """`Sites` that send their update in `dtype`, as client/app.py does."""

    def __init__(self, dtype: str, **kwargs):
        super().__init__(**kwargs)
        self.dtype = dtype

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        for msg, reply in zip(messages, replies, strict=True):
            if msg.metadata.message_type.startswith("train"):
                reply.content["arrays"] = encode_update(
                    msg.content["arrays"], reply.content["arrays"], self.dtype
                )
        return replies


def _run(tmp_path, grid, update_dtype: str) -> tuple[dict, dict[str, np.ndarray]]:
    model = ArrayRecord(
        {"w": Array(np.linspace(-1, 1, 64 * 1024, dtype=np.float32)), "b": Array(np.zeros(8, np.float32))}
    )
    config = RunConfig(rounds=1, min_sites=2, out_dir=str(tmp_path), update_dtype=update_dtype)
    arrays = Federation(grid, config, build_strategy("fedavg"), model, out_dir=tmp_path).run()
    return read_history(tmp_path / "history.jsonl")[-1], {k: v.numpy() for k, v in arrays.items()}


@pytest.mark.parametrize(("dtype", "unit"), [("float16", 2.0**-11), ("bfloat16", 2.0**-8)])
def test_a_round_in_reduced_precision_halves_the_upload_and_keeps_the_model(tmp_path, dtype, unit):
    full, full_model = _run(tmp_path / "float32", Sites(), "float32")
    half, half_model = _run(tmp_path / dtype, WireSites(dtype), dtype)
    assert half["status"] == "ok" and all(t["dropped"] is None for t in half["train"])
    assert 0.49 < half["bytes_received"] / full["bytes_received"] < 0.51  # .npy headers: a little over half
    assert half["bytes_sent"] == full["bytes_sent"]  # the global model still goes out in float32
    for name, weights in full_model.items():
        assert half_model[name].dtype == np.float32
        assert np.allclose(half_model[name], weights, rtol=0, atol=0.4 * unit + 1e-6)  # updates are <= 0.4


@pytest.mark.parametrize(("sites", "run_dtype", "reason"), [
    (Sites(), "float16", "travels as float32; with update-dtype float16"),
    (WireSites("bfloat16"), "float16", "travels as uint16; with update-dtype float16"),
    (WireSites("float16"), "float32", "has dtype float16, expected float32"),
])  # fmt: skip
def test_a_reply_in_another_dtype_than_the_runs_is_dropped_with_the_reason(
    tmp_path, sites, run_dtype, reason
):
    record, _ = _run(tmp_path, sites, run_dtype)
    assert record["status"].startswith("failed")
    assert all(reason in t["dropped"] for t in record["train"])
    assert record["bytes_received"] == 0


# --- the real ClientApp -----------------------------------------------------------------------------
@pytest.mark.slow
def test_the_client_app_sends_float16_and_the_round_keeps_the_model(tmp_path):
    from fedbrats.server.app import run_server
    from fedbrats.server.state import load_state
    from fedbrats.shared.data.phantom import generate_phantom

    from .local_grid import LocalGrid

    class Recording(LocalGrid):  # the dtypes as they leave the sites (the server decodes replies in place)
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.travelled: set[str] = set()

        def send_and_receive(self, messages, *, timeout=None):
            replies = super().send_and_receive(messages, timeout=timeout)
            self.travelled |= {
                a.dtype for r in replies if "arrays" in r.content for a in r.content["arrays"].values()
            }
            return replies

    torch.set_num_threads(1)
    phantom = tmp_path / "phantom"
    generate_phantom(phantom, sites=2, cases_per_site=3, voxel_size=5.0, seed=3, progress=False)
    tiny = dict(model_width=8, model_depth=2, patch_size=16, batch_size=2, local_steps=2, cache="memory", rounds=1,
                min_sites=1, data_dir=str(phantom), partition=str(phantom / "partitioning_1.csv"))  # fmt: skip
    runs = {}
    for dtype in ("float32", "float16"):
        config = RunConfig(**tiny, out_dir=str(tmp_path / dtype), update_dtype=dtype)
        grid = Recording(config.to_flower(), sites=2)
        run_server(grid, config)
        assert grid.travelled == {dtype}
        runs[dtype] = (
            read_history(tmp_path / dtype / "history.jsonl")[-1],
            load_state(tmp_path / dtype / "server").arrays,
        )
    (full, full_model), (half, half_model) = runs["float32"], runs["float16"]
    assert half["status"] == "ok" and half["bytes_received"] < 0.55 * full["bytes_received"]
    for name, array in full_model.items():
        assert np.allclose(half_model[name].numpy(), array.numpy(), rtol=1e-3, atol=1e-5), name
