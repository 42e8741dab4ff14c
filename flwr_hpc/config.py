"""Federation configuration: Hydra composition plus strict validation.

A federation is a set of *sites*. Each site composes three independent choices, in the
spirit of Parsl's executor / provider / launcher split: a compute backend (how tasks run),
a payload store (how bytes reach the site) and a launcher (how ranks start). A new facility
is a YAML file under ``conf/federation/``, not new code.

Validation is strict on purpose: an unknown key, a wrong type or a missing field stops
start-up with a :class:`~flwr_hpc.errors.ConfigError` naming the file and the dotted key.

One cohesive thing (over 400 lines): the federation schema, its defaults and the checks
that name the bad key, kept together so the schema is read in one place.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flwr_hpc.errors import ConfigError

PACKAGE_CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

COMPUTE_TYPES = ("local", "globus", "sim")
LOCAL_ENGINES = ("process-pool", "thread-pool", "htex")
# filesystem == shared-fs: a directory the server and the site both see.
PAYLOAD_TYPES = ("filesystem", "shared-fs", "inline", "globus-transfer")
# How the ClientApp's ranks start at a site (see flwr_hpc.launch).
LAUNCHER_TYPES = ("none", "torchrun", "mpirun", "mpiexec", "srun", "parsl")

SUPERLINK_NODE_ID = 1  # Flower reserves 1 for the ServerApp side
MAX_CLIENTS_PER_SITE = 1024
# never a payload store, work directory or transfer directory: the system's own trees
SYSTEM_DIRS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/proc", "/sbin",
               "/sys", "/usr", "/var/lib", "/var/log", "/var/run", "/run")
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


# ----------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class Field:
    """One key of a config schema: its kind, whether it is required, its default, and
    the allowed ``choices`` / ``minimum`` / ``maximum``; a ``section`` field holds the
    schema of a nested mapping.
    """

    kind: str  # str, int, float, bool, scalar-map, any-map, str|null, str-list, section, sites
    required: bool = False
    default: Any = None
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    section: Mapping[str, Field] | None = None
    maximum: float | None = None


# sim: the site simulator's model of a site (flwr_hpc.server.sim); durations in virtual seconds
_SIM = {
    "queue_median_s": Field("float", default=60.0, minimum=0.0),  # lognormal batch-queue wait
    "queue_sigma": Field("float", default=0.5, minimum=0.0),      # its spread (log-space sd)
    "startup_s": Field("float", default=30.0, minimum=0.0),       # job start: load model, data
    "step_s": Field("float", default=1.0, minimum=0.0),           # one local optimizer step
    "eval_s": Field("float", default=10.0, minimum=0.0),          # one evaluate task
    "bandwidth_mb_s": Field("float", default=100.0, minimum=0.001),  # each way, MB/s
    "latency_s": Field("float", default=1.0, minimum=0.0),        # per transfer
    "failure_prob": Field("float", default=0.0, minimum=0.0),     # the job dies mid-run
    "seed": Field("int", default=0),
    # trace: replay a real batch-queue trace (flwr_hpc/compute/queue_trace.py) instead
    "queue_model": Field("str", default="lognormal", choices=("lognormal", "trace")),
    "trace": Field("str|null", default=None),       # a shipped trace, e.g. Mira-2018
    "replay": Field("str", default="sequential", choices=("sequential", "clock")),
    "start_hour": Field("float", default=9.0, minimum=0.0, maximum=24.0),  # of virtual t=0
    # facility limits and accounting
    "nodes": Field("int", default=1, minimum=1),          # per job: charged node-hours
    "walltime_s": Field("float", default=0.0, minimum=0.0),  # killed beyond it; 0: none
    "max_jobs": Field("int", default=0, minimum=0),       # queued+running per user; 0: any
}
_COMPUTE = {
    "type": Field("str", default="local", choices=COMPUTE_TYPES),
    # local: an endpoint engine in-process
    "engine": Field("str", default="process-pool", choices=LOCAL_ENGINES),
    "workers": Field("int", default=1, minimum=1),
    # before the ServerApp's first message: start the site's workers and load the
    # ClientApp, waiting at most this long (0: no warm-up; the first round pays for it)
    "warmup_s": Field("float", default=300.0, minimum=0.0),
    # globus: a Globus Compute endpoint
    "endpoint_id": Field("str|null", default=None),
    "resource_specification": Field("any-map", default={}),  # num_nodes, ranks_per_node, ...
    "user_endpoint_config": Field("any-map", default={}),    # templated multi-user endpoints
    "amqp_port": Field("int", default=443, minimum=1),
    # sim: virtual-time model of the site (the real ClientApps run on `workers` processes)
    "sim": Field("section", section=_SIM),
}
_PAYLOAD = {
    "type": Field("str", default="filesystem", choices=PAYLOAD_TYPES),
    # filesystem/shared-fs: the store directory; globus-transfer: the same directory as the
    # site's compute nodes see it; inline: where oversized replies go (a file reply)
    "path": Field("str|null", default=None),
    "max_task_bytes": Field("int", default=8_000_000, minimum=1024),  # inline
    "max_result_bytes": Field("int", default=6 * 2**20, minimum=1024),  # inline
    # globus-transfer (and inline file replies through Transfer): the site's collection
    "collection_id": Field("str|null", default=None),
    "collection_path": Field("str|null", default=None),  # the store dir as the collection names it
    # force every object to disk before it is announced (reads verify sha256 regardless)
    "fsync": Field("bool", default=False),
}
# The server's side of Globus Transfer: its collection, and the directory behind it.
_TRANSFER = {
    "collection_id": Field("str|null", default=None),
    "collection_path": Field("str|null", default=None),  # as the collection names the dir
    "path": Field("str|null", default=None),             # the same dir as the server sees it
    "deadline_s": Field("float", default=900.0, minimum=1),   # per transfer task
    "poll_s": Field("float", default=2.0, minimum=0.05),       # get_task polling interval
    "max_faults": Field("int", default=5, minimum=0),          # then the task is cancelled
    # requests/s to the Transfer API from this server, averaged (bursts of as many): half
    # of the ~20/s per user the service meters over 10 s
    "requests_per_s": Field("float", default=10.0, minimum=0.1),
    # objects up to this size ride inside the Compute task (no transfer task for them);
    # 0: everything goes by Transfer
    "inline_max_bytes": Field("int", default=262144, minimum=0),
    # move each new message's large objects to every site still busy with an earlier
    # message, before it is sent one: for strategies that send one global model to all
    # (FedAsync, FedBuff, FedCompass); never for personalised models (they would reach
    # sites they are not meant for)
    "prestage": Field("bool", default=False),
    "max_active_tasks": Field("int", default=3, minimum=1),   # Transfer's per-user limit
}
_LAUNCHER = {
    "type": Field("str", default="none", choices=LAUNCHER_TYPES),
    "ranks": Field("int", default=1, minimum=1),
    "args": Field("str-list", default=[]),     # extra launcher arguments
    "command": Field("str|null", default=None),  # full prefix override, "{ranks}" substituted
    "env": Field("scalar-map", default={}),    # extra environment for the ranks
    # keep the group alive between tasks (flwr_hpc/worker/launch.py); ends after idle_s
    "persistent": Field("bool", default=True),
    "idle_s": Field("float", default=600.0, minimum=1.0),
}
# fault injection (any compute type): each task sent to the site is lost with probability
# `dropout` before it runs, as a node lost to the scheduler would be (NODE_UNAVAILABLE);
# seeded per site, so a run's losses repeat
_FAULTS = {
    "dropout": Field("float", default=0.0, minimum=0.0, maximum=1.0),
    "seed": Field("int", default=0),
}
_SITE = {
    # every client is a Flower node with its own Context and store entries; thousands per
    # site are a typo, not an HPC federation (the exascale study ran 96 in all)
    "clients": Field("int", default=1, minimum=1, maximum=MAX_CLIENTS_PER_SITE),
    "compute": Field("section", section=_COMPUTE),
    "payload": Field("section", section=_PAYLOAD),
    "launcher": Field("section", section=_LAUNCHER),
    "node_config": Field("scalar-map", default={}),
    "faults": Field("section", section=_FAULTS),
}
_FEDERATION = {
    "name": Field("str", required=True),
    "description": Field("str", default=""),
    "workdir": Field("str|null", default=None),
    "transfer": Field("section", section=_TRANSFER),
    "sites": Field("sites", required=True),
}


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _check_value(f: Field, value: Any, key: str, file: str) -> Any:
    if f.kind == "section":
        return check_section(f.section or {}, value, key, file)
    if f.kind == "sites":
        if not isinstance(value, Mapping) or not value:
            raise ConfigError(file, key, "expected a non-empty mapping of site name -> site")
        out = {}
        for name, site in value.items():
            if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
                raise ConfigError(
                    file, f"{key}.{name}", "site names may use letters, digits, '-' and '_'"
                )
            out[name] = check_section(_SITE, site, f"{key}.{name}", file)
        return out
    if f.kind == "scalar-map":
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigError(file, key, f"expected a mapping, got {_describe(value)}")
        for k, v in value.items():
            if not isinstance(v, bool | int | float | str):
                raise ConfigError(
                    file, f"{key}.{k}", f"expected a bool, int, float or str, got {_describe(v)}"
                )
        return dict(value)
    if f.kind == "str|null":
        if value is not None and not isinstance(value, str):
            raise ConfigError(file, key, f"expected a string or null, got {_describe(value)}")
        return value
    if f.kind == "str":
        if not isinstance(value, str):
            raise ConfigError(file, key, f"expected a string, got {_describe(value)}")
        if f.choices and value not in f.choices:
            raise ConfigError(
                file, key, f"unsupported value {value!r}; choose one of {', '.join(f.choices)}"
            )
        return value
    if f.kind in ("int", "float"):
        ok = isinstance(value, int | float) if f.kind == "float" else isinstance(value, int)
        if isinstance(value, bool) or not ok:
            article = "an integer" if f.kind == "int" else "a number"
            raise ConfigError(file, key, f"expected {article}, got {_describe(value)}")
        if f.minimum is not None and value < f.minimum:
            raise ConfigError(file, key, f"must be >= {f.minimum}, got {value}")
        if f.maximum is not None and value > f.maximum:
            raise ConfigError(file, key, f"must be <= {f.maximum}, got {value}")
        return float(value) if f.kind == "float" else value
    if f.kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(file, key, f"expected true or false, got {_describe(value)}")
        return value
    if f.kind == "str-list":
        if not isinstance(value, Sequence) or isinstance(value, str) or not all(
                isinstance(v, str) for v in value):
            raise ConfigError(file, key, f"expected a list of strings, got {_describe(value)}")
        return list(value)
    if f.kind == "any-map":
        if not isinstance(value, Mapping):
            raise ConfigError(file, key, f"expected a mapping, got {_describe(value)}")
        return dict(value)
    raise AssertionError(f"unknown field kind {f.kind}")  # pragma: no cover


def check_section(schema: Mapping[str, Field], raw: Any, key: str, file: str) -> dict:
    """``raw`` (a mapping, or None for an empty one) checked against ``schema``, with
    defaults filled in for absent keys; raises :class:`ConfigError` naming ``file`` and
    the offending key under ``key`` for an unknown, missing or invalid one.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(file, key, f"expected a mapping, got {_describe(raw)}")
    unknown = sorted(set(raw) - set(schema))
    if unknown:
        prefix = f"{key}." if key else ""
        raise ConfigError(
            file,
            f"{prefix}{unknown[0]}",
            f"unknown key; allowed keys here are {', '.join(sorted(schema))}",
        )
    out: dict[str, Any] = {}
    for name, f in schema.items():
        sub = f"{key}.{name}" if key else name
        if name not in raw or (raw[name] is None and f.kind not in ("str|null", "section")):
            if f.required:
                raise ConfigError(file, sub, "missing required key")
            out[name] = (
                check_section(f.section or {}, {}, sub, file)
                if f.kind == "section"
                else (type(f.default)(f.default) if isinstance(f.default, dict | list)
                      else f.default)
            )
            continue
        out[name] = _check_value(f, raw[name], sub, file)
    return out


