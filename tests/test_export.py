"""`fedbrats export`: TorchScript, ONNX and MONAI bundle round trips, checked against PyTorch; clear refusals."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from fedbrats import cli, export_command
from fedbrats.shared.checkpoint import CheckpointError, save_checkpoint
from fedbrats.shared.models import create_model, export_model
from fedbrats.shared.models.export import FORMATS, TOLERANCE, ExportError, export_checkpoint
from tests.data_fixtures import write_case

torch.set_num_threads(1)
PATCH = [16, 16, 16]


def _segmenter(tmp_path, name="seg.safetensors", **config):
    torch.manual_seed(0)
    model = create_model("resunet", **{"width": 8, "depth": 3, **config})
    task = "multitask" if config.get("n_classes") else "segmentation"
    return save_checkpoint(tmp_path / name, model, extra={"patch_size": PATCH, "task": task, "round": 3})


def _classifier(tmp_path):
    torch.manual_seed(0)
    model = create_model("resclassifier", width=8, depth=2)
    extra = {"task": "classification", "classes": ["LGG", "HGG"], "label_column": "grade", "class_input_size": 16}
    return save_checkpoint(tmp_path / "cls.safetensors", model, extra=extra)


def _reference(checkpoint, x):
    from fedbrats.shared.checkpoint import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    with torch.no_grad():
        return model(x)


def test_the_cli_offers_the_exporters_formats():
    assert export_command.FORMATS == FORMATS


def test_torchscript_round_trip_gives_pytorchs_outputs_and_carries_metadata(tmp_path, capsys):
    ckpt = _segmenter(tmp_path)
    out = tmp_path / "model.ts"
    assert cli.main(["export", "--checkpoint", str(ckpt), "--format", "torchscript", "--out", str(out)]) == 0
    assert "written: " in capsys.readouterr().out
    extra = {"fedbrats.json": ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    meta = json.loads(extra["fedbrats.json"])
    assert meta["model_name"] == "resunet" and meta["regions"] == ["ET", "TC", "WT"] and meta["patch_size"] == PATCH
    x = torch.randn(2, 4, 24, 16, 32)  # another batch and shape than the trace's
    with torch.no_grad():
        assert torch.allclose(loaded(x), _reference(ckpt, x), atol=1e-6)


def test_onnx_matches_pytorch_within_the_tolerance_and_the_command_says_by_how_much(tmp_path, capsys):
    import onnx
    import onnxruntime as ort

    ckpt = _segmenter(tmp_path)
    out = tmp_path / "model.onnx"
    assert cli.main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    stated = float(re.search(r"max abs difference vs PyTorch: (\S+)", printed).group(1))
    assert 0 <= stated < 1e-4
    x = torch.randn(1, 4, 32, 24, 16)  # dynamic spatial axes: not the exported patch
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"image": x.numpy()})
    assert np.abs(got - _reference(ckpt, x).numpy()).max() < 1e-4
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["regions"] == "ET,TC,WT" and json.loads(props["fedbrats"])["model_config"]["width"] == 8


def test_a_classifier_exports_class_logits_and_is_refused_as_a_bundle(tmp_path):
    import onnxruntime as ort

    ckpt = _classifier(tmp_path)
    x = torch.randn(3, 4, 16, 16, 16)
    ts = export_checkpoint(ckpt, "torchscript", tmp_path / "cls.ts")
    assert ts.max_abs_diff <= TOLERANCE
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(ts.path))(x), _reference(ckpt, x), atol=1e-6)
    onnx_result = export_checkpoint(ckpt, "onnx", tmp_path / "cls.onnx")
    assert onnx_result.max_abs_diff < 1e-4 and onnx_result.check_shapes[0] == (1, 4, 16, 16, 16)
    session = ort.InferenceSession(str(onnx_result.path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["class_logits"]
    (got,) = session.run(None, {"image": x.numpy()})
    assert got.shape == (3, 2) and np.abs(got - _reference(ckpt, x).numpy()).max() < 1e-4
    with pytest.raises(ExportError, match="case classifier.*torchscript or onnx"):
        export_checkpoint(ckpt, "monai-bundle", tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


@pytest.mark.parametrize("class_head", ["bottleneck", "profile"])
def test_a_multitask_unet_exports_both_outputs_and_a_bundle_without_its_class_head(tmp_path, class_head):
    import onnxruntime as ort

    ckpt = _segmenter(tmp_path, n_classes=2, class_head=class_head)
    result = export_checkpoint(ckpt, "onnx", tmp_path / "mt.onnx")
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "class_logits"]
    bundle = export_checkpoint(ckpt, "monai-bundle", tmp_path / "bundle")
    assert bundle.max_abs_diff == 0.0  # the rebuilt network's segmentation is the checkpoint's, bit for bit
    config = json.loads((tmp_path / "bundle" / "configs" / "inference.json").read_text())
    assert config["network_def"]["n_classes"] == 0
    state = torch.load(tmp_path / "bundle" / "models" / "model.pt", weights_only=True)
    assert state and not any(k.startswith("class_head.") for k in state)


def test_the_bundle_describes_labels_window_and_network(tmp_path):
    from monai.bundle import ConfigParser

    ckpt = _segmenter(tmp_path)
    export_checkpoint(ckpt, "monai-bundle", tmp_path / "bundle")
    root = tmp_path / "bundle"
    assert {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} == {
        "configs/inference.json", "configs/metadata.json", "configs/logging.conf", "models/model.pt",
        "models/model.ts", "docs/README.md",
    }  # fmt: skip
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    convention = meta["label_convention"]
    assert convention["model_channels"] == {"0": "ET", "1": "TC", "2": "WT"}
    assert convention["regions"] == {"ET": [4], "TC": [1, 4], "WT": [1, 2, 4]}
    assert convention["labels"]["4"] == "ET" and meta["network_data_format"]["inputs"]["image"]["num_channels"] == 4
    config = json.loads((root / "configs" / "inference.json").read_text())
    assert config["patch_size"] == PATCH and config["inferer"]["roi_size"] == "@patch_size"
    assert (config["et_label"], config["ncr_label"], config["ed_label"]) == (4, 1, 2)
    network = ConfigParser(config).get_parsed_content("network_def")
    assert type(network).__name__ == "ResUNet" and network.config["width"] == 8
    export_checkpoint(ckpt, "monai-bundle", root, force=True, label_set="brats2023")
    config = json.loads((root / "configs" / "inference.json").read_text())
    assert config["et_label"] == 3 and config["modality_files"][0] == "-t1n.nii.gz"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left


@pytest.fixture(scope="module")
def bundle_and_reference(tmp_path_factory):
    """A bundle, a case, and `fedbrats predict`'s labels for it (no TTA: the bundle has none)."""
    from fedbrats.shared.evaluation.inference import predict_case

    root = tmp_path_factory.mktemp("bundle_run")
    ckpt = _segmenter(root)
    export_checkpoint(ckpt, "monai-bundle", root / "bundle")
    case = write_case(root / "cases", shape=(40, 36, 24))
    written = predict_case(ckpt, case, root / "predicted", tta=False, device="cpu")
    return root, case, nib.load(written["labels"])


