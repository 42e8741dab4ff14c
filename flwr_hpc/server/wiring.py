"""Site wiring: the grid for a federation.

:func:`make_grid` is how the runner (and anyone driving a federation) gets its grid: an
:class:`~flwr_hpc.server.grid.HPCGrid` over real or local sites, or, when every site is
simulated, the site simulator's :class:`~flwr_hpc.server.sim.VirtualTimeGrid` (virtual time). It
sits above both, so neither imports the other's module to choose.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr_hpc.config import FederationConfig
from flwr_hpc.server.grid import HPCGrid
from flwr_hpc.server.sim import VirtualTimeGrid


def make_grid(federation: FederationConfig, fab_bytes: bytes, *, run_dir: Path,
              flwr_home: Path, **kwargs: Any) -> HPCGrid:
    """The grid for ``federation``: backends and stores built for every site, ready."""
    cls = VirtualTimeGrid if federation.is_simulated() else HPCGrid
    return cls.from_federation(federation, fab_bytes, run_dir=run_dir, flwr_home=flwr_home,
                               **kwargs)