def _check_dir(value: str | None, key: str, file: str) -> None:
    """A directory flwr-hpc writes into must not be the system's own (a typo such as
    ``path: /usr`` would otherwise spray objects there, as root on a test box).
    """
    if not value:
        return
    path = os.path.normpath(os.path.expanduser(value))
    if path == "/" or any(path == d or path.startswith(d + "/") for d in SYSTEM_DIRS):
        raise ConfigError(file, key, f"{value!r} is a system directory; give a directory of "
                          "your own (a project or scratch directory)")


# ----------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ClientSlot:
    """One Flower node: slot ``slot`` of site ``site``."""

    node_id: int
    site: str
    slot: int
    partition_id: int
    node_config: dict[str, bool | int | float | str]


@dataclass(frozen=True)
class SiteConfig:
    """One site of a federation, as validated: its client slots and its ``compute``,
    ``payload`` and ``launcher`` sections.
    """

    name: str
    clients: int
    compute: dict[str, Any]
    payload: dict[str, Any]
    launcher: dict[str, Any]
    node_config: dict[str, Any] = field(default_factory=dict)
    faults: dict[str, Any] = field(default_factory=lambda: {"dropout": 0.0, "seed": 0})

    def nodes_per_job(self) -> int:
        """Compute nodes one task's job holds (what the allocation is charged for): the
        simulator's ``sim.nodes``, a Globus Compute site's
        ``resource_specification.num_nodes``, else 1.
        """
        if self.compute["type"] == "sim":
            return int(self.compute["sim"].get("nodes") or 1)
        spec = self.compute.get("resource_specification") or {}
        return int(spec.get("num_nodes") or 1)


