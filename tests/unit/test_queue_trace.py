"""The trace-driven queue model: the simulator's waits reproduce the shipped traces'
quantiles and serial correlation, facility limits hold, bad configs are named."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
import pytest

from flwr_hpc.compute.queue_trace import (
    TRACE_DIR,
    TraceReplay,
    available_traces,
    local_hours,
    trace_class,
    trace_sources,
)
from flwr_hpc.compute.sim import SimSiteBackend

SIM = {"queue_median_s": 60.0, "queue_sigma": 0.5, "startup_s": 100.0, "step_s": 2.0,
       "eval_s": 10.0, "bandwidth_mb_s": 100.0, "latency_s": 1.0, "failure_prob": 0.0,
       "seed": 0, "queue_model": "trace", "trace": "Mira-2018", "replay": "sequential",
       "start_hour": 9.0, "nodes": 512, "walltime_s": 3600.0, "max_jobs": 0}


class _NoRunner:
    def submit(self, fn, job):
        raise AssertionError("not used")

    def close(self):
        pass


def _backend(site="mira", **params) -> SimSiteBackend:
    return SimSiteBackend(site, {**SIM, **params}, _NoRunner())


def _shipped(name: str) -> np.ndarray:
    """The shipped CSV read independently of the module under test."""
    with gzip.open(TRACE_DIR / f"{name}.csv.gz", "rt", newline="") as f:
        rows = list(csv.DictReader(f))
    return np.array([[int(r["submit_s"]), int(r["wait_s"]), int(r["run_s"]), int(r["nodes"])]
                     for r in rows])


def _lag1(waits: np.ndarray) -> float:
    x = np.log1p(waits)
    return float(np.corrcoef(x[:-1], x[1:])[0, 1])


def test_the_four_doe_traces_ship_with_provenance_and_stay_small():
    assert available_traces() == ["ANL-Intrepid-2009", "Mira-2018", "Theta-2022",
                                  "ThetaGPU-2023"]
    sources = trace_sources()
    for name in available_traces():
        path = TRACE_DIR / f"{name}.csv.gz"
        assert path.stat().st_size <= 1_000_000
        assert sources[name]["jobs"] == len(_shipped(name)) > 20_000
        assert len(sources[name]["source_sha256"]) == 64
    notice = (TRACE_DIR / "NOTICE.txt").read_text()
    assert "Feitelson" in notice and "ALCF" in notice and "Regents of the University" in notice
    script = Path(__file__).resolve().parents[2] / "scripts" / "make_traces.py"
    assert "def main" in script.read_text()


@pytest.mark.parametrize(("trace", "nodes", "lo", "hi"), [
    ("Mira-2018", 512, 129, 10**9), ("ANL-Intrepid-2009", 512, 129, 10**9),
    ("ThetaGPU-2023", 1, 1, 1)])
def test_a_long_simulated_run_reproduces_the_trace_class(trace, nodes, lo, hi):
    data = _shipped(trace)
    cls = data[(data[:, 3] >= lo) & (data[:, 3] <= hi) & (data[:, 2] > 600)
               & (data[:, 2] <= 3600)]
    assert len(cls) >= 1000
    want_q = np.percentile(cls[:, 1], [25, 50, 90])
    want_ac = _lag1(cls[:, 1].astype(float))
    backend = _backend(trace=trace, nodes=nodes)
    # one FL job an hour of virtual time, twice as many jobs as the class holds
    waits = []
    for i in range(2 * len(cls)):
        plan = backend.plan("train", 10, 1000, now=i * 3600.0)
        waits.append(plan.queue_wait_s)
    waits = np.array(waits)
    got_q = np.percentile(waits, [25, 50, 90])
    np.testing.assert_allclose(got_q, want_q, rtol=0.10)
    assert abs(_lag1(waits) - want_ac) <= 0.1
    assert want_ac > 0.3  # the correlation a lognormal draw would lose


def test_the_lognormal_model_has_no_serial_correlation_for_contrast():
    backend = _backend(queue_model="lognormal", queue_median_s=600.0, queue_sigma=2.0)
    waits = np.array([backend.plan("train", 10, 0, now=i * 3600.0).queue_wait_s
                      for i in range(5000)])
    assert abs(_lag1(waits)) < 0.05


def test_replay_starts_at_the_simulations_hour_and_is_seeded():
    cls = trace_class("Theta-2022", 128, 3600)
    starts = set()
    for seed in range(5):
        r = TraceReplay(cls, np.random.default_rng(seed), start_hour=14)
        assert int(local_hours("Theta-2022", cls.submit_s[[r.start]])[0]) == 14
        starts.add(r.start)
    assert len(starts) >= 4
    a, b = _backend(seed=3), _backend(seed=3)
    assert ([a.plan("train", 1, 0, now=i * 60.0).queue_wait_s for i in range(50)]
            == [b.plan("train", 1, 0, now=i * 60.0).queue_wait_s for i in range(50)])
    c = _backend(seed=4)
    assert ([c.plan("train", 1, 0, now=i * 60.0).queue_wait_s for i in range(50)]
            != [_backend(seed=3).plan("train", 1, 0, now=i * 60.0).queue_wait_s
                for i in range(50)])


def test_clock_replay_follows_the_trace_time():
    cls = trace_class("Mira-2018", 512, 3600)
    r = TraceReplay(cls, np.random.default_rng(0), mode="clock")
    r.next_wait(0.0)
    first = r._last
    r.next_wait(30 * 86400.0)  # a month later on the trace's clock
    later = int(r._last) % len(cls)
    gap = cls.submit_s[later] - cls.submit_s[first]
    assert 30 * 86400 <= gap <= 31 * 86400


def test_a_job_over_its_walltime_is_killed_and_charged_for_it():
    backend = _backend(queue_model="lognormal", walltime_s=1000.0)
    ok = backend.plan("train", 400, 0, now=0.0)       # 100 + 800 s
    assert not ok.fails and ok.run_s == 900.0
    killed = backend.plan("train", 500, 0, now=0.0)   # 100 + 1000 s > 1000
    assert killed.fails and killed.killed and killed.run_s == 1000.0
    assert killed.transfer_out_s == 0.0


def test_the_per_user_job_limit_holds_a_job_until_one_ends():
    backend = _backend(queue_model="lognormal", queue_median_s=0.0, latency_s=0.0,
                       max_jobs=2)
    a = backend.plan("train", 50, 0, now=0.0)   # 200 s
    b = backend.plan("train", 100, 0, now=0.0)  # 300 s
    c = backend.plan("train", 10, 0, now=0.0)   # held until a ends at 200
    assert a.held_s == b.held_s == 0.0
    assert c.held_s == pytest.approx(200.0) and c.queue_wait_s == pytest.approx(200.0)
    d = backend.plan("train", 10, 0, now=250.0)  # a has ended; b (300) and c (320) run
    assert d.held_s == pytest.approx(50.0)


def test_bad_trace_configs_name_the_key():
    from flwr_hpc.compute.sim import make_replay
    from flwr_hpc.config import load_federation
    from flwr_hpc.errors import ConfigError

    with pytest.raises(ConfigError, match=r"sites.mira.compute.sim.trace.*Mira-2018"):
        make_replay("mira", {**SIM, "trace": "Mira-1999"})
    with pytest.raises(ConfigError, match=r"sites.mira.compute.sim.trace"):
        load_federation(["federation=sim_doe_traces", "sites.mira.compute.sim.trace=null"])
    with pytest.raises(ConfigError, match=r"sites.mira.compute.sim.replay"):
        load_federation(["federation=sim_doe_traces", "sites.mira.compute.sim.replay=random"])
    fed = load_federation(["federation=sim_doe_traces"])
    assert [s.nodes_per_job() for s in fed.sites] == [512, 128, 8, 512]
