"""Regenerate the queue-wait traces the site simulator ships (``flwr_hpc/compute/traces``).

Reads the compact CSVs of ``shared/traces`` (``submit_s,wait_s,run_s,procs,queue``; see
their README/NOTICE) and writes, per DOE trace, ``<name>.csv.gz`` with

    submit_s  seconds since the trace's first submission (int)
    wait_s    queue wait, seconds (int)
    run_s     run time, seconds (int)
    nodes     job size in nodes (Intrepid's procs are cores: 4 per Blue Gene/P node)

sorted by submission (the first submission's epoch is in ``SOURCES.json``); plus
``NOTICE.txt`` (the citation and licence notes, copied) and ``SOURCES.json`` (per trace:
the source file's sha256, job count, dates). Usage::

    python scripts/make_traces.py ../shared/traces
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "flwr_hpc" / "compute" / "traces"
# name -> (system, cores per node in the source's procs column; 1 = already nodes)
TRACES = {
    "Mira-2018": ("ALCF Mira Blue Gene/Q (Cobalt), ALCF public job logs", 1),
    "Theta-2022": ("ALCF Theta Cray XC40 (Cobalt), ALCF public job logs", 1),
    "ThetaGPU-2023": ("ALCF ThetaGPU DGX-A100 (Cobalt), ALCF public job logs", 1),
    "ANL-Intrepid-2009": ("ANL Intrepid Blue Gene/P (Cobalt), Parallel Workloads Archive", 4),
}


def convert(src: Path, cores_per_node: int) -> tuple[bytes, dict]:
    rows = []
    with gzip.open(src, "rt", newline="") as f:
        for r in csv.DictReader(f):
            wait, run, procs = float(r["wait_s"]), float(r["run_s"]), float(r["procs"])
            if wait < 0 or run <= 0 or procs <= 0:
                continue
            rows.append((int(float(r["submit_s"])), int(round(wait)), int(round(run)),
                         max(1, int(round(procs / cores_per_node)))))
    rows.sort(key=lambda x: x[0])
    t0 = rows[0][0]
    text = io.StringIO()
    text.write("submit_s,wait_s,run_s,nodes\n")
    for s, w, r, n in rows:
        text.write(f"{s - t0},{w},{r},{n}\n")
    data = gzip.compress(text.getvalue().encode(), compresslevel=9, mtime=0)
    info = {"jobs": len(rows), "first_submit_epoch": t0,
            "source_sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
            "first_submit": datetime.fromtimestamp(t0, UTC).isoformat(),
            "last_submit": datetime.fromtimestamp(rows[-1][0], UTC).isoformat()}
    return data, info


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    src_dir = Path(argv[0])
    OUT.mkdir(parents=True, exist_ok=True)
    sources = {}
    for name, (system, cpn) in TRACES.items():
        data, info = convert(src_dir / f"{name}.csv.gz", cpn)
        (OUT / f"{name}.csv.gz").write_bytes(data)
        # all four are at Argonne (America/Chicago); standard time, DST ignored
        sources[name] = {"system": system, "cores_per_node": cpn, "utc_offset_h": -6, **info,
                         "bytes": len(data)}
        print(f"{name}: {info['jobs']} jobs, {len(data)} bytes")
    (OUT / "SOURCES.json").write_text(json.dumps(sources, indent=1, sort_keys=True) + "\n")
    (OUT / "NOTICE.txt").write_text((src_dir / "NOTICE.txt").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
