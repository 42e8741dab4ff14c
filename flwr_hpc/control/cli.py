"""The ``flwr-hpc`` command line.

    flwr-hpc up [--port P] [--config-dir DIR] [OVERRIDES...]   start the HPC SuperLink
    flwr-hpc down                                               stop it (and its runs)
    flwr-hpc status                                             sites and runs
    flwr-hpc run APP [-c KEY=VALUE ...] [OVERRIDES...]          one run, in the foreground
    flwr-hpc resume RUN_ID [--foreground]                       continue an interrupted run
    flwr-hpc report RUN_ID... [--out DIR]                       plots and a summary
    flwr-hpc bench transport --clients N --size-mb S [--rounds R] [--json]
                                                                flwr-hpc vs Flower vs floor
    flwr-hpc bench schedulers [--federation F] [--seeds 0,1,2] [--jobs 2] [--out DIR]
                                          FedAvg vs scheduler-aware strategies, virtual time

OVERRIDES are Hydra overrides, e.g. ``federation=local federation.sites.beta.clients=3``.

One cohesive thing (over 400 lines): the typer commands (help on every argument, shell
completion via --install-completion / --show-completion) and one small handler per
sub-command.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import psutil
import typer

from flwr_hpc._proc import pid_alive
from flwr_hpc.errors import ConfigError, FlwrHpcError
from flwr_hpc.locks import Holder, holder_state, node_name

DEFAULT_PORT = 39300
CONNECTION_NAME = "hpc"


def _home() -> Path:
    from flwr_hpc.server.runs import flwr_home

    return flwr_home()


def _state_path(home: Path) -> Path:
    return home / "hpc" / "superlink.json"


def _read_state(home: Path) -> dict[str, Any] | None:
    try:
        return json.loads(_state_path(home).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _service_state(state: dict[str, Any] | None) -> str:
    """The recorded service's process: ``none`` (no record), ``alive``, ``dead`` or
    ``elsewhere`` (recorded by another login node sharing ``$HOME``: its pid means
    nothing here, so nothing here signals, replaces or talks to it).
    """
    if not state:
        return "none"
    return holder_state(Holder.of(state))


def _elsewhere(state: dict[str, Any], verb: str) -> str:
    return (f"the HPC SuperLink of this FLWR_HOME runs on login node {state.get('node')} "
            f"(pid {state['pid']}); {verb} from that node (`ssh {state.get('node')}`), or, "
            "if that node is gone for good, `flwr-hpc down --forget` drops its record "
            "(it signals nothing)")


# The service is on loopback: never through HTTP(S)_PROXY (a proxy would time out, or
# connect as another user and be refused)
_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _health(host: str, port: int, timeout: float = 1.0) -> dict | None:
    """The /health answer of whatever HPC SuperLink listens there, or None."""
    try:
        with _LOOPBACK.open(f"http://{host}:{port}/health", timeout=timeout) as res:
            return json.loads(res.read() or b"{}") if res.status == 200 else None
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _healthy(host: str, port: int, timeout: float = 1.0) -> bool:
    return _health(host, port, timeout) is not None


def connection_text(home: Path, address: str, name: str = CONNECTION_NAME) -> str:
    """``$FLWR_HOME/config.toml`` with ``[superlink.<name>]`` added or replaced; a file
    that is not UTF-8 TOML is a :class:`ConfigError` naming it (checked before `up` starts
    anything).
    """
    import tomllib

    from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML

    path = home / "config.toml"
    try:
        text = path.read_text(encoding="utf-8") if path.exists() else DEFAULT_FLOWER_CONFIG_TOML
        tomllib.loads(text)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(str(path), "-", f"not a UTF-8 TOML file ({err}); fix or move it, "
                          "then run `flwr-hpc up` again") from None
    header = f"[superlink.{name}]"
    lines = text.splitlines()
    out: list[str] = []
    skipping = False
    for line in lines:
        stripped = line.strip()
        if stripped == header:
            skipping = True
            continue
        if skipping and stripped.startswith("["):
            skipping = False
        if not skipping:
            out.append(line)
    while out and not out[-1].strip():
        out.pop()
    out += ["", header, f'address = "{address}"', "insecure = true", ""]
    return "\n".join(out)


def _load_federation(overrides: list[str], config_dirs: list[str]):
    from flwr_hpc.config import load_federation

    return load_federation(overrides, config_dirs)


# ----------------------------------------------------------------------------- commands


def cmd_up(args: argparse.Namespace) -> int:
    """``flwr-hpc up``: start the HPC SuperLink service in the background (loopback only)
    for the federation, wait until it answers, and write its connection to Flower's
    ``config.toml``; a no-op if it already runs.
    """
    from flwr_hpc.config import dump_federation

    home = _home()
    host = args.host
    if not ipaddress.ip_address(host).is_loopback:
        print(f"error: refusing to bind {host}: the HPC SuperLink serves loopback only; "
              "binding another address needs TLS and a token, which this version does not "
              "support yet. Use an SSH tunnel to reach it from elsewhere.", file=sys.stderr)
        return 2
    federation = _load_federation(args.overrides, args.config_dir)
    state = _read_state(home)
    if _service_state(state) == "elsewhere":
        print(f"error: {_elsewhere(state, 'use it or stop it')}", file=sys.stderr)
        return 1
    if (_service_state(state) == "alive" and state
            and _healthy(state["host"], state["port"])):
        print(f"HPC SuperLink already running at {state['host']}:{state['port']} "
              f"(federation '{state['federation']}', pid {state['pid']}).")
        if state["federation"] != federation.name:
            print(f"note: it serves federation '{state['federation']}', not "
                  f"'{federation.name}'; run `flwr-hpc down` first to switch.")
        return 0
    other = _health(host, args.port, timeout=0.5)
    if other is not None:
        print(f"error: port {args.port} is already served by another HPC SuperLink "
              f"(FLWR_HOME {other.get('home', '?')}, pid {other.get('pid', '?')}); stop it "
              f"with FLWR_HOME={other.get('home', '<its home>')} flwr-hpc down, or use "
              "--port", file=sys.stderr)
        return 1
    # an unreadable config.toml stops `up` here, before anything is started
    connection = connection_text(home, f"{host}:{args.port}")
    hpc_dir = home / "hpc"
    hpc_dir.mkdir(parents=True, exist_ok=True)
    fed_json = hpc_dir / "federation.json"
    dump_federation(federation, fed_json)
    log_path = hpc_dir / "superlink.log"
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flwr_hpc.control.service", "--host", host, "--port",
             str(args.port), "--federation-json", str(fed_json), "--home", str(home)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env={**os.environ, "FLWR_HOME": str(home)},
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            print("error: the HPC SuperLink exited during start-up:\n  " + "\n  ".join(tail),
                  file=sys.stderr)
            return 1
        answer = _health(host, args.port, timeout=0.5)
        if answer is not None and answer.get("pid") == proc.pid:
            break
        time.sleep(0.2)
    else:
        proc.terminate()
        print(f"error: the HPC SuperLink did not answer on {host}:{args.port} within 30 s; "
              f"see {log_path}", file=sys.stderr)
        return 1
    me = Holder(node_name(), proc.pid, psutil.Process(proc.pid).create_time())
    _state_path(home).write_text(json.dumps({
        "pid": proc.pid, "host": host, "port": args.port, "federation": federation.name,
        "node": me.node, "started": me.started,
    }))
    cfg = home / "config.toml"
    try:
        cfg.write_text(connection)
    except OSError as err:  # do not leave a service running that the CLI cannot find
        proc.terminate()
        print(f"error: could not write {cfg}: {err}; the HPC SuperLink was stopped",
              file=sys.stderr)
        return 1
    print(f"HPC SuperLink up at {host}:{args.port} for federation '{federation.name}' "
          f"({len(federation.sites)} sites, {federation.num_clients} clients).")
    print(f"Wrote [superlink.{CONNECTION_NAME}] to {cfg}. Next: flwr run <app> "
          f"{CONNECTION_NAME} --stream")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    """``flwr-hpc down``: stop the HPC SuperLink (SIGTERM, then SIGKILL of its process
    group after 40 s).
    """
    home = _home()
    state = _read_state(home)
    where = _service_state(state)
    if where == "elsewhere" and state:
        if getattr(args, "forget", False):
            _state_path(home).unlink(missing_ok=True)
            print(f"Forgot the HPC SuperLink record of node {state.get('node')} (pid "
                  f"{state['pid']}); nothing was signalled.")
            return 0
        print(f"error: {_elsewhere(state, 'stop it')}", file=sys.stderr)
        return 1
    if where != "alive" or not state:
        print("HPC SuperLink is not running.")
        _state_path(home).unlink(missing_ok=True)
        return 0
    pid = int(state["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.2)
        try:  # reap if it is our child (tests start it from this process)
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    if pid_alive(pid):
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    _state_path(home).unlink(missing_ok=True)
    print(f"HPC SuperLink (pid {pid}) stopped.")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """``flwr-hpc status``: whether the HPC SuperLink is up, its federation's sites, and
    the last 20 runs.
    """
    from rich.console import Console
    from rich.table import Table

    from flwr_hpc.config import read_federation
    from flwr_hpc.server.runs import read_status, runs_dir

    home = _home()
    console = Console()
    state = _read_state(home)
    where = _service_state(state)
    up = bool(state and where == "alive" and _healthy(state["host"], state["port"]))
    if where == "elsewhere" and state:
        console.print(f"HPC SuperLink: on login node {state.get('node')} (pid "
                      f"{state['pid']}); this node ({node_name()}) cannot see it")
    elif up and state:
        console.print(f"HPC SuperLink: [green]up[/green] at {state['host']}:{state['port']} "
                      f"(pid {state['pid']}, federation '{state['federation']}')")
    else:
        console.print("HPC SuperLink: [yellow]down[/yellow] (start it with `flwr-hpc up`)")
    fed_json = home / "hpc" / "federation.json"
    if fed_json.exists():
        fed = read_federation(fed_json)
        table = Table(title=f"Sites of federation '{fed.name}'")
        for col in ("site", "clients", "compute", "payload", "launcher", "partition ids"):
            table.add_column(col)
        for s in fed.sites:
            pids = [str(c.partition_id) for c in fed.clients() if c.site == s.name]
            table.add_row(s.name, str(s.clients), f"{s.compute['type']}/{s.compute['engine']}",
                          s.payload["type"], f"{s.launcher['type']} x{s.launcher['ranks']}",
                          ",".join(pids))
        console.print(table)
    rdir = runs_dir(home)
    runs = [read_status(d) for d in sorted(rdir.iterdir())] if rdir.exists() else []
    runs = sorted((r for r in runs if r), key=lambda r: r.get("pending_at", ""))
    table = Table(title="Runs")
    table.add_column("run id", no_wrap=True, min_width=19)  # whole, to paste into flwr log
    for col in ("app", "status", "started", "finished"):
        table.add_column(col, overflow="fold")
    for r in runs[-20:]:
        st = r.get("status", "?") + (f":{r['sub_status']}" if r.get("sub_status") else "")
        table.add_row(str(r.get("run_id")), f"{r.get('fab_id')}=={r.get('fab_version')}", st,
                      r.get("running_at") or r.get("pending_at", ""), r.get("finished_at", ""))
    console.print(table)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """``flwr-hpc run APP``: build the app's FAB, prepare a run and execute it in the
    foreground.
    """
    from flwr_hpc.fab import build_fab
    from flwr_hpc.server.runs import prepare_run

    app = Path(args.app)
    if not (app / "pyproject.toml").exists():
        print(f"error: {app} is not a Flower app (no pyproject.toml)", file=sys.stderr)
        return 2
    run_config = run_config_of(args.run_config)
    federation = _load_federation(args.overrides, args.config_dir)
    fab = build_fab(app)
    run_dir = prepare_run(fab, run_config, federation)
    print(f"run {run_dir.name}: run directory {run_dir}", flush=True)
    return _run_in_foreground(run_dir)


def _run_in_foreground(run_dir: Path) -> int:
    """Execute (or resume) ``run_dir`` here with progress; SIGTERM stops it cleanly."""
    from flwr_hpc._proc import keep_caches_under
    from flwr_hpc.server.runner import execute_run, exit_within_grace, request_stop
    from flwr_hpc.server.telemetry import Progress, RichProgress

    keep_caches_under(_home() / "hpc" / "cache")  # a run writes only under $FLWR_HOME

    progress = RichProgress() if sys.stderr.isatty() else Progress()
    # SIGTERM and Ctrl-C stop the run: every waiting call wakes, workers are stopped,
    # and the process ends within the runner's grace period whatever the app does
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        status = execute_run(run_dir, progress=progress, console=True)
    finally:
        if isinstance(progress, RichProgress):
            progress.stop()
    print(f"run {run_dir.name}: {status}; tasks in {run_dir / 'tasks.jsonl'}", flush=True)
    rc = 0 if status == "finished:completed" else (130 if status.endswith("stopped") else 1)
    exit_within_grace(rc)
    return rc


def cmd_resume(args: argparse.Namespace) -> int:
    """Continue an interrupted run after its last checkpointed round: on the running HPC
    SuperLink (follow it with ``flwr log RUN_ID``), else in the foreground.
    """
    from flwr_hpc.server.runs import check_resumable, runs_dir

    home = _home()
    run_dir = runs_dir(home) / str(args.run_id)
    if not run_dir.is_dir():
        print(f"error: no run {args.run_id} under {runs_dir(home)}", file=sys.stderr)
        return 2
    try:
        done = check_resumable(run_dir)
    except FlwrHpcError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    state = _read_state(home)
    if not args.foreground and state and _service_state(state) == "elsewhere":
        print(f"error: {_elsewhere(state, 'resume the run')} (or resume it here with "
              "--foreground)", file=sys.stderr)
        return 1
    if (not args.foreground and state and _service_state(state) == "alive"
            and _healthy(state["host"], state["port"])):
        req = urllib.request.Request(
            f"http://{state['host']}:{state['port']}/hpc/resume-run",
            data=json.dumps({"run_id": args.run_id}).encode(), method="POST",
            headers={"content-type": "application/json"})
        try:
            with _LOOPBACK.open(req, timeout=30) as res:
                answer = json.loads(res.read())
        except urllib.error.HTTPError as err:
            body = err.read().decode(errors="replace")
            try:
                body = json.loads(body)["detail"]
            except (ValueError, KeyError, TypeError):
                pass
            print(f"error: {body}", file=sys.stderr)
            return 1
        print(f"run {args.run_id}: resumed on the HPC SuperLink after round "
              f"{answer['after_round']}; follow it with: flwr log {args.run_id} "
              f"{CONNECTION_NAME}")
        return 0
    print(f"run {args.run_id}: resuming after round {done} in the foreground", flush=True)
    return _run_in_foreground(run_dir)


def cmd_bench(args: argparse.Namespace) -> int:
    """``flwr-hpc bench transport`` (or ``schedulers``: :func:`cmd_bench_schedulers`)."""
    if args.bench_command == "schedulers":
        return cmd_bench_schedulers(args)
    from flwr_hpc.bench.transport import bench_transport, format_table

    if args.rounds < 2:
        print("error: --rounds must be >= 2 (the first round is a warm-up)", file=sys.stderr)
        return 2
    result = bench_transport(args.clients, args.size_mb, args.rounds, sites=args.sites,
                             flower=not args.no_flower, fsync=bool(getattr(args, "fsync", False)),
                             workdir=Path(args.workdir) if args.workdir else None)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, sort_keys=True))
    print(json.dumps(result, sort_keys=True) if args.json else format_table(result))
    return 0


def cmd_bench_schedulers(args: argparse.Namespace) -> int:
    """``flwr-hpc bench schedulers``: the strategies on a simulated federation, in
    virtual time.
    """
    from flwr_hpc.bench import schedulers as bench

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    if args.render:  # the table, plot and JSON again from a saved result, another target
        path = Path(args.render)
        if not path.is_file():
            print(f"error: --render: no such file {path}", file=sys.stderr)
            return 2
        result = bench.retabulate(json.loads(path.read_text()), target_loss=args.target_loss,
                                  target_round=args.target_round)
        for out in bench.write_outputs(result, Path(args.out) if args.out else path.parent,
                                       args.name if args.out else path.stem):
            say(f"[bench schedulers] wrote {out}")
        print(bench.format_table(result))
        return 0
    strategies = tuple(x.strip() for x in args.strategies.split(",") if x.strip())
    available = bench.available_strategies()  # the app's, read from its config files
    unknown = [x for x in strategies if x not in available]
    if unknown or not strategies:
        print(f"error: --strategies: unknown {unknown or 'empty list'}; choose from "
              f"{', '.join(available)}", file=sys.stderr)
        return 2
    if args.hours <= 0:
        print("error: --hours must be > 0", file=sys.stderr)
        return 2
    try:
        seeds = tuple(int(x) for x in str(args.seeds).split(",") if x.strip())
    except ValueError:
        print(f"error: --seeds: expected comma-separated integers, got {args.seeds!r}",
              file=sys.stderr)
        return 2
    if not seeds or args.jobs < 1:
        print("error: --seeds needs at least one seed and --jobs must be >= 1",
              file=sys.stderr)
        return 2
    bench._quiet()
    result = bench.bench_schedulers(
        strategies, federation=args.federation, hours=args.hours,
        local_steps=args.local_steps, seeds=seeds, jobs=args.jobs,
        target_loss=args.target_loss, target_round=args.target_round,
        workdir=Path(args.workdir) if args.workdir else None, progress=say)
    if args.out:
        for path in bench.write_outputs(result, Path(args.out), args.name):
            say(f"[bench schedulers] wrote {path}")
    if args.json:
        slim = {k: v for k, v in result.items() if k != "runs"}
        slim["runs"] = {k: {s: {kk: vv for kk, vv in r.items() if kk != "curve"}
                            for s, r in runs.items()} for k, runs in result["runs"].items()}
        print(json.dumps(slim, sort_keys=True))
    else:
        print(bench.format_table(result))
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    """``flwr-hpc gc``: see :mod:`flwr_hpc.control.gc`."""
    from flwr_hpc.control.gc import collect, report_json

    report = collect(_home(), keep_runs=args.keep_runs, dry_run=args.dry_run,
                     min_age_s=args.min_age_s)
    print(report_json(report) if args.json else "\n".join(report.lines()))
    return 0


def cmd_login(args: argparse.Namespace) -> int:
    """``flwr-hpc login``: log in to Globus as yourself (:func:`flwr_hpc.globus_auth.login`)
    for Compute and Transfer, with ``data_access`` for the federation's mapped collections.
    """
    from flwr_hpc import globus_auth

    federation = _load_federation(args.overrides, args.config_dir)
    collections = [c for c in (federation.transfer.get("collection_id"),
                               *(s.payload.get("collection_id") for s in federation.sites))
                   if c]
    manager = None
    if args.local_server:
        from globus_sdk.login_flows import LocalServerLoginFlowManager

        manager = LocalServerLoginFlowManager
    info = globus_auth.login(collections, force=args.force, login_flow_manager=manager)
    print(f"Logged in to Globus as identity {info['identity_id']}: tokens for "
          f"{', '.join(info['resource_servers'])} (refreshable) in {info['token_file']}")
    if info["data_access"]:
        print(f"data_access granted for {', '.join(info['data_access'])}")
    if globus_auth.confidential_credentials():
        print(f"note: {globus_auth.ENV_CLIENT_ID}/{globus_auth.ENV_CLIENT_SECRET} are set in "
              "this environment; runs started from it use the confidential client instead")
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    """``flwr-hpc logout``: revoke and remove the tokens ``flwr-hpc login`` stored."""
    from flwr_hpc import globus_auth

    n, failed = globus_auth.logout()
    if not n:
        print("No Globus login was stored.")
        return 0
    print(f"Logged out of Globus: tokens for {n} service(s) removed from "
          f"{globus_auth.token_file()}; " + ("all revoked at Globus Auth" if not failed else
          f"{failed} could not be revoked (Globus Auth unreachable?) and stay valid until "
          "they expire -- revoke them at https://app.globus.org/account/consents"))
    return 0 if not failed else 1


def cmd_report(args: argparse.Namespace) -> int:
    """``flwr-hpc report RUN...``: figures and ``summary.md`` from run directories."""
    from flwr_hpc.control.report import write_report
    from flwr_hpc.server.runs import runs_dir

    dirs = []
    for item in args.runs:
        path = Path(item)
        dirs.append(path if path.is_dir() else runs_dir(_home()) / item)
    written = write_report(dirs, Path(args.out or "report"))
    for path in written:
        print(path)
    return 0


def cmd_sites(args: argparse.Namespace) -> int:
    """``flwr-hpc sites check``: check every site of the federation; exit status 1 if
    any is not ready.
    """
    from rich.console import Console
    from rich.table import Table

    from flwr_hpc.control.sites import check_sites

    federation = _load_federation(args.overrides, args.config_dir)
    console = Console()
    console.print(f"checking {len(federation.sites)} site(s) of federation "
                  f"'{federation.name}' ...")
    checks = check_sites(federation, _home(), timeout_s=args.timeout)
    def secs(value: float | None) -> str:
        return f"{value:.2f} s" if value is not None else "-"

    table = Table("site", "compute", "status", "collection", "to site", "round trip",
                  "from site", "store", "host", "result")
    for c in checks:
        table.add_row(c.site, c.compute, c.status,
                      c.collection if c.collection in ("-", "ok") else "error",
                      secs(c.transfer_to_s), secs(c.round_trip_s), secs(c.transfer_from_s),
                      c.store if c.store == "ok" else ("-" if c.store == "-" else "error"),
                      c.host, "[green]ok[/green]" if c.ok else f"[red]{c.error}[/red]")
    console.print(table)
    failed = [c.site for c in checks if not c.ok]
    if failed:
        print(f"error: {len(failed)} site(s) not ready: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def version_text() -> str:
    """``flwr-hpc X (flwr Y, Python Z)``, from the installed distributions."""
    from importlib.metadata import PackageNotFoundError, version

    def of(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    return (f"flwr-hpc {of('flwr-hpc')} (flwr {of('flwr')}, "
            f"Python {sys.version.split()[0]})")


# ----------------------------------------------------------------------------- typer

app = typer.Typer(
    name="flwr-hpc",
    help="Run Flower apps across HPC facilities: the HPC SuperLink, its runs and sites.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
bench_app = typer.Typer(help="Benchmarks that print their figures.", no_args_is_help=True)
sites_app = typer.Typer(help="A federation's sites.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(sites_app, name="sites")

Overrides = Annotated[list[str] | None, typer.Argument(
    help="Hydra overrides of the federation, e.g. federation=local "
         "federation.sites.beta.clients=3", show_default=False)]
ConfigDir = Annotated[list[str] | None, typer.Option(
    "--config-dir", help="extra directory searched for federation/<name>.yaml "
                         "(repeatable)", show_default=False)]
Verbose = Annotated[bool, typer.Option(
    "-v", "--verbose", help="log Flower's per-round lines and every task's end in "
                            "log.txt (debug.txt always has them)")]


def _dispatch(handler: Callable[[argparse.Namespace], int], **kwargs: Any) -> None:
    """Run a command handler with its arguments; its return value is the exit status:
    2 for a configuration error, 1 for another flwr-hpc error, 130 on Ctrl-C.
    """
    for key in ("overrides", "config_dir", "run_config"):
        if key in kwargs and kwargs[key] is None:
            kwargs[key] = []
    args = argparse.Namespace(**kwargs)
    # everything flwr-hpc writes (run directories, FAB installs, payload stores, the
    # service's state) is private to its owner on a shared login node
    os.umask(0o077)
    if getattr(args, "verbose", False):
        from flwr_hpc.server.runner import ENV_VERBOSE

        os.environ[ENV_VERBOSE] = "1"  # the runners (and the service's) read it
    try:
        rc = handler(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        rc = 2
    except FlwrHpcError as err:
        print(f"error: {err}", file=sys.stderr)
        rc = 1
    except KeyboardInterrupt:
        rc = 130
    raise typer.Exit(rc)


def _version(value: bool) -> None:
    if value:
        print(version_text())
        raise typer.Exit(0)


@app.callback()
def _root(version: Annotated[bool, typer.Option(
        "--version", "-V", callback=_version, is_eager=True,
        help="print flwr-hpc's, Flower's and Python's versions and exit")] = False) -> None:
    """Run Flower apps across HPC facilities: the HPC SuperLink, its runs and sites."""


@app.command("up")
def _up(overrides: Overrides = None, config_dir: ConfigDir = None,
        host: Annotated[str, typer.Option(help="loopback address to serve on")] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="port to serve on")] = DEFAULT_PORT,
        verbose: Verbose = False) -> None:
    """Start the HPC SuperLink in the background for a federation (default: local)."""
    _dispatch(cmd_up, overrides=overrides, config_dir=config_dir, host=host, port=port,
              verbose=verbose)


@app.command("down")
def _down(
    forget: Annotated[bool, typer.Option(
        "--forget", help="Drop the record of a SuperLink on another login node that is "
        "gone for good (signals nothing).")] = False,
) -> None:
    """Stop the HPC SuperLink and its runs."""
    _dispatch(cmd_down, forget=forget)


@app.command("status")
def _status() -> None:
    """Show the HPC SuperLink, its sites and runs (whole run ids)."""
    _dispatch(cmd_status)


@app.command("run")
def _run(app_dir: Annotated[str, typer.Argument(
             metavar="APP", help="the Flower app: a directory with pyproject.toml")],
         overrides: Overrides = None, config_dir: ConfigDir = None,
         run_config: Annotated[list[str] | None, typer.Option(
             "-c", "--run-config", help="run config override KEY=VALUE, as `flwr run -c` "
             "(e.g. -c num-server-rounds=2 -c 'overrides=\"dp=opacus\"')",
             show_default=False)] = None,
         verbose: Verbose = False) -> None:
    """Run a Flower app in the foreground on a federation (no service needed)."""
    _dispatch(cmd_run, app=app_dir, overrides=overrides, config_dir=config_dir,
              run_config=run_config, verbose=verbose)


@app.command("resume")
def _resume(run_id: Annotated[int, typer.Argument(help="the run to continue")],
            foreground: Annotated[bool, typer.Option(
                help="run here even when the HPC SuperLink is up")] = False) -> None:
    """Continue an interrupted run after its last checkpointed round."""
    _dispatch(cmd_resume, run_id=run_id, foreground=foreground)


@app.command("report")
def _report(runs: Annotated[list[str], typer.Argument(
                help="run ids (under $FLWR_HOME/hpc/runs) or run directories")],
            out: Annotated[str | None, typer.Option(
                help="where to write the figures and summary.md (default: ./report)")] = None
            ) -> None:
    """Plots (eval vs round and clock, per-site time, bytes, failures) and a summary."""
    _dispatch(cmd_report, runs=runs, out=out)


@app.command("login")
def _login(overrides: Overrides = None, config_dir: ConfigDir = None,
           force: Annotated[bool, typer.Option(
               "--force", help="log in again even if the stored login still works")] = False,
           local_server: Annotated[bool, typer.Option(
               "--local-server", help="receive the code on a local web server (a browser "
               "on this machine) instead of pasting it")] = False) -> None:
    """Log in to Globus as yourself for Compute and Transfer (tokens kept refreshable in
    $FLWR_HOME/hpc/globus; with a federation, consent to its mapped collections too).
    """
    _dispatch(cmd_login, overrides=overrides, config_dir=config_dir, force=force,
              local_server=local_server)


@app.command("logout")
def _logout() -> None:
    """Revoke and remove the Globus tokens `flwr-hpc login` stored."""
    _dispatch(cmd_logout)


@app.command("gc")
def _gc(keep_runs: Annotated[int | None, typer.Option(
            help="also remove run directories beyond the N most recently finished "
                 "(unfinished runs are always kept)")] = None,
        dry_run: Annotated[bool, typer.Option(
            "--dry-run", help="report what would be removed; remove nothing")] = False,
        min_age_s: Annotated[float, typer.Option(
            help="never remove a store object used in the last this many seconds")] = 3600.0,
        json_out: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
        ) -> None:
    """Free store objects no live run needs (and old run directories)."""
    _dispatch(cmd_gc, keep_runs=keep_runs, dry_run=dry_run, min_age_s=min_age_s,
              json=json_out)


@sites_app.command("check")
def _sites_check(overrides: Overrides = None, config_dir: ConfigDir = None,
                 timeout: Annotated[float, typer.Option(
                     help="seconds to wait for each site's probe")] = 120.0) -> None:
    """Credentials, endpoint status and a round-trip probe (task + payload) per site."""
    _dispatch(cmd_sites, overrides=overrides, config_dir=config_dir, timeout=timeout)


JsonFlag = Annotated[bool, typer.Option("--json", help="print one JSON object")]
Workdir = Annotated[str | None, typer.Option(
    help="keep the runs' files here (default: a temporary directory, removed)")]


@bench_app.command("transport")
def _bench_transport(
        clients: Annotated[int, typer.Option(help="Flower nodes (client slots)")],
        size_mb: Annotated[float, typer.Option(
            help="MB of float32 arrays each client receives and returns")],
        rounds: Annotated[int, typer.Option(
            help="rounds per transport; the first is a warm-up")] = 3,
        sites: Annotated[int, typer.Option(
            help="flwr-hpc sites the clients are spread over")] = 4,
        no_flower: Annotated[bool, typer.Option(
            "--no-flower", help="skip Flower's deployment (flwr-hpc and the floor only)")] = False,
        fsync: Annotated[bool, typer.Option(
            "--fsync", help="sites flush payload objects to disk (payload.fsync: true); "
                            "the floor then includes the flush")] = False,
        json_out: JsonFlag = False,
        out: Annotated[str | None, typer.Option(
            help="also write the JSON result to this file")] = None,
        workdir: Workdir = None) -> None:
    """Per-round time of flwr-hpc vs Flower's deployment vs the floor."""
    _dispatch(cmd_bench, bench_command="transport", clients=clients, size_mb=size_mb,
              rounds=rounds, sites=sites, no_flower=no_flower, fsync=fsync, json=json_out,
              out=out, workdir=workdir)


