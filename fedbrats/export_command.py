"""`fedbrats export`: a checkpoint as TorchScript, ONNX or a MONAI bundle, checked against PyTorch.

The parser is defined here (cli.py adds it) so the command lives in one file; the work is done by
`fedbrats.shared.models.export`, imported only when the command runs so `fedbrats --help` stays instant.
"""

from __future__ import annotations

import argparse
from pathlib import Path

#: fedbrats.shared.models.export.FORMATS, repeated so --help imports no torch (tests/test_export.py keeps them equal).
FORMATS = ("torchscript", "onnx", "monai-bundle")


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write a checkpoint as TorchScript, ONNX or a MONAI bundle, checked against PyTorch"
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="a .safetensors checkpoint of fedbrats")
    p.add_argument("--format", dest="fmt", required=True, choices=FORMATS, help="the format to write")
    p.add_argument("--out", type=Path, required=True,
                   help="file to write (.pt/.ts for torchscript, .onnx), or the bundle folder for monai-bundle")
    p.add_argument("--force", action="store_true", help="replace an existing output (a bundle only by a bundle)")
    p.add_argument("--label-set", default=None, choices=["brats2021", "brats2023", "brats2024"],
                   help="monai-bundle: label values of the written segmentation (default: the checkpoint's, "
                        "else brats2021: ET 4, core 1, edema 2)")  # fmt: skip
    p.add_argument("--opset", type=int, default=17, help="onnx: ONNX opset version")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fedbrats.shared.models.export import TOLERANCE, export_checkpoint

    console = Console()
    with console.status(f"exporting {args.checkpoint} as {args.fmt} (trace, write, check against PyTorch)"):
        result = export_checkpoint(
            args.checkpoint, args.fmt, args.out, force=args.force, label_set=args.label_set, opset=args.opset
        )
    shapes = ", ".join("x".join(str(s) for s in shape) for shape in result.check_shapes)
    print(f"written: {result.path}")
    print(f"format: {result.format}; model: {result.parameters:,} parameters")
    print(f"max abs difference vs PyTorch: {result.max_abs_diff:.3g} (tolerance {TOLERANCE:g}; inputs {shapes})")
    print(f"export seconds: {result.seconds:.1f}")
    for note in result.notes:
        print(note)
    return 0
