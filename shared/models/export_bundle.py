"""A segmentation checkpoint as a MONAI bundle: `python -m monai.bundle run` segments BraTS cases with it.

Layout (MONAI's bundle specification):

    configs/metadata.json   what goes in and out: modalities, ET/TC/WT channels, BraTS label values
    configs/inference.json  load, crop, z-score, sliding window, post-processing, write <case>_pred.nii.gz
    configs/logging.conf    the runner's log format (MONAI warns when a bundle has none)
    models/model.pt         the weights as a plain state dict (torch.save; MONAI loads it weights_only)
    models/model.ts         the same network as TorchScript, for hosts without FedBraTS
    docs/README.md          how to run it

The network is `network_def` with `_target_` naming our registered model class and its configuration:
the bundle specification's own form, which `monai.bundle run`, `monai.bundle.load`, `ckpt_export` and
MONAI Label all rebuild the same way, with the weights in `models/model.pt`. It needs `fedbrats`
importable; where it is not, `--network_def "\\$torch.jit.load(@bundle_root + '/models/model.ts')"` swaps in the
TorchScript copy and nothing else in the config imports FedBraTS (the post-processing is written with
MONAI transforms and torch expressions only).

Inference follows `fedbrats predict` without flip TTA: crop to the non-zero box, z-score each modality
over its non-zero voxels, Gaussian-blended sliding window over the training patch with overlap 0.5,
sigmoid, threshold 0.5, predictions outside the brain removed, regions nested (ET in TC in WT), an ET
under 500 mm^3 turned into core, labels written in the chosen BraTS convention, crop undone.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from fedbrats.shared.atomic import atomic_write, atomic_write_json, atomic_write_text
from fedbrats.shared.constants import LAYOUTS, MODALITIES, REGIONS
from fedbrats.shared.evaluation.inference import SW_BATCH_SIZE
from fedbrats.shared.evaluation.postprocess import MIN_ET_MM3
from fedbrats.shared.labels import label_set_named, region_label_values
from fedbrats.shared.models.export_model import (
    ExportError,
    ExportModel,
    as_outputs,
    max_abs_diff,
    quiet_tracing,
    reference_outputs,
    require_match,
    torchscript_bytes,
)
from fedbrats.shared.models.registry import MODELS

DEFAULT_LABEL_SET = "brats2021"
LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""
#: The layout whose file names a label set's cases use (2024 GLI cases are named as 2023's).
_LAYOUT_OF = {"brats2021": "brats2021", "brats2023": "brats2023", "brats2024": "brats2023"}


def _target(model_name: str) -> str:
    """Import path of the registered class or factory, as MONAI's `_target_` wants it."""
    factory = MODELS.get(model_name)
    return f"{factory.__module__}.{factory.__qualname__}"


def segmentation_config(em: ExportModel) -> dict[str, Any]:
    """The constructor arguments of the bundle's network: a multi-task U-Net loses its class head."""
    config = dict(em.meta["model_config"])
    if "class_logits" in em.output_names and "n_classes" in config:
        config["n_classes"] = 0
    return config


def segmentation_state(em: ExportModel) -> dict[str, torch.Tensor]:
    """The weights the bundle's network takes (without `class_head.*` when the head was dropped)."""
    drop = "class_logits" in em.output_names
    return {k: v.detach().cpu().contiguous() for k, v in em.model.state_dict().items()
            if not (drop and k.startswith("class_head."))}  # fmt: skip


def label_convention(label_set: str) -> dict[str, Any]:
    """metadata.json's description of the output: region channels, label values, and how one gives the other."""
    ls = label_set_named(label_set)
    et, ncr, ed = region_label_values(ls)
    return {
        "label_set": ls.name,
        "model_channels": {str(i): r for i, r in enumerate(REGIONS)},
        "regions": {r: sorted(ls.region_labels(r)) for r in REGIONS},
        "labels": {str(k): v for k, v in sorted(ls.names.items())},
        "written_labels": {"0": "background", str(ncr): ls.names[ncr], str(ed): ls.names[ed], str(et): ls.names[et]},
        "rule": "WT -> edema, TC -> core, ET -> enhancing (regions nested first)",
        "override": "--et_label 3 --ncr_label 1 --ed_label 2 writes BraTS 2023+ values (4 1 2: BraTS 2017-2021)",
    }