@dataclass(frozen=True)
class FederationConfig:
    """A validated federation: its sites, ``transfer`` section and where it was read
    from (build one with :meth:`from_dict` or :func:`load_federation`).
    """

    name: str
    sites: tuple[SiteConfig, ...]
    description: str = ""
    workdir: str | None = None
    source: str = "<memory>"
    transfer: dict[str, Any] = field(default_factory=lambda: check_section(_TRANSFER, {}, "", ""))

    @property
    def num_clients(self) -> int:
        """Client slots (Flower nodes) over all sites."""
        return sum(s.clients for s in self.sites)

    def site(self, name: str) -> SiteConfig:
        """The site called ``name``; raises ``KeyError`` if there is none."""
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)

    def clients(self) -> list[ClientSlot]:
        """All Flower nodes, numbered across the federation as Flower's simulation does."""
        total = self.num_clients
        out: list[ClientSlot] = []
        pid = 0
        for s in self.sites:
            for slot in range(s.clients):
                cfg = dict(s.node_config)
                cfg["partition-id"] = pid
                cfg["num-partitions"] = total
                out.append(
                    ClientSlot(
                        node_id=node_id_for(self.name, s.name, slot),
                        site=s.name,
                        slot=slot,
                        partition_id=pid,
                        node_config=cfg,
                    )
                )
                pid += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON that :meth:`from_dict` reads back (sites keyed by name)."""
        return {
            "name": self.name,
            "description": self.description,
            "workdir": self.workdir,
            "transfer": dict(self.transfer),
            "source": self.source,
            "sites": {s.name: {k: v for k, v in asdict(s).items() if k != "name"}
                      for s in self.sites},
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "<memory>") -> FederationConfig:
        """Validate ``raw`` (the federation's keys; a ``source`` key in it wins over
        ``source``) and build the federation; raises :class:`ConfigError`.
        """
        raw = dict(raw)
        source = raw.pop("source", source) or source
        checked = check_section(_FEDERATION, raw, "", source)
        if not _PLAIN_NAME.match(checked["name"]) or ".." in checked["name"]:
            raise ConfigError(source, "name", f"{checked['name']!r} is not a plain name (it "
                              "names directories: letters, digits, '.', '_', '-'; no '..' "
                              "or '/')")
        _check_dir(checked["workdir"], "workdir", source)
        _check_dir(checked["transfer"]["path"], "transfer.path", source)
        for name, site in checked["sites"].items():
            _check_dir(site["payload"]["path"], f"sites.{name}.payload.path", source)
        sites = tuple(
            SiteConfig(name=name, **values) for name, values in checked["sites"].items()
        )
        _check_sim(sites, source)
        for s in sites:
            if s.compute["type"] == "globus":
                _check_globus_compute(s, source)
            _check_payload(s, checked["transfer"], source)
            if s.launcher["type"] == "none" and s.launcher["ranks"] != 1:
                raise ConfigError(source, f"sites.{s.name}.launcher.ranks",
                                  "more than one rank needs a launcher; launcher 'none' "
                                  "runs exactly 1 rank")
        return cls(
            name=checked["name"],
            sites=sites,
            description=checked["description"],
            workdir=checked["workdir"],
            source=source,
            transfer=checked["transfer"],
        )

    def is_simulated(self) -> bool:
        """All sites are simulated (``compute.type: sim``): the grid runs on virtual time."""
        return all(s.compute["type"] == "sim" for s in self.sites)

    def uses_transfer(self) -> bool:
        """Whether the server reaches any site's store through Globus Transfer."""
        return any(uses_transfer(s) for s in self.sites)


