"""What the HPC SuperLink answers about its fleet, a run's artifacts, and the Control API
routes that have no meaning on an HPC federation.

The stock ``flwr`` CLI asks a SuperLink for its SuperNodes (``flwr supernode ls``), its
federations (``flwr federation ls [--federation NAME]``) and a run's artifacts (``flwr
pull RUN``). On an HPC federation the nodes are the client slots of the sites in the
federation config, the one federation is the one ``flwr-hpc up`` serves, and a run's
artifacts are files in its run directory on this host; this module builds Flower's own
protobuf answers for them. Every other route gets Flower's JSON error with a message
saying why it does not apply (:func:`unsupported`).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from flwr.proto.federation_pb2 import Federation  # pylint: disable=E0611
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.supercore.error import ApiErrorCode

from flwr_hpc.config import FederationConfig

#: What ``flwr pull`` packs, relative to the run directory (directories recursively).
ARTIFACTS = ("status.json", "run.json", "job.json", "metrics.jsonl", "tasks.jsonl",
             "log.txt", "debug.txt", "global", "clients", "tensorboard", "mlruns", "wandb")
ARTIFACTS_ZIP = "artifacts.zip"


def node_status(federation: FederationConfig, site: str) -> str:
    """A site's nodes' status in Flower's words: ``online`` for local and simulated sites
    (this host runs them), ``registered`` for a Globus Compute site (configured; whether
    its endpoint is up is what ``flwr-hpc sites check`` tells).
    """
    return "online" if federation.site(site).compute["type"] in ("local", "sim") else (
        "registered")


def nodes_info(federation: FederationConfig, since: str) -> list[NodeInfo]:
    """One ``NodeInfo`` per client slot: owner = site, name = ``site/slot``."""
    return [NodeInfo(node_id=c.node_id, owner_name=c.site, status=node_status(federation, c.site),
                     name=f"{c.site}/{c.slot}", location=c.site, registered_at=since,
                     last_activated_at=since)
            for c in federation.clients()]


def describe(federation: FederationConfig) -> str:
    """One short line: sites, clients, and each site's compute type."""
    kinds = ", ".join(f"{s.name} {s.compute['type']}" for s in federation.sites)
    return (f"{len(federation.sites)} sites, {federation.num_clients} clients "
            f"({kinds})")


def federation_proto(federation: FederationConfig, since: str, *,
                     with_nodes: bool = False, runs: list | None = None) -> Federation:
    """The federation as Flower's ``Federation`` (nodes and runs for ``show``)."""
    return Federation(name=federation.name, description=describe(federation),
                      simulation=federation.is_simulated(),
                      nodes=nodes_info(federation, since) if with_nodes else None,
                      runs=runs or None, member_count=1)


def pack_artifacts(run_dir: Path) -> Path:
    """Zip the run's artifacts (metrics, task records, log, job config, saved adapters)
    into ``<run dir>/artifacts.zip``, readable by the owner only; return its path. Written
    to a temporary name and renamed, so a reader never sees half an archive.
    """
    out = run_dir / ARTIFACTS_ZIP
    tmp = run_dir / f".{ARTIFACTS_ZIP}.{os.getpid()}.tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in ARTIFACTS:
            path = run_dir / name
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else (
                [path] if path.is_file() else [])
            for f in files:
                zf.write(f, f"run-{run_dir.name}/{f.relative_to(run_dir)}")
    os.chmod(tmp, 0o600)
    os.replace(tmp, out)
    return out


_NODES = ("the nodes of an HPC federation are the client slots of its sites, from the "
          "federation config given to `flwr-hpc up` (conf/federation/*.yaml); change the "
          "config and restart the service: `flwr-hpc down && flwr-hpc up federation=…`")
_FEDERATIONS = ("an HPC SuperLink serves exactly one federation, the one `flwr-hpc up` "
                "was started with; it has no members, invitations or archive")
_APPS = ("flwr-hpc runs the FAB that each `flwr run` sends (sites allow-list it by "
         "sha256); there is no app registry")
_LOGIN = ("the HPC SuperLink has no accounts: it serves the Unix user who started it, "
          "on this host only (see the README, 'Reliability and security'); no login is "
          "needed")
_UNSUPPORTED: dict[str, tuple[int, str]] = {
    "register-node": (ApiErrorCode.FORBIDDEN_ACTION, _NODES),
    "unregister-node": (ApiErrorCode.FORBIDDEN_ACTION, _NODES),
    "create-federation": (ApiErrorCode.NO_FEDERATION_MANAGEMENT_SUPPORT, _FEDERATIONS),
    "archive-federation": (ApiErrorCode.NO_FEDERATION_MANAGEMENT_SUPPORT, _FEDERATIONS),
    "set-federation-icon": (ApiErrorCode.NO_FEDERATION_MANAGEMENT_SUPPORT, _FEDERATIONS),
    "add-node-to-federation": (ApiErrorCode.NO_FEDERATION_MANAGEMENT_SUPPORT, _NODES),
    "remove-node-from-federation": (ApiErrorCode.NO_FEDERATION_MANAGEMENT_SUPPORT, _NODES),
    "configure-simulation-federation": (
        ApiErrorCode.NO_FEDERATION_MANAGEMENT_SUPPORT,
        "the site simulator is a federation config (compute.type: sim, see "
        "conf/federation/sim_4facilities.yaml) given to `flwr-hpc up`"),
    "remove-account-from-federation": (ApiErrorCode.NO_FEDERATION_MANAGEMENT_SUPPORT,
                                       _FEDERATIONS),
    "create-invitation": (ApiErrorCode.NO_FEDERATION_MANAGEMENT_SUPPORT, _FEDERATIONS),
    "list-apps": (ApiErrorCode.FORBIDDEN_ACTION, _APPS),
    "add-app": (ApiErrorCode.FORBIDDEN_ACTION, _APPS),
    "remove-app": (ApiErrorCode.FORBIDDEN_ACTION, _APPS),
    "list-app-associations": (ApiErrorCode.FORBIDDEN_ACTION, _APPS),
    "get-login-details": (ApiErrorCode.NO_ACCOUNT_AUTH, _LOGIN),
    "get-auth-tokens": (ApiErrorCode.NO_ACCOUNT_AUTH, _LOGIN),
    "refresh-auth-tokens": (ApiErrorCode.NO_ACCOUNT_AUTH, _LOGIN),
}


def unsupported(route: str) -> tuple[int, str]:
    """Flower's error code and the message for a Control API route this service does not
    serve, saying why (``route`` as ``/v1/control/<name>``).
    """
    name = route.rsplit("/", 1)[-1]
    if name in _UNSUPPORTED:
        code, why = _UNSUPPORTED[name]
        return int(code), f"`{name}` is not supported on an HPC federation: {why}"
    if "invitation" in name or "federation" in name:
        return int(ApiErrorCode.NO_FEDERATION_MANAGEMENT_SUPPORT), (
            f"`{name}` is not supported on an HPC federation: {_FEDERATIONS}")
    return int(ApiErrorCode.FORBIDDEN_ACTION), (
        f"`{name}` is not supported by the flwr-hpc SuperLink: it serves runs (start, "
        "list, logs, stop, pull), nodes (list) and its federation (list, show); "
        "automations, run series and connectors are not part of flwr-hpc")
