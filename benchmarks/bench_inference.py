"""Inference seconds for one whole 1 mm case, with and without flip test-time augmentation.

    python benchmarks/bench_inference.py [--width 16 --depth 4 --patch 96] [--device auto]

One phantom case at 1 mm (240x240x155), preprocessed as `fedbrats predict` does; the model is
untrained (speed does not depend on the weights). TTA averages 8 flips, so the ratio column is
the measured cost of TTA against the plain pass in the same process.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from fedbrats.shared.data.cases import find_case
from fedbrats.shared.data.phantom import generate_phantom
from fedbrats.shared.data.transforms import preprocess
from fedbrats.shared.data.volumes import load_case
from fedbrats.shared.evaluation.inference import get_device, predict_probabilities
from fedbrats.shared.models import count_parameters, create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = get_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_phantom(Path(tmp), sites=1, cases_per_site=1, voxel_size=1.0, seed=0, progress=False)
        case = find_case(next(p for p in Path(root).iterdir() if p.is_dir()))
        image, _, _ = preprocess(load_case(case, with_labels=False))
    torch.manual_seed(0)
    model = create_model("resunet", width=args.width, depth=args.depth)
    patch = (args.patch,) * 3
    rows = []
    for tta in (False, True):
        start = time.perf_counter()
        predict_probabilities(model, torch.as_tensor(image), patch_size=patch, overlap=0.5, tta=tta, device=device)
        rows.append((tta, time.perf_counter() - start))
    base = rows[0][1]
    print(f"device {device}, model resunet width {args.width} depth {args.depth} "
          f"({count_parameters(model) / 1e6:.2f} M params), patch {args.patch}^3, overlap 0.5, "
          f"cropped volume {tuple(image.shape[1:])}")
    print("| TTA | seconds | x no TTA |\n|---|---:|---:|")
    for tta, seconds in rows:
        print(f"| {'8 flips' if tta else 'none'} | {seconds:.1f} | {seconds / base:.2f} |")


if __name__ == "__main__":
    main()