def _check_sim(sites: tuple[SiteConfig, ...], source: str) -> None:
    simulated = [s.name for s in sites if s.compute["type"] == "sim"]
    if simulated and len(simulated) != len(sites):
        other = next(s.name for s in sites if s.compute["type"] != "sim")
        raise ConfigError(source, f"sites.{other}.compute.type",
                          f"sites {simulated} are simulated (virtual time) and this one is "
                          "not; a federation is either all 'sim' or has no 'sim' site")
    for s in sites:
        if s.compute["type"] != "sim":
            continue
        if s.payload["type"] not in ("filesystem", "shared-fs"):
            raise ConfigError(source, f"sites.{s.name}.payload.type",
                              "a simulated site moves payloads through a local directory; "
                              f"use 'shared-fs', not {s.payload['type']!r}")
        p = s.compute["sim"]
        if p["failure_prob"] > 1:
            raise ConfigError(source, f"sites.{s.name}.compute.sim.failure_prob",
                              f"a probability must be in [0, 1], got {p['failure_prob']}")
        if p["queue_model"] == "trace" and not p["trace"]:
            raise ConfigError(source, f"sites.{s.name}.compute.sim.trace",
                              "queue_model 'trace' needs the name of a shipped trace "
                              "(e.g. Mira-2018)")
        if s.launcher["type"] != "none":
            raise ConfigError(source, f"sites.{s.name}.launcher.type",
                              "simulated sites run each ClientApp as one process; "
                              "use launcher 'none'")