def _run(command, cwd, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return sorted(out.glob("*_pred.nii.gz"))


@pytest.mark.slow
def test_monai_bundle_run_segments_a_case_as_fedbrats_predict_does(bundle_and_reference):
    root, case, reference = bundle_and_reference
    out = root / "bundle_out"
    written = _run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                    "--dataset_dir", str(case), "--output_dir", str(out)], root / "bundle", out)  # fmt: skip
    assert [p.name for p in written] == [f"{case.name}_pred.nii.gz"]
    labels = nib.load(written[0])
    assert np.allclose(labels.affine, reference.affine) and labels.get_data_dtype() == np.uint8
    got, want = np.asarray(labels.dataobj), np.asarray(reference.dataobj)
    assert set(np.unique(want)) >= {1, 2}  # the reference segments something: the comparison means something
    assert (got == want).mean() >= 0.999


@pytest.mark.slow
def test_the_bundle_runs_without_fedbrats_from_its_torchscript_copy(bundle_and_reference):
    root, case, reference = bundle_and_reference
    out = root / "ts_out"
    code = ("import sys; sys.modules['fedbrats'] = None; from monai.bundle import run; "  # as on a host without it
            f"run(config_file='configs/inference.json', dataset_dir={str(case.parent)!r}, output_dir={str(out)!r}, "
            "network_def=\"$torch.jit.load(@bundle_root + '/models/model.ts')\")")  # fmt: skip
    written = _run([sys.executable, "-c", code], root / "bundle", out)
    assert len(written) == 1
    assert (np.asarray(nib.load(written[0]).dataobj) == np.asarray(reference.dataobj)).mean() >= 0.999