def inference_config(em: ExportModel, label_set: str) -> dict[str, Any]:
    """configs/inference.json: MONAI components only, plus `network_def` naming our model class."""
    et, ncr, ed = region_label_values(label_set)
    layout = LAYOUTS[_LAYOUT_OF[label_set_named(label_set).name]]
    suffixes = [layout.filename("", m) for m in MODALITIES]  # "_t1.nii.gz", ... or "-t1n.nii.gz", ...
    return {
        "imports": ["$import glob", "$import os", "$import numpy", "$import torch"],
        "bundle_root": ".",
        "dataset_dir": "data",
        "output_dir": "$@bundle_root + '/eval'",
        "modality_files": suffixes,
        "case_dirs": "$[@dataset_dir] + sorted(glob.glob(os.path.join(@dataset_dir, '*')))",
        "datalist": "$[{'image': f} for f in ([os.path.join(c, os.path.basename(os.path.normpath(c)) + s) "
                    "for s in @modality_files] for c in @case_dirs) if all(os.path.isfile(p) for p in f)]",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": _target(em.meta["model_name"]), **segmentation_config(em)},
        "network": "$@network_def.to(@device)",
        "patch_size": [int(p) for p in em.meta["patch_size"]],
        "overlap": 0.5,
        "sw_batch_size": SW_BATCH_SIZE,
        "threshold": 0.5,
        "min_et_mm3": MIN_ET_MM3,
        "et_label": et,
        "ncr_label": ncr,
        "ed_label": ed,
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image", "image_only": True},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
            {"_target_": "CropForegroundd", "keys": "image", "source_key": "image", "select_fn": "$lambda x: x != 0",
             "margin": 0, "allow_smaller": True},
            {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True},
        ]},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": "@patch_size", "sw_batch_size": "@sw_batch_size",
                    "overlap": "@overlap", "mode": "gaussian"},
        "brain_only": "$lambda d: dict(d, pred=d['pred'] * (d['image'] != 0).any(0, keepdim=True))",
        "nest_regions": "$lambda p: torch.stack([p[0], torch.maximum(p[0], p[1]), "
                        "torch.maximum(torch.maximum(p[0], p[1]), p[2])])",
        "small_et_to_core": "$lambda d: dict(d, pred=torch.cat([d['pred'][:1] * float(d['pred'][0].sum().item() >= "
                            "round(@min_et_mm3 / float(torch.as_tensor(d['image'].pixdim).prod()))), d['pred'][1:]]))",
        "regions_to_labels": "$lambda p: p[2:3] * @ed_label + p[1:2] * (@ncr_label - @ed_label) "
                             "+ p[0:1] * (@et_label - @ncr_label)",
        "case_name": "$lambda meta, saver: {'subject': os.path.basename(os.path.dirname(str(meta['filename_or_obj']))), "
                     "'idx': None}",
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
            {"_target_": "AsDiscreted", "keys": "pred", "threshold": "@threshold"},
            {"_target_": "Lambda", "func": "@brain_only"},
            {"_target_": "Lambdad", "keys": "pred", "func": "@nest_regions"},
            {"_target_": "Lambda", "func": "@small_et_to_core"},
            {"_target_": "Lambdad", "keys": "pred", "func": "@regions_to_labels"},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": True, "to_tensor": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "pred",
             "output_dtype": "$numpy.uint8", "resample": False, "separate_folder": False,
             "output_name_formatter": "@case_name"},
        ]},
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
             "load_dict": {"model": "@network"}, "map_location": "@device"},
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "initialize": [],
        "run": ["$@evaluator.run()"],
    }  # fmt: skip


def metadata(em: ExportModel, label_set: str) -> dict[str, Any]:
    """configs/metadata.json: the bundle specification's fields, our label convention and the model's origin."""
    import monai
    import numpy

    fedbrats_version = _version("fedbrats")
    patch = [int(p) for p in em.meta["patch_size"]]
    channels = {str(i): m.upper().replace("CE", "ce") for i, m in enumerate(MODALITIES)}
    return {
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by fedbrats {fedbrats_version} from {em.source.name}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {"fedbrats": fedbrats_version, "nibabel": _version("nibabel")},
        "name": f"FedBraTS {em.meta['model_name']} brain tumor segmentation",
        "task": "Brain tumor segmentation (BraTS regions ET, TC, WT) from T1, T1ce, T2 and FLAIR MRI",
        "description": "A FedBraTS global model. Inputs: the four BraTS-preprocessed modalities of a case (skull-"
                       "stripped, co-registered, 1 mm). Output: a BraTS label map in the input's grid.",
        "authors": "FedBraTS consortium",
        "copyright": "Copyright (c) the FedBraTS consortium",
        "intended_use": "Research only; not a medical device",
        "label_convention": label_convention(label_set),
        "fedbrats": em.summary(),
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": "MR", "num_channels": len(MODALITIES),
                "spatial_shape": patch, "dtype": "float32", "value_range": [], "is_patch_data": True,
                "channel_def": channels,
            }},
            "outputs": {"pred": {
                "type": "image", "format": "segmentation", "num_channels": len(REGIONS), "spatial_shape": patch,
                "dtype": "float32", "value_range": [], "is_patch_data": True,
                "channel_def": {str(i): r for i, r in enumerate(REGIONS)},
            }},
        },
    }  # fmt: skip


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def readme(em: ExportModel, label_set: str) -> str:
    """docs/README.md of the bundle: what it is and the commands that run it."""
    return f"""# FedBraTS {em.meta['model_name']} segmentation bundle

Exported by `fedbrats export` from `{em.source.name}` (round {em.meta.get('round', '?')}).
Input: one folder per case with the four BraTS modalities ({', '.join(MODALITIES)}).
Output: `<case>_pred.nii.gz`, labels of {label_set} ({json.dumps(label_convention(label_set)['written_labels'])}).

    cd <this folder>
    python -m monai.bundle run --config_file configs/inference.json --dataset_dir /path/to/cases --output_dir out

`--dataset_dir` is one case folder or a folder of case folders. Without FedBraTS installed, add
`--network_def "\\$torch.jit.load(@bundle_root + '/models/model.ts')"`. See configs/metadata.json for the label convention.
"""


