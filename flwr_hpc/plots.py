"""The project's plotting module: matplotlib set up once, figures saved reproducibly.

Every figure flwr-hpc draws (``flwr-hpc report``, ``flwr-hpc bench schedulers``, the
README's benchmark figures) goes through :func:`subplots` and :func:`save`: the Agg
backend, a fixed SVG hash salt, and no dates or software versions in the files, so the
same numbers give byte-identical PNG and SVG files (results under version control only
change when the numbers do). Imports nothing of flwr-hpc but its errors; matplotlib is
imported on first use (the ``track`` extra installs it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr_hpc.errors import FlwrHpcError


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend with reproducible SVG ids."""
    try:
        import matplotlib
    except ImportError:
        raise FlwrHpcError("plots need matplotlib (pip install matplotlib, or the "
                           "flwr-hpc[track] extra)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matplotlib.rcParams["svg.hashsalt"] = "flwr-hpc"
    return plt


def subplots(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """``plt.subplots`` (same arguments) after :func:`pyplot`'s set-up."""
    return pyplot().subplots(*args, **kwargs)


def save(fig: Any, out: Path, name: str, *, formats: tuple[str, ...] = ("png", "svg")
         ) -> list[Path]:
    """Write ``fig`` as ``out/name.<format>`` with fixed metadata; closes the figure."""
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    paths = []
    for fmt in formats:
        path = out / f"{name}.{fmt}"
        if fmt == "png":
            fig.savefig(path, dpi=100, metadata={"Software": None})
        else:
            fig.savefig(path, metadata={"Date": None, "Creator": None})
        paths.append(path)
    pyplot().close(fig)
    return paths