def _check_globus_compute(site: SiteConfig, source: str) -> None:
    key = f"sites.{site.name}.compute"
    _check_uuid(site.compute.get("endpoint_id"), source, f"{key}.endpoint_id",
                "a Globus Compute endpoint")
    spec = site.compute["resource_specification"]
    if spec:
        missing = [k for k in ("num_nodes", "ranks_per_node") if k not in spec]
        if missing:
            raise ConfigError(source, f"{key}.resource_specification.{missing[0]}",
                              "set num_nodes and ranks_per_node explicitly (an MPI endpoint "
                              "otherwise falls back to its own defaults)")
    if site.compute["amqp_port"] not in (443, 5671, 5672):
        raise ConfigError(source, f"{key}.amqp_port", "the service accepts 443, 5671 or 5672")


def uses_transfer(site: SiteConfig) -> bool:
    """Whether the server reaches this site's store through Globus Transfer."""
    p = site.payload
    return p["type"] == "globus-transfer" or (p["type"] == "inline"
                                              and bool(p.get("collection_id")))


def _check_uuid(value: Any, source: str, key: str, what: str) -> None:
    import uuid

    try:
        uuid.UUID(str(value))
    except ValueError:
        raise ConfigError(source, key, f"{what} UUID is required, got {value!r}") from None