@bench_app.command("schedulers")
def _bench_schedulers(
        strategies: Annotated[str, typer.Option(
            help="comma-separated; the first is the baseline that sets the target")] = (
            "fedavg,fedqueue,fedcompass,fedasync,fedbuff,deadline,queue_aware,budget_async"),
        federation: Annotated[str, typer.Option(
            help="a simulated federation (sim_4facilities, sim_doe_traces)")] = (
            "sim_4facilities"),
        hours: Annotated[float, typer.Option(help="virtual hours per run")] = 48.0,
        local_steps: Annotated[int, typer.Option(
            help="default local steps per train task")] = 10,
        seeds: Annotated[str, typer.Option(
            help="comma-separated seeds of the simulated facilities")] = "0",
        jobs: Annotated[int, typer.Option(help="runs at a time (processes)")] = 1,
        target_loss: Annotated[float | None, typer.Option(
            help="eval loss to reach (default: the baseline's worst final loss over the "
                 "seeds)")] = None,
        target_round: Annotated[int | None, typer.Option(
            help="target: the baseline's worst eval loss after this many rounds")] = None,
        render: Annotated[str | None, typer.Option(
            help="re-tabulate a saved <name>.json (another target) without running")] = None,
        json_out: JsonFlag = False,
        out: Annotated[str | None, typer.Option(
            help="write <name>.json/.md/.png/.svg into this directory")] = None,
        name: Annotated[str, typer.Option(help="file name stem of --out")] = "schedulers",
        workdir: Workdir = None) -> None:
    """Scheduler-aware strategies vs FedAvg and APPFL's baselines on simulated facilities,
    in virtual time, over seeds.
    """
    _dispatch(cmd_bench, bench_command="schedulers", strategies=strategies,
              federation=federation, hours=hours, local_steps=local_steps, seeds=seeds,
              jobs=jobs, target_loss=target_loss, target_round=target_round, render=render,
              json=json_out, out=out, name=name,
              workdir=workdir)


def run_config_of(pairs: list[str]) -> dict[str, Any]:
    """``-c KEY=VALUE`` pairs as Flower parses them (TOML values: strings in quotes),
    with an error that names the bad pair instead of a traceback.
    """
    from flwr.common.config import parse_config_args

    out: dict[str, Any] = {}
    for pair in pairs:
        try:
            out.update(parse_config_args([pair]))
        except Exception:  # noqa: BLE001 - click's error, or TOML's
            key, _, value = pair.partition("=")
            hint = (f" (a string needs quotes: -c '{key}=\"{value}\"')"
                    if value and not value.startswith(('"', "'")) else "")
            raise ConfigError("-c", pair, "not a KEY=VALUE pair with a TOML value (bool, "
                              f"int, float or quoted string){hint}") from None
    return out


def main(argv: list[str] | None = None) -> int:
    """The ``flwr-hpc`` entry point: the exit status of the command (2 for a usage or
    configuration error, 1 for another flwr-hpc error, 130 on Ctrl-C).
    """
    try:
        app(args=argv, prog_name="flwr-hpc")
    except SystemExit as done:
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
