"""``flwr-hpc bench transport``: flwr-hpc vs Flower's own deployment vs the physical floor.

One invocation runs the same no-training Flower app (``flwr_hpc/bench/app``: each client
returns the S MB of float32 arrays it received, plus noise) for R rounds

(a) through flwr-hpc on a local federation (the runner in its own process, sites as local
    endpoint engines with process-pool workers, payloads through site directories), and
(b) through Flower's deployment on loopback: a real ``flower-superlink`` and N real
    ``flower-supernode`` processes (insecure, started and stopped here), driven by
    ``flwr run``, with Flower's liveness and request timeouts lengthened
    (``FLOWER_PATIENCE``) so that an overloaded but working deployment is not failed;

and measures on the spot (c) the floor under the configured durability: the bytes a round
must move -- the model once per site and every update once, (sites + N) x S -- written to
the page cache (and fsynced only with ``fsync``), read back, copied once and sha256-hashed
on both ends, each component timed on one core (:func:`floor_round`); the old floor (2 x N
x S copied and fsynced) is kept under its own key. Reported per transport: the median
round time over the rounds after the first (warm-up), the server's peak RSS, and for
flwr-hpc the bytes staged per site per round (which must not grow with the clients a site
hosts).

One cohesive thing (over 400 lines): one benchmark, its three arms and its report.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil

APP_DIR = Path(__file__).resolve().parent / "app"
MiB = 2**20


def _say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- the floor


def measure_floor(workdir: Path, probe_mb: int = 256) -> dict[str, float]:
    """Bandwidths (bytes/s, best of three -- fsynced writes: of two --, one core) of the
    per-byte work a round cannot avoid, measured on the spot in ``workdir``: ``memcpy``
    (into a warm buffer), ``write`` (to the page cache: a fresh file, not flushed),
    ``read`` (that file back, from the page cache, into a warm buffer), ``sha256``
    (hashlib), and ``fsync_write`` (a fresh file written and fsynced: the disk).
    """
    n = probe_mb * MiB
    src = np.random.default_rng(0).integers(0, 255, n, dtype=np.uint8)
    dst = np.empty_like(src)
    view = memoryview(src)

    def best(fn, tries: int = 3) -> float:
        times = []
        for _ in range(tries):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return n / min(times)

    path = workdir / "floor.bin"

    def write(sync: bool) -> None:
        with open(path, "wb", buffering=0) as fh:
            fh.write(view)
            if sync:
                os.fsync(fh.fileno())

    def read() -> None:
        with open(path, "rb", buffering=0) as fh:
            fh.readinto(memoryview(dst))

    try:
        out = {"memcpy": best(lambda: np.copyto(dst, src)),
               "sha256": best(lambda: hashlib.sha256(view).digest()),
               "write": best(lambda: (path.unlink(missing_ok=True), write(False))),
               "read": best(read),
               "fsync_write": best(lambda: (path.unlink(missing_ok=True), write(True)), 2)}
    finally:
        path.unlink(missing_ok=True)
    return out


def floor_bytes(clients: int, sites: int, size_bytes: float) -> dict[str, float]:
    """The bytes a round must move through flwr-hpc's design, at least: the model written
    to and read at each site once (``down``), every client's update written and read once
    (``up``), the model hashed once by the server and once per site, every update hashed
    by its client and by the server.
    """
    down, up = sites * size_bytes, clients * size_bytes
    return {"down": down, "up": up, "moved": down + up,
            "hashed": size_bytes + down + 2 * up}


def floor_round(clients: int, sites: int, size_bytes: float, bandwidth: dict[str, float], *,
                fsync: bool = False, cores: int = 1) -> dict[str, Any]:
    """The floor of one round under the configured durability: each component in seconds
    of one core (every moved byte written to the page cache once -- and flushed to disk
    only when ``fsync`` --, read once and copied once in memory; every byte hashed with
    sha256 on both ends) and their sum, the floor ``round_s``: the round's unavoidable
    work done once, in sequence. ``parallel_round_s`` = ``round_s / cores`` is that work
    spread perfectly over the cores the benchmark may use (a bound no transport on this
    machine can beat; flwr-hpc's server and site workers do run side by side).
    ``fsync_floor_s`` is the old floor (2 x N x S through memory copy and fsynced writes),
    kept under its own key.
    """
    b = floor_bytes(clients, sites, size_bytes)
    comp = {"write_s": b["moved"] / bandwidth["write"],
            "read_s": b["moved"] / bandwidth["read"],
            "sha256_s": b["hashed"] / bandwidth["sha256"],
            "memcpy_s": b["moved"] / bandwidth["memcpy"]}
    if fsync:  # the flush on top of the page-cache write
        comp["fsync_s"] = max(0.0, b["moved"] / bandwidth["fsync_write"] - comp["write_s"])
    work = sum(comp.values())
    old = 2 * clients * size_bytes
    return {"components_s": comp, "round_s": work, "cores": cores,
            "parallel_round_s": work / cores, "bytes": b, "fsync": fsync,
            "fsync_floor_s": old / bandwidth["memcpy"] + old / bandwidth["fsync_write"]}


# ----------------------------------------------------------------------------- peak RSS


class _PeakRss(threading.Thread):
    """Polls the RSS of one process (not its children) and keeps the peak."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self._stop_event = pid, 0, threading.Event()

    def run(self) -> None:
        try:
            proc = psutil.Process(self.pid)
            while not self._stop_event.wait(0.05):
                self.peak = max(self.peak, proc.memory_info().rss)
        except psutil.Error:
            pass

    def stop(self) -> int:
        self._stop_event.set()
        self.join(timeout=2)
        return self.peak


def _median_after_warmup(round_s: list[float]) -> float:
    return statistics.median(round_s[1:] if len(round_s) > 1 else round_s)


# ----------------------------------------------------------------------------- flwr-hpc


def bench_federation(clients: int, sites: int, workdir: Path, fsync: bool = False):
    """A local federation of ``clients`` spread over ``sites`` process-pool sites (at
    most one site per client), with about one worker process per core in all; payload
    objects flushed to disk only with ``fsync``.
    """
    from flwr_hpc._proc import usable_cpus
    from flwr_hpc.config import FederationConfig

    sites = max(1, min(sites, clients))
    per = [clients // sites + (1 if i < clients % sites else 0) for i in range(sites)]
    # one worker process per core over all sites (at least one per site): more workers
    # than cores only time-slice the same work and finish every task late together
    # (N=32, S=64 on 2 cores: 7.0 s/round with 2 workers per site, 6.3 s with 1)
    share = max(1, usable_cpus() // sites)
    return FederationConfig.from_dict({
        "name": "bench", "workdir": str(workdir / "sites"),
        "sites": {f"site{i}": {"clients": n, "payload": {"fsync": fsync},
                               "compute": {"type": "local", "engine": "process-pool",
                                           "workers": min(share, n)}}
                  for i, n in enumerate(per)}})


def run_flwr_hpc(clients: int, size_mb: float, rounds: int, sites: int,
                 workdir: Path, timeout_s: float, tensors: str = "",
                 fsync: bool = False) -> dict[str, Any]:
    """Run the bench app through flwr-hpc (the runner in its own process); return its
    round times, the server's peak RSS, and the bytes staged per site per round.
    """
    from flwr_hpc._proc import large_buffer_env
    from flwr_hpc.fab import build_fab
    from flwr_hpc.server.runs import prepare_run, read_status

    home = workdir / "hpc-home"
    fed = bench_federation(clients, sites, workdir, fsync)
    result_file = workdir / "hpc-result.json"
    fab = build_fab(APP_DIR)
    run_dir = prepare_run(fab, {"rounds": rounds, "size-mb": size_mb, "streaming": True,
                                "result-file": str(result_file), "tensors": tensors},
                          fed, home=home)
    env = large_buffer_env({**os.environ, "FLWR_HOME": str(home)})  # as the service does
    with open(workdir / "hpc-runner.out", "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flwr_hpc.server.runner", str(run_dir)],
                                env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        watcher = _PeakRss(proc.pid)
        watcher.start()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise RuntimeError(f"flwr-hpc run did not finish within {timeout_s:.0f} s; "
                               f"see {run_dir / 'log.txt'}") from None
        finally:
            polled = watcher.stop()
    status = read_status(run_dir)
    if status.get("sub_status") != "completed" or not result_file.exists():
        raise RuntimeError(f"flwr-hpc run failed ({status.get('details')}); see "
                           f"{run_dir / 'log.txt'}")
    result = json.loads(result_file.read_text())
    staged: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for line in (run_dir / "tasks.jsonl").read_text().splitlines():
        task = json.loads(line)
        staged[task["site"]][task["round"]] += int(task["bytes_to_site"])
    return {
        "round_s": result["round_s"],
        "server_peak_rss_bytes": max(result["serverapp_peak_rss_bytes"], polled),
        "clients_per_site": {s.name: s.clients for s in fed.sites},
        # after round 1 (which also carries the FAB): what a site receives per round
        "staged_bytes_per_site_round": {
            site: max(v for r, v in by_round.items() if r != "1") if len(by_round) > 1
            else max(by_round.values()) for site, by_round in staged.items()},
        "run_dir": str(run_dir),
    }


# ----------------------------------------------------------------------------- Flower


class FlowerRunFailed(RuntimeError):
    """Flower's own deployment gave up on the run (reported, not raised, by the bench).
    ``rounds_s``: the round times it completed before that (warm-up round first).
    """

    def __init__(self, message: str, rounds_s: list[float] | None = None) -> None:
        super().__init__(message)
        self.rounds_s = list(rounds_s or [])


def _rounds_so_far(result_file: Path) -> list[float]:
    """Round times the bench ServerApp has recorded so far (written after every round)."""
    try:
        return list(json.loads(Path(f"{result_file}.rounds").read_text())["round_s"])
    except (OSError, ValueError, KeyError):
        return []


def _serverapps(home: Path) -> list[psutil.Process]:
    """The live (non-zombie) ServerApp processes of this Flower deployment."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if ("flwr-serverapp" in cmdline and p.info["status"] != psutil.STATUS_ZOMBIE
                and (str(home) in cmdline or _environ_home(p) == str(home))):
            found.append(p)
    return found


def _environ_home(p: psutil.Process) -> str:
    try:
        return p.environ().get("FLWR_HOME", "")
    except psutil.Error:
        return ""


def _flower_status(bindir: Path, env: dict, run_id: str) -> str:
    try:
        out = subprocess.run([str(bindir / "flwr"), "ls", "bench", "--run-id",
                              run_id, "--format", "json"], env=env, capture_output=True,
                             text=True, timeout=60, stdin=subprocess.DEVNULL)
        data = json.loads(out.stdout[out.stdout.index("{"):])
        run = data["runs"][0]
        details = run.get("status-details") or run.get("status_details") or ""
        return str(run["status"]) + (f" ({details})" if details else "")
    except (subprocess.TimeoutExpired, ValueError, KeyError, IndexError):
        return "unknown"


# Flower's timeouts, made patient for an overloaded loopback deployment. On 2 cores, N
# SuperNodes each (de)serialising 64 MB starve the SuperLink, and with Flower's defaults
# a live deployment is failed (seen at N=32, S=64): a ServerApp task that misses its
# heartbeats for 2 x 30 s is declared dead ("No heartbeat received from the task"), and a
# 5 MB object push that takes over the 30 s HTTP timeout is retried, the retry finds the
# object already stored and the ServerApp fails ("The push session may have expired or
# been replaced"). flwr 1.41 and 1.42 have no flag or variable for these, so a ``sitecustomize`` on
# the Flower processes' PYTHONPATH sets them before any Flower module binds them. Only
# timeouts change; the data path is Flower's own.
FLOWER_PATIENCE = {
    "flwr.common.constant": {"HEARTBEAT_DEFAULT_INTERVAL": 120, "HEARTBEAT_CALL_TIMEOUT": 30,
                             "HEARTBEAT_PATIENCE": 5},
    "flwr.supercore.constant": {"OBJECT_PUSH_SESSION_TTL_SECONDS": 1800},
}
FLOWER_HTTP_TIMEOUT_S = 900.0  # ProtobufClient's default request timeout (30 s)


def _patient_flower_pythonpath(workdir: Path) -> str:
    patch = workdir / "flower-patience"
    patch.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (module, values) in enumerate(FLOWER_PATIENCE.items()):
        lines.append(f"import {module} as _c{i}")
        lines += [f"_c{i}.{name} = {value}" for name, value in values.items()]
    lines += ["import flwr.supercore.protobuf.client as _pc",
              f'_pc.ProtobufClient.__init__.__kwdefaults__["timeout"] = '
              f"{FLOWER_HTTP_TIMEOUT_S}"]
    (patch / "sitecustomize.py").write_text(
        "# written by flwr-hpc bench transport: see FLOWER_PATIENCE there\n"
        + "\n".join(lines) + "\n")
    return str(patch)


def run_flower(clients: int, size_mb: float, rounds: int, workdir: Path,
               timeout_s: float) -> dict[str, Any]:
    """Flower's deployment on loopback: flower-superlink + N flower-supernode, flwr run."""
    bindir = Path(sys.executable).parent
    home = workdir / "flower-home"
    home.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    # Flower's processes start flower-superexec / flwr-serverapp / flwr-clientapp by name
    env = {**os.environ, "FLWR_HOME": str(home),
           "PATH": os.pathsep.join([str(bindir), os.environ.get("PATH", "")]),
           "PYTHONPATH": os.pathsep.join(
               p for p in (_patient_flower_pythonpath(workdir),
                           os.environ.get("PYTHONPATH", "")) if p)}
    procs: list[subprocess.Popen] = []
    logs = workdir / "flower-logs"
    logs.mkdir(exist_ok=True)

    def spawn(name: str, args: list[str]) -> subprocess.Popen:
        with open(logs / f"{name}.log", "wb") as out:
            proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        procs.append(proc)
        return proc

    result_file = workdir / "flower-result.json"
    try:
        link = spawn("superlink", [str(bindir / "flower-superlink"), "--insecure",
                                   "--host", "127.0.0.1", "--port", str(port),
                                   "--disable-runtime-dependency-installation"])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if link.poll() is not None:
                raise RuntimeError(f"flower-superlink exited; see {logs / 'superlink.log'}")
            time.sleep(0.2)
        link_rss = _PeakRss(link.pid)
        link_rss.start()
        for i in range(clients):
            spawn(f"supernode-{i}", [
                str(bindir / "flower-supernode"), "--insecure",
                "--superlink", f"127.0.0.1:{port}", "--port", str(_free_port()),
                "--node-config", f"partition-id={i} num-partitions={clients}"])
        _say(f"flower: superlink + {clients} supernodes started")
        run_config = (f"rounds={rounds} size-mb={float(size_mb)} streaming=false "
                      f"result-file='{result_file}'")
        started = subprocess.run(  # returns once the run is submitted; we poll the result
            [str(bindir / "flwr"), "run", str(APP_DIR), "bench", "--run-config", run_config],
            env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        (logs / "flwr-run.log").write_text(started.stdout + started.stderr)
        if started.returncode != 0:
            raise RuntimeError(f"flwr run failed: {started.stderr[-1000:]}")
        run_id = started.stdout.split("Successfully started run", 1)[-1].split()[0]
        deadline = time.monotonic() + timeout_s
        last_check = 0.0
        seen_serverapp, gone_since = False, None
        while not result_file.exists():
            if link.poll() is not None:
                raise RuntimeError(f"flower-superlink exited; see {logs / 'superlink.log'}")
            if time.monotonic() > deadline:
                raise FlowerRunFailed(
                    f"the Flower run did not finish within {timeout_s:.0f} s (see {logs})",
                    _rounds_so_far(result_file))
            if time.monotonic() - last_check > 5:
                last_check = time.monotonic()
                status = _flower_status(bindir, env, run_id)
                if status.startswith("finished") and not result_file.exists():
                    time.sleep(1.0)
                    if not result_file.exists():
                        raise FlowerRunFailed(
                            f"Flower's deployment ended run {run_id} as '{status}' before "
                            f"it finished its rounds (see {logs / 'superlink.log'})",
                            _rounds_so_far(result_file))
                # A ServerApp killed from outside (the kernel's OOM killer) is noticed by
                # the SuperLink only when its heartbeats expire: minutes, with patience.
                alive = bool(_serverapps(home))
                seen_serverapp = seen_serverapp or alive
                if seen_serverapp and not alive:
                    gone_since = gone_since or time.monotonic()
                    if time.monotonic() - gone_since > 60 and not result_file.exists():
                        raise FlowerRunFailed(
                            f"Flower's ServerApp process of run {run_id} died before it "
                            "finished its rounds and none replaced it within 60 s (killed "
                            "from outside, e.g. by the kernel's OOM killer: see dmesg)",
                            _rounds_so_far(result_file))
                else:
                    gone_since = None
            time.sleep(0.5)
        time.sleep(0.5)  # the result file is written in one go; let it close
        link_peak = link_rss.stop()
        result = json.loads(result_file.read_text())
        return {"round_s": result["round_s"],
                "serverapp_peak_rss_bytes": result["serverapp_peak_rss_bytes"],
                "superlink_peak_rss_bytes": link_peak}
    finally:
        family = []  # descendants may live in sessions of their own
        for proc in procs:
            try:
                family += psutil.Process(proc.pid).children(recursive=True)
            except psutil.Error:
                pass
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(1.0)
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        for p in family:
            try:
                p.kill()
            except psutil.Error:
                pass
        # SuperExec starts flwr-serverapp / flwr-clientapp in their own sessions
        for p in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(p.info["cmdline"] or [])
            if f"127.0.0.1:{port}" in cmdline or str(home) in cmdline:
                try:
                    p.kill()
                except psutil.Error:
                    pass


# ----------------------------------------------------------------------------- the bench


def bench_transport(clients: int, size_mb: float, rounds: int = 3, *, sites: int = 4,
                    flower: bool = True, workdir: Path | None = None,
                    timeout_s: float = 1800.0, tensors: Sequence[int] = (),
                    fsync: bool = False) -> dict[str, Any]:
    """The whole benchmark (see the module docstring): flwr-hpc, then Flower's deployment
    (unless ``flower`` is False), then the floor; ``workdir`` (default: a temporary
    directory, removed) keeps the runs' files. ``tensors``: the model's layout as float32
    element counts per tensor (``size_mb`` is then their total); default 8 equal tensors.
    ``fsync``: the sites' payload objects are flushed to disk (``payload.fsync: true``),
    and the floor includes the flush.
    """
    layout = ",".join(str(int(n)) for n in tensors)
    if tensors:
        if flower:
            raise ValueError("a tensor layout is benchmarked through flwr-hpc only "
                             "(flower=False)")
        size_mb = sum(int(n) for n in tensors) * 4 / MiB
    own = workdir is None
    workdir = Path(workdir or tempfile.mkdtemp(prefix="flwr-hpc-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        _say(f"flwr-hpc: {clients} clients, {size_mb:g} MB, {rounds} rounds")
        t0 = time.monotonic()
        hpc = run_flwr_hpc(clients, size_mb, rounds, sites, workdir, timeout_s, layout,
                           fsync)
        _say(f"flwr-hpc: done in {time.monotonic() - t0:.0f} s; rounds {hpc['round_s']}")
        fl, flower_error, flower_partial = None, None, []
        if flower:
            _say(f"flower: {clients} supernodes, {size_mb:g} MB, {rounds} rounds")
            t0 = time.monotonic()
            try:
                fl = run_flower(clients, size_mb, rounds, workdir, timeout_s)
                _say(f"flower: done in {time.monotonic() - t0:.0f} s; rounds "
                     f"{fl['round_s']}")
            except FlowerRunFailed as err:
                _say(f"flower: FAILED after {time.monotonic() - t0:.0f} s: {err}; rounds "
                     f"completed before: {err.rounds_s}")
                flower_error, flower_partial = str(err), err.rounds_s
        # after the runs: a child forked from a big process starts with its RSS counted
        _say(f"floor: measuring memory copy, page-cache write and read, sha256 and fsynced "
             f"writes in {workdir}")
        from flwr_hpc._proc import usable_cpus

        # probes the size of what a round moves (32-256 MiB): as big as the work measured
        moved_mib = (len(hpc["clients_per_site"]) + clients) * size_mb
        bandwidth = measure_floor(workdir, probe_mb=int(min(256, max(32, moved_mib))))
        nbytes = 2 * clients * size_mb * MiB
        floor = floor_round(clients, len(hpc["clients_per_site"]), size_mb * MiB, bandwidth,
                            fsync=fsync, cores=usable_cpus())
        hpc_s = _median_after_warmup(hpc["round_s"])
        out: dict[str, Any] = {
            "clients": clients, "size_mb": size_mb, "rounds": rounds,
            "tensors": len(tensors) or 8,
            "sites": len(hpc["clients_per_site"]),
            "bytes_per_round": int(nbytes),
            "durability": "fsync" if fsync else "page cache",
            "floor_round_s": floor["round_s"],
            "floor_components_s": floor["components_s"],
            "floor_cores": floor["cores"],
            "parallel_floor_round_s": floor["parallel_round_s"],
            "floor_bytes": floor["bytes"],
            "bandwidth_gb_per_s": {k: v / 1e9 for k, v in bandwidth.items()},
            "fsync_floor_round_s": floor["fsync_floor_s"],
            "memcpy_gb_per_s": bandwidth["memcpy"] / 1e9,
            "disk_gb_per_s": bandwidth["fsync_write"] / 1e9,
            "flwr_hpc_round_s": hpc_s,
            "flwr_hpc_rounds_s": hpc["round_s"],
            "server_peak_rss_bytes": hpc["server_peak_rss_bytes"],
            "clients_per_site": hpc["clients_per_site"],
            "staged_bytes_per_site_round": hpc["staged_bytes_per_site_round"],
            "flwr_hpc_over_floor": hpc_s / floor["round_s"],
            "flwr_hpc_over_parallel_floor": hpc_s / floor["parallel_round_s"],
            "flwr_hpc_over_fsync_floor": hpc_s / floor["fsync_floor_s"],
        }
        if flower_error:
            out["flower_error"] = flower_error
            out["flower_rounds_s"] = flower_partial
            if flower_partial:  # the rounds both completed, warm-up included
                k = len(flower_partial)
                out["flwr_hpc_over_flower_completed_rounds"] = (
                    sum(hpc["round_s"][:k]) / sum(flower_partial))
        if fl is not None:
            out.update(flower_round_s=_median_after_warmup(fl["round_s"]),
                       flower_rounds_s=fl["round_s"],
                       flower_serverapp_peak_rss_bytes=fl["serverapp_peak_rss_bytes"],
                       flower_superlink_peak_rss_bytes=fl["superlink_peak_rss_bytes"])
            out["flwr_hpc_over_flower"] = out["flwr_hpc_round_s"] / out["flower_round_s"]
        return out
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


def format_table(r: dict[str, Any]) -> str:
    """The result of :func:`bench_transport` as a text table."""
    rows = [("clients", r["clients"]), ("size (MB)", r["size_mb"]),
            ("bytes per round", f"{r['bytes_per_round'] / MiB:,.0f} MiB"),
            ("floor round (s)", f"{r['floor_round_s']:.3f} ({r['durability']}; "
             + " + ".join(f"{k[:-2]} {v:.3f}" for k, v in r["floor_components_s"].items())
             + " s)"),
            ("parallel floor round (s)", f"{r['parallel_floor_round_s']:.3f} (the floor "
             f"over {r['floor_cores']} cores)"),
            ("fsync floor round (s)", f"{r['fsync_floor_round_s']:.3f} (2 x N x S copied "
             "and fsynced, the old floor)"),
            ("flwr-hpc round (s)", f"{r['flwr_hpc_round_s']:.3f}"),
            ("flwr-hpc / floor", f"{r['flwr_hpc_over_floor']:.2f}"),
            ("flwr-hpc / parallel floor", f"{r['flwr_hpc_over_parallel_floor']:.2f}"),
            ("flwr-hpc / fsync floor", f"{r['flwr_hpc_over_fsync_floor']:.2f}"),
            ("flwr-hpc server peak RSS", f"{r['server_peak_rss_bytes'] / MiB:,.0f} MiB")]
    if r.get("flower_error"):
        rows.append(("Flower", r["flower_error"]))
        if r.get("flower_rounds_s"):
            rows += [("Flower rounds completed (s)",
                      ", ".join(f"{v:.1f}" for v in r["flower_rounds_s"])),
                     ("flwr-hpc / Flower, those rounds",
                      f"{r['flwr_hpc_over_flower_completed_rounds']:.3f}")]
    if "flower_round_s" in r:
        rows += [("Flower round (s)", f"{r['flower_round_s']:.3f}"),
                 ("flwr-hpc / Flower", f"{r['flwr_hpc_over_flower']:.3f}"),
                 ("Flower SuperLink peak RSS",
                  f"{r['flower_superlink_peak_rss_bytes'] / MiB:,.0f} MiB")]
    per_site = ", ".join(f"{s}: {r['clients_per_site'][s]} clients -> "
                         f"{b / MiB:,.1f} MiB" for s, b in
                         sorted(r["staged_bytes_per_site_round"].items()))
    rows.append(("staged per site per round", per_site))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
