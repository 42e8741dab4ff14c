"""flwr-hpc: run Flower apps across HPC facilities.

The public API is small: :class:`HPCGrid` (the Flower ``Grid`` that turns messages into
site tasks), :func:`load_federation` (validated federation config) and the errors in
:mod:`flwr_hpc.errors`.
"""

from flwr_hpc.config import FederationConfig, SiteConfig, load_federation
from flwr_hpc.errors import (
    ConfigError,
    FlwrHpcError,
    InvalidObjectIdError,
    PayloadIntegrityError,
    PayloadMissingError,
)

try:  # one version source: pyproject.toml, as installed
    from importlib.metadata import version as _version

    __version__ = _version("flwr-hpc")
except Exception:  # noqa: BLE001 - not installed (a source tree on sys.path)
    __version__ = "0+unknown"

__all__ = [
    "ConfigError",
    "FederationConfig",
    "FlwrHpcError",
    "InvalidObjectIdError",
    "PayloadIntegrityError",
    "PayloadMissingError",
    "SiteConfig",
    "load_federation",
    "HPCGrid",
]


def __getattr__(name: str):  # lazy: importing the grid pulls in flwr's server stack
    if name == "HPCGrid":
        from flwr_hpc.server.grid import HPCGrid

        return HPCGrid
    raise AttributeError(name)
