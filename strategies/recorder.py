"""Per-round bookkeeping: ``metrics.jsonl``, saved global adapters and the round table.

:class:`RoundRecorder` attaches to any Flower strategy (FedAvg, FedProx, the DP wrappers,
...) by wrapping its ``aggregate_train`` / ``aggregate_evaluate`` on the instance, and
provides the ``evaluate_fn`` that Flower's ``Strategy.start`` calls at the end of every
round (and once for round 0, before training). At that point the round is complete, so
the recorder then

1. saves the global adapter (through ``save_fn``) as ``global/round-<r>/``;
2. runs the central evaluation (``central_fn``), if any;
3. appends one JSON object to ``metrics.jsonl`` and logs a table row.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import Strategy

from flwr_hpc.server.telemetry import allocation_summary, human_bytes, human_seconds
from flwr_hpc.server.timing import timings_of, transport_of
from strategies.metered_grid import MeteredGrid

log = logging.getLogger("flwr")

class RoundRecorder:
    def __init__(self, out_dir: Path, grid: MeteredGrid, *,
                 save_fn: Callable[[ArrayRecord, Path], None] | None = None,
                 central_fn: Callable[[ArrayRecord], dict[str, float]] | None = None,
                 extra_fn: Callable[[dict[str, float]], dict[str, Any]] | None = None,
                 score_key: str = "exact_match", save_client_updates: bool = False,
                 clock_fn: Callable[[], float] | None = None,
                 on_row: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.grid = grid
        self.save_fn = save_fn
        self.central_fn = central_fn
        self.extra_fn = extra_fn
        self.score_key = score_key
        self.save_client_updates = save_client_updates
        self.rows: list[dict[str, Any]] = []
        self._train: dict[str, float] = {}
        self._evaluate: dict[str, float] = {}
        self._round_started = time.perf_counter()
        # the grid's clock (virtual under the site simulator): clock_s of every row
        self.clock_fn = clock_fn or time.time
        self._clock_origin = self.clock_fn()
        self.on_row = on_row  # e.g. a tracker and the model card, after the row is written

    def attach(self, strategy: Strategy) -> RecordingStrategy:
        """``strategy`` wrapped so that this recorder sees what it aggregates."""
        return RecordingStrategy(strategy, self)

    def record_train(self, server_round: int, replies: Iterable[Message],
                     seen: dict[str, int]) -> Iterator[Message]:
        """Pass the train replies through, counting (and saving) the good ones: one at a
        time, so a streaming strategy stays O(model)."""
        for m in replies:
            if not m.has_error():
                seen["ok"] += 1
                if self.save_client_updates:
                    self._save_updates(server_round, [m])
            yield m

    def train_aggregated(self, metrics: Any, ok_replies: int) -> None:
        self._train = dict(metrics or {})
        # scheduler-aware strategies pull their own replies and report how many
        self._train["replies"] = ok_replies or int(self._train.get("updates", 0))

    def evaluate_aggregated(self, metrics: Any) -> None:
        self._evaluate = dict(metrics or {})

    def evaluate_fn(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        adapter_dir = self.out_dir / "global" / f"round-{server_round}"
        if self.save_fn is not None:
            self.save_fn(arrays, adapter_dir)
        central = self.central_fn(arrays) if self.central_fn is not None else {}
        moved = self.grid.take()
        train_messages = moved.get("sent_train_messages", 0)
        now = time.perf_counter()
        row: dict[str, Any] = {
            "round": server_round,
            "train_loss": self._train.get("train_loss"),
            "eval_loss": central.get("eval_loss", self._evaluate.get("eval_loss")),
            self.score_key: central.get(self.score_key, self._evaluate.get(self.score_key)),
            "federated_eval_loss": self._evaluate.get("eval_loss"),
            f"federated_{self.score_key}": self._evaluate.get(self.score_key),
            "round_time_s": round(now - self._round_started, 3),
            "clock_s": round(self.clock_fn() - self._clock_origin, 3),
            "bytes_sent": moved.get("sent_bytes", 0),
            "bytes_received": moved.get("received_bytes", 0),
            "train_message_bytes": (moved.get("sent_train_bytes", 0) // train_messages
                                    if train_messages else None),
            "train_replies": self._train.pop("replies", None),
            "tokens_per_s": self._train.get("tokens_per_s"),
            "train_metrics": self._train,
            "evaluate_metrics": self._evaluate,
            "adapter_dir": str(adapter_dir) if self.save_fn is not None else None,
        }
        if self.extra_fn is not None:
            row.update(self.extra_fn(self._train))
        timings = timings_of(self.grid)  # where the round's time went, per site
        row["sites"] = timings.round_breakdown(server_round) if timings is not None else {}
        self._write_row(row)
        self.rows.append(row)
        if self.on_row is not None:
            self.on_row(row)
        if len(self.rows) == 1:
            log.info("%s", self.header())  # each line its own record: all lines aligned
        log.info("%s", self.format_row(row))
        self._train, self._evaluate = {}, {}
        self._round_started = time.perf_counter()
        metrics = {k: float(v) for k, v in central.items() if isinstance(v, int | float)}
        return MetricRecord(metrics) if metrics else None

    def _write_row(self, row: dict[str, Any]) -> None:
        """Add the round's row to ``metrics.jsonl``, replacing rows of this round or later:
        those were written before a kill that came ahead of the round's checkpoint, and the
        resumed run is doing the round again. Written to a temporary file and renamed, so
        a kill leaves either the old file or the new one."""
        kept = []
        if self.metrics_path.exists():
            for line in self.metrics_path.read_text().splitlines():
                try:
                    earlier = json.loads(line)
                except json.JSONDecodeError:  # a torn last line
                    continue
                if int(earlier.get("round", -1)) < int(row["round"]):
                    kept.append(line + "\n")
        tmp = self.metrics_path.with_name(self.metrics_path.name + ".tmp")
        tmp.write_text("".join(kept) + json.dumps(row) + "\n")
        os.replace(tmp, self.metrics_path)

    def _save_updates(self, server_round: int, replies) -> None:
        """Each client's returned arrays, for offline checks of the aggregation."""
        from safetensors.numpy import save_file

        where = self.out_dir / "updates" / f"round-{server_round}"
        where.mkdir(parents=True, exist_ok=True)
        for m in replies:
            if m.has_error():
                continue
            arrays = next(iter(m.content.array_records.values()))
            metrics = next(iter(m.content.metric_records.values()), {})
            save_file({k: np.ascontiguousarray(a.numpy()) for k, a in arrays.items()},
                      str(where / f"{m.metadata.src_node_id}.safetensors"),
                      metadata={"num-examples": str(metrics.get("num-examples", 0))})

    # -- table
    COLUMNS = (("round", 5), ("train_loss", 10), ("eval_loss", 9), ("score", 11),
               ("time_s", 7), ("moved", 10))

    def header(self) -> str:
        names = [self.score_key if n == "score" else n for n, _ in self.COLUMNS]
        return "  ".join(f"{n:>{w}}" for n, (_, w) in zip(names, self.COLUMNS, strict=True))

    def format_row(self, row: dict[str, Any]) -> str:
        values = [row["round"], row["train_loss"], row["eval_loss"], row[self.score_key],
                  row["round_time_s"], human_bytes(row["bytes_sent"] + row["bytes_received"])]
        cells = []
        for (name, width), value in zip(self.COLUMNS, values, strict=True):
            if value is None or (isinstance(value, float) and math.isnan(value)):
                text = "-"
            elif name == "time_s":
                text = f"{float(value):.1f}"
            elif isinstance(value, float):
                text = f"{value:.4f}"
            else:
                text = str(value)
            cells.append(f"{text:>{max(width, len(self.score_key) if name == 'score' else 0)}}")
        return "  ".join(cells)

    def table(self) -> str:
        return "\n".join([self.header()] + [self.format_row(r) for r in self.rows])

    # -- the closing summary
    def summary(self, *, run_id: int | str, wall_s: float, final_dir: Path | None) -> list[str]:
        """The lines that close a run: rounds, best and final evaluation, wall time,
        bytes per direction, where the outputs are and what to run next."""
        rows = self.rows
        trained = [r for r in rows if r["round"] > 0]
        lines = [f"run {run_id}: {len(trained)} round(s) in {human_seconds(wall_s)}"]
        scored = [r for r in rows if r.get("eval_loss") is not None]
        if scored:
            best = min(scored, key=lambda r: r["eval_loss"])
            last = scored[-1]
            first = scored[0]
            lines.append(f"  eval_loss   {first['eval_loss']:.4f} (round {first['round']}) -> "
                         f"{last['eval_loss']:.4f} (round {last['round']}); best "
                         f"{best['eval_loss']:.4f} (round {best['round']})")
            if last.get(self.score_key) is not None:
                top = max((r for r in scored if r.get(self.score_key) is not None),
                          key=lambda r: r[self.score_key])
                lines.append(f"  {self.score_key:<11} {last[self.score_key]:.4f} final; best "
                             f"{top[self.score_key]:.4f} (round {top['round']})")
        spent = next((r for r in reversed(rows) if r.get("epsilon") is not None), None)
        if spent is not None:
            lines.append(f"  privacy     {spent['dp']}: epsilon {spent['epsilon']:.3f} at delta "
                         f"{spent['delta']:g} (round {spent['round']})")
        sent = sum(r["bytes_sent"] for r in rows)
        received = sum(r["bytes_received"] for r in rows)
        lines.append(f"  moved       {human_bytes(sent)} to sites, {human_bytes(received)} "
                     "back")
        transport = transport_of(self.grid)
        if transport is not None and getattr(transport, "task_log", None) is not None:
            lines.append(f"  charged     {allocation_summary(transport.task_log.records)}")
        if final_dir is not None:
            lines.append(f"  adapter     {final_dir}  (peft.PeftModel.from_pretrained(base, "
                         "path))")
        lines.append(f"  metrics     {self.metrics_path}")
        lines.append(f"  next        flwr log {run_id} hpc  |  flwr pull {run_id} hpc  |  "
                     "flwr-hpc status")
        return lines


class RecordingStrategy(Strategy):
    """``strategy`` with its train and evaluate aggregates reported to a
    :class:`RoundRecorder` (for ``metrics.jsonl`` and the round table). A wrapper, as
    Flower's DP strategies are: it holds ``strategy`` and delegates every call, the wrapped
    strategy is not modified, and anything else (``streaming``, ``privacy_spent``...) is
    read from it. Checkpoints see through it (``checkpoint_through``)."""

    checkpoint_through = "strategy"

    def __init__(self, strategy: Strategy, recorder: RoundRecorder) -> None:
        self.strategy = strategy
        self.recorder = recorder

    def __getattr__(self, name: str) -> Any:  # streaming, privacy_spent, weighted_by_key...
        if name in ("strategy", "recorder"):
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def configure_train(self, server_round, arrays, config, grid):
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        seen = {"ok": 0}
        arrays, metrics = self.strategy.aggregate_train(
            server_round, self.recorder.record_train(server_round, replies, seen))
        self.recorder.train_aggregated(metrics, seen["ok"])
        return arrays, metrics

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        metrics = self.strategy.aggregate_evaluate(server_round, replies)
        self.recorder.evaluate_aggregated(metrics)
        return metrics

    def summary(self) -> None:
        self.strategy.summary()