def test_bad_inputs_are_refused_clearly(tmp_path, capsys):
    ckpt = _segmenter(tmp_path)
    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        export_checkpoint(ckpt, "tflite", tmp_path / "m")
    with pytest.raises(SystemExit):
        cli.main(["export", "--checkpoint", str(ckpt), "--format", "tflite", "--out", str(tmp_path / "m")])
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
    assert cli.main(["export", "--checkpoint", str(tmp_path / "nope.safetensors"), "--format", "onnx",
                     "--out", str(tmp_path / "m.onnx")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith("fedbrats export: error: ") and "does not exist" in err and err.count("\n") == 1
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a safetensors"):
        export_checkpoint(junk, "torchscript", tmp_path / "m.ts")
    no_patch = save_checkpoint(tmp_path / "np.safetensors", create_model("resunet", width=8, depth=2))
    with pytest.raises(ExportError, match="no patch_size"):
        export_checkpoint(no_patch, "onnx", tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="folder .* does not exist"):
        export_checkpoint(ckpt, "onnx", tmp_path / "absent" / "m.onnx")
    assert not list(tmp_path.glob("m*"))


def test_an_existing_output_needs_force_and_force_replaces_only_its_own_kind(tmp_path):
    ckpt = _segmenter(tmp_path)
    out = tmp_path / "model.ts"
    out.write_bytes(b"old")
    with pytest.raises(ExportError, match="already exists; pass --force"):
        export_checkpoint(ckpt, "torchscript", out)
    assert out.read_bytes() == b"old"
    export_checkpoint(ckpt, "torchscript", out, force=True)
    assert out.read_bytes() != b"old"
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not a MONAI bundle"):
        export_checkpoint(ckpt, "monai-bundle", folder, force=True)
    with pytest.raises(ExportError, match="is a folder"):
        export_checkpoint(ckpt, "onnx", folder, force=True)
    assert (folder / "keep.txt").read_text() == "mine"


def test_an_export_that_fails_its_check_writes_nothing(tmp_path, monkeypatch):
    ckpt = _segmenter(tmp_path)
    monkeypatch.setattr(export_model, "TOLERANCE", -1.0)  # every difference, even 0, is then too large
    for fmt, name in (("torchscript", "m.ts"), ("onnx", "m.onnx"), ("monai-bundle", "bundle")):
        with pytest.raises(ExportError, match="differs from PyTorch.*nothing written"):
            export_checkpoint(ckpt, fmt, tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.safetensors"]


class _SliceLoop(torch.nn.Module):
    """A model whose forward loops over the axial slices: a trace freezes the loop at the trace's depth."""

    size_multiple = 4

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(4, 3, 1)

    def forward(self, x):
        return torch.stack([self.conv(x[..., z : z + 1])[..., 0] for z in range(x.shape[-1])], dim=-1)


def test_a_shape_dependent_forward_is_exported_with_fixed_spatial_axes(tmp_path):
    import onnx

    from fedbrats.shared.models.export import export_onnx, export_torchscript

    torch.manual_seed(0)
    x = torch.randn(1, 4, 16, 16, 16)
    em = export_model.ExportModel(_SliceLoop().eval(), {"model_name": "slice_loop", "model_config": {}},
                                  tmp_path / "loop.safetensors", (x, torch.randn(2, 4, 8, 12, 8)), ("logits",))  # fmt: skip
    used, diff, notes = export_onnx(em, tmp_path / "loop.onnx")
    assert not used.spatial_dynamic and diff < 1e-4 and "spatial axes fixed to 16x16x16" in notes[0]
    dims = onnx.load(str(tmp_path / "loop.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 4, 16, 16, 16]
    used, diff, _ = export_torchscript(em, tmp_path / "loop.ts")
    assert not used.spatial_dynamic and diff == 0.0
    assert torch.jit.load(str(tmp_path / "loop.ts"))(torch.randn(3, 4, 16, 16, 16)).shape == (3, 3, 16, 16, 16)


def test_the_onnx_graph_keeps_groupnorm_and_pooling_at_pytorch_accuracy():
    import io

    import onnxruntime as ort

    from fedbrats.shared.models.export import onnx_friendly

    torch.manual_seed(0)
    model = create_model("resunet", width=8, depth=2, se=True).eval()
    friendly = onnx_friendly(model)
    x = torch.randn(2, 4, 16, 8, 24)
    with torch.no_grad():
        assert (friendly(x) - model(x)).abs().max() < 1e-5  # the same function, its means staged
    norm = torch.nn.GroupNorm(2, 8).eval()
    big = torch.randn(1, 8, 64, 64, 64) * 3 + 2  # 1 M voxels a group, off-centre: where one-pass fp32 sums drift
    buffer = io.BytesIO()
    torch.onnx.export(onnx_friendly(norm), (big,), buffer, dynamo=False, input_names=["x"], opset_version=17)
    (got,) = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"]).run(None, {"x": big.numpy()})
    with torch.no_grad():
        exact = norm.double()(big.double()).numpy()
    assert np.abs(got - exact).max() < 2e-5