def _check_payload(site: SiteConfig, transfer: dict[str, Any], source: str) -> None:
    key = f"sites.{site.name}.payload"
    p = site.payload
    if p["type"] == "globus-transfer":
        _check_uuid(p["collection_id"], source, f"{key}.collection_id",
                    "the site's Globus collection")
        for name, what in (("collection_path", "the store directory as the site's collection "
                            "names it (e.g. /eagle/PROJ/flwr-hpc/store)"),
                           ("path", "the same directory as the site's compute nodes see it")):
            if not p[name]:
                raise ConfigError(source, f"{key}.{name}", f"missing: {what}")
    elif p["collection_id"] is not None or p["collection_path"] is not None:
        if p["type"] != "inline":
            raise ConfigError(source, f"{key}.collection_id",
                              f"only globus-transfer and inline stores use a collection, "
                              f"this site's store is {p['type']!r}")
        _check_uuid(p["collection_id"], source, f"{key}.collection_id",
                    "the site's Globus collection")
        if not (p["collection_path"] and p["path"]):
            raise ConfigError(source, f"{key}.path", "file replies through Transfer need "
                              "both path (site view) and collection_path (collection view)")
    if uses_transfer(site):
        _check_uuid(transfer["collection_id"], source, "transfer.collection_id",
                    f"site '{site.name}' moves payloads with Globus Transfer: the server's "
                    "collection")
        for name in ("collection_path", "path"):
            if not transfer[name]:
                raise ConfigError(source, f"transfer.{name}",
                                  f"site '{site.name}' moves payloads with Globus Transfer: "
                                  "set the server's staging directory as its collection "
                                  "names it (collection_path) and as this machine sees it "
                                  "(path)")


def node_id_for(federation: str, site: str, slot: int) -> int:
    """Stable, random-looking 63-bit node id for (federation, site, slot); never 0 or 1."""
    digest = hashlib.sha256(f"{federation}\0{site}\0{slot}".encode()).digest()
    value = int.from_bytes(digest[:8], "big") & (2**63 - 1)
    return value if value > SUPERLINK_NODE_ID else value + 2


# ----------------------------------------------------------------------------- hydra


def _search_dirs(config_dirs: Sequence[str | Path]) -> list[Path]:
    return [Path(d).resolve() for d in config_dirs] + [PACKAGE_CONF_DIR]


def _group_options(group: str, config_dirs: Sequence[str | Path]) -> list[str]:
    names: set[str] = set()
    for d in _search_dirs(config_dirs):
        names.update(p.stem for p in (d / group).glob("*.yaml"))
    return sorted(names)


