"""What every report figure shares: one way to write a PNG, one order of sites."""

from __future__ import annotations

import io
from pathlib import Path

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
