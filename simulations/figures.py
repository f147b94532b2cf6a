"""What every report figure shares: one way to write a PNG, one order of sites."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedbrats.shared.atomic import atomic_write  # noqa: E402


def save_figure(fig, path: Path) -> Path:
    """Write a report figure as PNG and free it (reports draw many figures in one process)."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
    return atomic_write(path, buffer.getvalue())


def site_order(name: str) -> tuple:
    """Sort key: numbered sites in numeric order (2 before 10), named ones after."""
    return (0, int(name)) if str(name).isdigit() else (1, str(name))


def is_simulated(history: list[dict[str, Any]]) -> bool:
    """A deployed run records wall time only (no FeTS timing model): its time axis is the wall clock."""
    return bool(history) and all("simulated_seconds" in r for r in history)


def elapsed_hours(history: list[dict[str, Any]]) -> dict[int, float]:
    """Round -> hours since the run began: simulated time, or for a deployed run the summed wall time."""
    if is_simulated(history):
        return {r["round"]: r["simulated_seconds"] / 3600 for r in history}
    total, hours = 0.0, {}
    for r in history:
        total += r.get("wall_seconds", 0.0)
        hours[r["round"]] = total / 3600
    return hours
