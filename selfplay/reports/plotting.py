"""The one place that draws: matplotlib on the Agg backend (no display), and figures saved the way every output
is, through a temp file and a rename, so a report never links a half-written image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfplay.rundir import atomic


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> str:
    """Lay out, write atomically, close; returns the file's name (what a report links)."""
    fig.tight_layout()
    with atomic.replacing(path) as tmp:
        fig.savefig(tmp, format="png")
    pyplot().close(fig)
    return path.name
