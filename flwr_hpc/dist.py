"""Rank discovery for ClientApps launched as a data-parallel group at a site.

The site worker starts every rank with the site's launcher (``torchrun``, ``mpiexec`` /
``mpirun``, ``srun`` or ``$PARSL_MPI_PREFIX``). Each launcher names ranks differently;
:func:`rank_env` maps them all onto the ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` /
``MASTER_ADDR`` / ``MASTER_PORT`` variables that ``torch.distributed``'s ``env://``
rendezvous reads, and :func:`init` starts the process group (gloo on CPU, nccl on GPU).

This module imports nothing heavy; ``torch`` is imported only inside :func:`init`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

# launcher family -> (rank, world size, local rank) variables, most specific first
_RANK_VARS = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("mpich/pals", "PMI_RANK", "PMI_SIZE", "PMI_LOCAL_RANK"),
    ("pals", "PALS_RANKID", "PALS_SIZE", "PALS_LOCAL_RANKID"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)
ENV_MASTER_PORT = "FLWR_HPC_MASTER_PORT"  # set by the site worker for each launch


@dataclass(frozen=True)
class DistInfo:
    """A process's place in its launched group: its rank, the group's size, its rank on
    its node, and the launcher family that started it.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"

    @property
    def is_primary(self) -> bool:
        """Whether this is rank 0 (the rank that writes the reply)."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether the group has more than one rank."""
        return self.world_size > 1


def rank_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``torch.distributed`` env:// variables implied by the launcher's variables."""
    env = os.environ if env is None else env
    for launcher, rank, size, local in _RANK_VARS:
        if rank in env and size in env:
            out = {
                "RANK": env[rank],
                "WORLD_SIZE": env[size],
                "LOCAL_RANK": env.get(local, "0"),
                "FLWR_HPC_LAUNCHER": launcher,
            }
            out["MASTER_ADDR"] = env.get("MASTER_ADDR", "127.0.0.1")
            out["MASTER_PORT"] = env.get("MASTER_PORT") or env.get(ENV_MASTER_PORT, "29533")
            return out
    return {}


def info(env: Mapping[str, str] | None = None) -> DistInfo:
    """The calling process's place in its group (rank 0 of 1 when not launched as a
    group).
    """
    mapped = rank_env(env)
    if not mapped:
        return DistInfo()
    return DistInfo(int(mapped["RANK"]), int(mapped["WORLD_SIZE"]),
                    int(mapped["LOCAL_RANK"]), mapped["FLWR_HPC_LAUNCHER"])


def init(backend: str | None = None) -> DistInfo:
    """Join the process group of this launch (idempotent); a no-op for a single rank."""
    me = info()
    if not me.enabled:
        return me
    import torch
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        return me
    for key, value in rank_env().items():
        os.environ.setdefault(key, value)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(me.local_rank % torch.cuda.device_count())
    tdist.init_process_group(backend=backend)
    return me