def compose(overrides: Sequence[str] = (), config_dirs: Sequence[str | Path] = ()) -> dict:
    """Compose ``conf/config.yaml`` with Hydra and return it as a plain dict.

    ``config_dirs`` are searched before the package's own ``conf/`` so a user can add
    ``federation/<name>.yaml`` files of their own.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides)
    given = " ".join(overrides)
    # A user/app conf dir with its own config.yaml is the primary one (its defaults win).
    primary = next((Path(d).resolve() for d in config_dirs
                    if (Path(d) / "config.yaml").exists()), PACKAGE_CONF_DIR)
    extra = [f"file://{d}" for d in _search_dirs(config_dirs) if d != primary]
    if extra:
        overrides.append(f"hydra.searchpath=[{','.join(extra)}]")
    for _ in range(len(overrides) + 1):
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=str(primary), version_base=None):
                cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
            break
        except (HydraException, OmegaConfBaseException) as err:
            text = hydra_message(str(err))
            culprit = next((o for o in overrides if f"'{_override_key(o)}'" in text
                            or f"'{_override_key(o)}/" in text), None)
            if (culprit is not None and text.startswith("Could not override")
                    and culprit[0] not in "+~"):
                # a key the YAML files leave to the schema's default: set it (the schema
                # check after composition refuses it if there is no such key)
                overrides[overrides.index(culprit)] = "+" + culprit
                continue
            hint = ""
            if "Could not find 'federation/" in text:  # ours: the user's dirs and the package's
                text = re.sub(r" Available options in 'federation':[^.]*\.", "", text)
                names = ", ".join(_group_options("federation", config_dirs))
                hint = f" (available federations: {names})"
            raise ConfigError("command line", culprit or given, f"{text}{hint}") from None
        finally:
            GlobalHydra.instance().clear()
    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    try:
        data = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        key = str(getattr(err, "full_key", ""))
        raise ConfigError("config", key, str(err).splitlines()[0]) from None
    assert isinstance(data, dict)
    data["_choices"] = {k: v for k, v in choices.items() if not k.startswith("hydra")}
    return data


def _override_key(item: str) -> str:
    """``+train.foo=1`` -> ``train.foo``; ``model=x`` -> ``model``."""
    return item.lstrip("+~").partition("=")[0].strip()


def hydra_message(text: str) -> str:
    """Hydra's whole error message on one line -- its lists of available options and its
    hints kept, its config search path (an internal detail) left out.
    """
    text = text.split("\nConfig search path:")[0]
    lines = [ln.strip() for ln in text.splitlines()]
    out: list[str] = []
    for line in lines:
        if not line:
            continue
        if out and out[-1].endswith(":"):
            out[-1] += " " + line
        elif out and ":" in out[-1] and not line.endswith(":") and " " not in line:
            out[-1] += ", " + line  # the next option of a list
        else:
            out.append(line)
    return " ".join(ln if ln[-1] in ".:" else ln + "." for ln in out)


def _federation_file(choice: str, config_dirs: Sequence[str | Path]) -> str:
    for d in _search_dirs(config_dirs):
        p = d / "federation" / f"{choice}.yaml"
        if p.exists():
            try:
                return str(p.relative_to(Path.cwd()))
            except ValueError:
                return str(p)
    return f"federation/{choice}.yaml"


def load_federation(
    overrides: Sequence[str] = (), config_dirs: Sequence[str | Path] = ()
) -> FederationConfig:
    """Compose the config and validate its ``federation`` node.

    Raises :class:`ConfigError` naming the file and key of the first problem found.
    Only federation keys are taken here: anything else (e.g. ``dp=opacus``) would be
    composed and then silently ignored, so it is refused, saying where it belongs.
    """
    for item in overrides:
        key = item.lstrip("+~").partition("=")[0].strip()
        if key != "federation" and not key.startswith(("federation.", "hydra.")):
            raise ConfigError(
                "command line", item,
                f"'{key}' is not a federation key: these overrides compose the federation "
                "(federation=<name>, federation.sites.<site>.<key>=...). Settings of the "
                "app's job go in its run config, e.g. "
                f"-c 'overrides=\"{item}\"' for this project's LoRA job")
    data = compose(overrides, config_dirs)
    choice = data["_choices"].get("federation") or "?"
    source = _federation_file(choice, config_dirs)
    raw = data.get("federation")
    if raw is None:
        raise ConfigError(source, "federation", "no federation selected (use federation=<name>)")
    if not isinstance(raw, dict):
        raise ConfigError(source, "federation", "expected a mapping")
    raw = dict(raw)
    raw.pop("source", None)
    # Keys are reported relative to the federation node, e.g. ``sites.alpha.clients``.
    return FederationConfig.from_dict(raw, source=source)


def dump_federation(fed: FederationConfig, path: Path) -> None:
    """Write ``fed`` to ``path`` as JSON (read back by :func:`read_federation`)."""
    path.write_text(json.dumps(fed.to_dict(), indent=2, sort_keys=True))


def read_federation(path: Path) -> FederationConfig:
    """The federation :func:`dump_federation` wrote to ``path`` (validated again)."""
    raw = json.loads(path.read_text())
    return FederationConfig.from_dict(raw, source=raw.get("source") or str(path))