def _check_network(em: ExportModel, staging: Path, config: dict[str, Any], traced_on: ExportModel) -> float:
    """Rebuild the network as the bundle runner does (`network_def`, then model.pt) and compare; model.ts on
    the inputs its own check passed (`traced_on`: fixed spatial axes for a model whose trace froze a shape)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser({"network_def": config["network_def"]})
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(staging / "models" / "model.pt", map_location="cpu", weights_only=True))
    with quiet_tracing():
        scripted = torch.jit.load(str(staging / "models" / "model.ts"), map_location="cpu")
    worst = 0.0
    with torch.no_grad(), quiet_tracing():
        for checked, runner in ((em, network.eval()), (traced_on, scripted)):
            expected = [outputs[:1] for outputs in reference_outputs(checked)]  # the segmentation logits
            worst = max(worst, max_abs_diff(expected, [as_outputs(runner(x))[:1] for x in checked.inputs]))
    return worst


def write_bundle(em: ExportModel, out: Path, *, label_set: str | None = None) -> tuple[ExportModel, float, list[str]]:
    """Write the bundle into a staging folder, check its network against the checkpoint, then move it to `out`."""
    if em.classifies_only:
        raise ExportError(
            f"{em.source}: a MONAI bundle export is for segmentation models, and this checkpoint is a case classifier "
            f"(task {em.meta.get('task')!r}, class logits only); export it with --format torchscript or onnx"
        )
    label_set = label_set_named(label_set or em.meta.get("label_set") or DEFAULT_LABEL_SET).name
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        for sub in ("configs", "models", "docs"):
            (staging / sub).mkdir(parents=True)
        config = inference_config(em, label_set)
        atomic_write_json(staging / "configs" / "inference.json", config)
        atomic_write_json(staging / "configs" / "metadata.json", metadata(em, label_set))
        atomic_write_text(staging / "configs" / "logging.conf", LOGGING_CONF)
        atomic_write_text(staging / "docs" / "README.md", readme(em, label_set))
        buffer = io.BytesIO()
        torch.save(segmentation_state(em), buffer)
        atomic_write(staging / "models" / "model.pt", buffer.getvalue())
        traced_on, data, _ = torchscript_bytes(_segmentation_only(em))
        atomic_write(staging / "models" / "model.ts", data)
        diff = _check_network(em, staging, config, traced_on)
        require_match(diff, "the bundle's network (network_def + model.pt, and model.ts)")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():  # check_output_path let it through: --force, and it is a bundle
        shutil.rmtree(out)
    staging.rename(out)
    notes = [f"network_def: {config['network_def']['_target_']} (needs fedbrats; models/model.ts does not)",
             f"labels written as {label_set}; roi {config['patch_size']}, overlap {config['overlap']}",
             f"run: cd {out} && python -m monai.bundle run --config_file configs/inference.json "
             "--dataset_dir CASES --output_dir OUT"]  # fmt: skip
    if not traced_on.spatial_dynamic:
        notes.append("models/model.ts runs on the roi only (its trace froze the model's shape-dependent forward)")
    return em, diff, notes


def _segmentation_only(em: ExportModel) -> ExportModel:
    """The checkpoint's network without a classification head (same segmentation weights, one output)."""
    if "class_logits" not in em.output_names:
        return em
    from fedbrats.shared.models import create_model

    model = create_model(em.meta["model_name"], **segmentation_config(em))
    model.load_state_dict(segmentation_state(em), strict=True)
    return ExportModel(model.eval(), em.meta, em.source, em.inputs, ("logits",))
