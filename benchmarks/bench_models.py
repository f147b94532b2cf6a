"""Training throughput of the default model against MONAI's BasicUNet and SegResNet.

Same process, same patch, batch, optimiser (Adam) and loss (`region_loss`), models of similar
parameter count; one forward + backward + optimiser step is a "step". Prints a Markdown table.

    python benchmarks/bench_models.py                 # CPU preset: 64^3, batch 2, ~5 M params each
    python benchmarks/bench_models.py --preset full --device cuda   # 128^3, ~20 M params each
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from monai.networks.nets import BasicUNet, SegResNet  # noqa: E402
from rich.progress import Progress  # noqa: E402

from fedbrats.shared.constants import MODALITIES, REGIONS  # noqa: E402
from fedbrats.shared.models import count_parameters, create_model  # noqa: E402
from fedbrats.shared.models.losses import region_loss  # noqa: E402

IN, OUT = len(MODALITIES), len(REGIONS)

#: name -> (patch edge, batch, model configs). Widths chosen so the three have similar sizes.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "patch": 64,
        "batch": 2,
        "resunet": {"width": 16, "depth": 5},
        "basicunet": {"features": (32, 32, 64, 128, 256, 32)},
        "segresnet": {"init_filters": 16},
    },
    "full": {
        "patch": 128,
        "batch": 2,
        "resunet": {},  # the defaults: width 32, depth 5
        "basicunet": {"features": (64, 64, 128, 256, 512, 64)},
        "segresnet": {"init_filters": 32},
    },
}


def build_models(preset: dict[str, Any]) -> dict[str, torch.nn.Module]:
    """The three contenders, each labelled with its configuration."""
    res = preset["resunet"]
    return {
        f"resunet {res or 'defaults'}": create_model("resunet", **res),
        f"MONAI BasicUNet features={preset['basicunet']['features']}": BasicUNet(
            3, IN, OUT, features=preset["basicunet"]["features"]
        ),
        f"MONAI SegResNet init_filters={preset['segresnet']['init_filters']}": SegResNet(
            3, preset["segresnet"]["init_filters"], IN, OUT
        ),
    }


class Trainer:
    """One model with its Adam optimiser: `step()` is one timed training step."""

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool):
        self.model, self.x, self.y, self.amp = model.to(x.device).train(), x, y, amp
        self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        self.times: list[float] = []

    def step(self) -> float:
        sync = torch.cuda.synchronize if self.x.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.x.device.type, enabled=self.amp):
            loss = region_loss(self.model(self.x), self.y)
        loss.backward()
        self.optimizer.step()
        sync()
        return time.perf_counter() - start


def run_benchmark(
    preset: str = "cpu",
    *,
    steps: int = 3,
    warmup: int = 1,
    device: str = "cpu",
    patch: int | None = None,
    batch: int | None = None,
    amp: bool = False,
) -> list[dict[str, Any]]:
    """One row per model: name, parameters, median seconds per step, voxels per second.

    Models take turns step by step (round robin), so a burst of load from other processes hits
    all of them alike; the median over the timed steps is reported.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    config = PRESETS[preset]
    patch, batch = patch or config["patch"], batch or config["batch"]
    dev = torch.device(device)
    torch.manual_seed(0)
    x = torch.randn(batch, IN, patch, patch, patch, device=dev)
    y = (torch.rand(batch, OUT, patch, patch, patch, device=dev) < 0.1).float()
    trainers = {name: Trainer(model, x, y, amp) for name, model in build_models(config).items()}
    with Progress(transient=True) as progress:
        task = progress.add_task(f"training steps at {patch}^3, batch {batch}", total=(warmup + steps) * 3)
        for round_ in range(warmup + steps):
            for trainer in trainers.values():
                seconds = trainer.step()
                if round_ >= warmup:
                    trainer.times.append(seconds)
                progress.advance(task)
    rows = []
    for name, trainer in trainers.items():
        seconds = statistics.median(trainer.times)
        rows.append(
            {
                "model": name,
                "params": count_parameters(trainer.model),
                "s_per_step": seconds,
                "voxels_per_s": batch * patch**3 / seconds,
            }
        )
    if dev.type == "cuda":  # one process, so only the peak over all three
        rows[0]["note"] = f"peak GPU memory of the run {torch.cuda.max_memory_allocated(dev) / 2**30:.1f} GiB"
    return rows


def format_table(rows: list[dict[str, Any]], *, patch: int, batch: int, device: str) -> str:
    """Markdown table of `run_benchmark` rows."""
    header = "| model | params (M) | s / step (median) | voxels / s |"
    lines = [
        f"Training throughput (forward + backward + Adam step), patch {patch}^3, batch {batch}, {device}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        "",
        header,
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        line = (
            f"| {r['model']} | {r['params'] / 1e6:.2f} | {r['s_per_step']:.3f} | {r['voxels_per_s']:,.0f} |"
        )
        lines.append(line)
    lines += [f"\n{r['note']}" for r in rows if "note" in r]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--patch", type=int, help="patch edge (overrides the preset)")
    parser.add_argument("--batch", type=int, help="batch size (overrides the preset)")
    parser.add_argument("--amp", action="store_true", help="automatic mixed precision (CUDA)")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (1 gives stable numbers on a shared machine)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run_benchmark(
        args.preset,
        steps=args.steps,
        warmup=args.warmup,
        device=args.device,
        patch=args.patch,
        batch=args.batch,
        amp=args.amp,
    )
    config = PRESETS[args.preset]
    print(
        format_table(
            rows, patch=args.patch or config["patch"], batch=args.batch or config["batch"], device=args.device
        )
    )


if __name__ == "__main__":
    main()
