"""Experiment tracking where users already look: TensorBoard, MLflow, Weights & Biases.

:func:`open_tracker` returns a :class:`Tracker` that logs one step per round -- the round's
metrics (flat ``{name: number}``, e.g. ``train/loss``, ``eval/exact_match``) and the
per-site timing breakdown (``site/<name>/queue_wait_s``, ``run_s``, ``transfer_s``,
``turnaround_s``) -- with nothing leaving the machine unless the user points it elsewhere:

``tensorboard``
    event files under ``<out>/tensorboard/`` (``tensorboard --logdir <out>/tensorboard``);
    written with ``torch.utils.tensorboard`` (needs the ``tensorboard`` package).
``mlflow``
    a local file store ``<out>/mlruns`` by default (``mlflow ui --backend-store-uri
    <out>/mlruns``), or ``uri`` (``output.tracking_uri``, e.g. an MLflow server); the run is
    named ``run-<id>``, the job config goes in as params. MLflow 3 keeps its file store in
    maintenance mode and refuses it unless ``MLFLOW_ALLOW_FILE_STORE`` is set: flwr-hpc sets
    it for a ``file:`` URI only (a user's own setting is kept).
``wandb``
    W&B in offline mode under ``<out>/wandb/`` (``wandb sync <out>/wandb/offline-run-*``
    uploads it later from a machine with a network path); online only if the user sets
    ``WANDB_MODE=online`` themselves. No credentials are read or written by flwr-hpc.

Each library is imported only when chosen; a missing one is a clear error naming the
package to install (``pip install 'flwr-hpc[track]'``).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from flwr_hpc.errors import ConfigError

TRACKERS = ("none", "tensorboard", "mlflow", "wandb")
_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny (or mlflow)",
             "wandb": "wandb"}


class Tracker(Protocol):
    """Logs a step of numbers per round; closed once at the end."""

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """Log ``values`` at ``step`` (the server round)."""

    def close(self) -> None:
        """Flush and close (the run finished, failed or stopped)."""


def flat_numbers(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1.0}``; only finite numbers (not bools) kept."""
    out: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_numbers(value, f"{name}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(
                value):
            out[name] = float(value)
    return out


class _NoTracker:
    def log(self, step: int, values: Mapping[str, float]) -> None:
        """Nothing to log to."""

    def close(self) -> None:
        """Nothing to close."""


class TensorBoardTracker:
    """Scalars in TensorBoard event files."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """One scalar per value, at ``step``."""
        for key, value in values.items():
            self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()


class MlflowTracker:
    """An MLflow run (experiment ``flwr-hpc``) with the job as params."""

    def __init__(self, uri: str, run_name: str, params: Mapping[str, Any]) -> None:
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self._client = MlflowClient(tracking_uri=uri)
        experiment = self._client.get_experiment_by_name("flwr-hpc")
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self._client.create_experiment("flwr-hpc"))
        self.run_id = self._client.create_run(
            experiment_id, run_name=run_name, tags={"flwr-hpc.run": run_name}).info.run_id
        items = [Param(k[:250], str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self._client.log_batch(self.run_id, params=items[i:i + 100])

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """One metric per value, at ``step``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self._client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def close(self) -> None:
        """Mark the run finished."""
        self._client.set_terminated(self.run_id)


class WandbTracker:
    """A W&B run, offline unless the user's own ``WANDB_MODE`` says otherwise."""

    def __init__(self, out_dir: Path, run_name: str, config: Mapping[str, Any]) -> None:
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        out_dir.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(mode=os.environ.get("WANDB_MODE", "offline"), dir=str(out_dir),
                               project=os.environ.get("WANDB_PROJECT", "flwr-hpc"),
                               name=run_name, config=dict(config), reinit="create_new")
        self.dir = Path(self._run.dir).parent  # .../wandb/offline-run-<time>-<id>

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """One history row at ``step``."""
        self._run.log(dict(values), step=step)

    def close(self) -> None:
        """Finish the run (writes the offline run's last records) and stop W&B's
        service process (one run per runner process: nothing else uses it).
        """
        import wandb

        self._run.finish()
        wandb.teardown()


class _Trackers:
    """Several trackers as one (``output.tracker: [tensorboard, mlflow]``)."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """Log to each."""
        for tracker in self.trackers:
            tracker.log(step, values)

    def close(self) -> None:
        """Close each (all of them, even if one fails)."""
        errors = []
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as err:  # noqa: BLE001 - close the others, then report
                errors.append(err)
        if errors:
            raise errors[0]


def open_tracker(kind: str | list[str], out_dir: Path, *, run_name: str,
                 params: Mapping[str, Any] | None = None, uri: str | None = None) -> Tracker:
    """The tracker ``kind`` (one of :data:`TRACKERS`, or a list of them) writing under
    ``out_dir``.
    """
    if not isinstance(kind, str):
        opened: list[Tracker] = []
        try:
            for one in kind:
                opened.append(open_tracker(one, out_dir, run_name=run_name, params=params,
                                           uri=uri))
        except BaseException:
            _Trackers(opened).close()
            raise
        return _Trackers(opened)
    if kind not in TRACKERS:
        raise ConfigError("job", "output.tracker",
                          f"{kind!r} is not a tracker; choose one of {', '.join(TRACKERS)}")
    if kind == "none":
        return _NoTracker()
    params = dict(params or {})
    try:
        if kind == "tensorboard":
            return TensorBoardTracker(out_dir / "tensorboard")
        if kind == "mlflow":
            return MlflowTracker(uri or f"file://{(out_dir / 'mlruns').resolve()}", run_name,
                                 params)
        return WandbTracker(out_dir, run_name, params)
    except ImportError as err:
        raise ConfigError("job", "output.tracker",
                          f"{kind} needs the {_PACKAGES[kind]} package ({err}); install "
                          "it, e.g. pip install 'flwr-hpc[track]'") from None
