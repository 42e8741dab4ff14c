"""Checkpoint and resume for ServerApps that run Flower strategies.

:func:`flwr_hpc.strategy.rounds.start` (a drop-in for ``strategy.start(...)``) writes one of these
after every completed round and, when the run directory already holds one -- ``flwr-hpc
resume RUN``, or an HPC SuperLink restarted after the runner died --, continues from the
last completed round; a resumed run ends with the same global model as an uninterrupted
one.

A checkpoint holds what the next round depends on:

* the global arrays;
* the strategy's state, found by walking the strategy object (and wrapped strategies, e.g.
  Flower's DP wrappers): arrays and dicts/lists of arrays (FedOpt's ``m_t``/``v_t``,
  FedAvgM's momentum), ``ArrayRecord``s, scalars, and objects with ``state_dict`` /
  ``load_state_dict`` (Flower's privacy accountant);
* every node's ``Context`` (client state such as an Opacus accountant lives there);
* the server's RNG states (Python ``random`` -- Flower samples nodes with it --, NumPy's
  global generator -- Flower's central DP noise --, and torch's when loaded);
* the round number.

Format: ``<run_dir>/checkpoint/round-<r>/`` with ``state.json``, ``arrays.npz`` (read with
``allow_pickle=False``), ``contexts/<node_id>.pb`` and a ``manifest.json`` of sha256 sums.
It is written to a temporary directory, fsynced, renamed into place, and only then named
in ``checkpoint/LATEST`` (also replaced atomically); a checkpoint that fails verification
is skipped for the previous one. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("flwr_hpc")

CHECKPOINT_DIR = "checkpoint"
KEEP = 2
FORMAT = 1


# ----------------------------------------------------------------------------- state walk


def _is_array_dict(value: Any) -> bool:
    return (isinstance(value, dict) and bool(value)
            and all(isinstance(k, str) for k in value)
            and all(isinstance(v, np.ndarray) for v in value.values()))


def _is_array_list(value: Any) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(v, np.ndarray) for v in value))


class CheckpointStateError(ValueError):
    """A strategy attribute the checkpoint can neither save nor recognise as
    configuration; its message names the attribute and says what to do.
    """


def _json_encode(value: Any, key: str) -> Any:
    """JSON for scalars, lists, tuples, sets and dicts of them (dict keys of any scalar
    type kept: stored as pairs); raises :class:`CheckpointStateError` otherwise.
    """
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, list | tuple):
        return {"list" if isinstance(value, list) else "tuple":
                [_json_encode(v, key) for v in value]}
    if isinstance(value, set | frozenset):
        return {"set": [_json_encode(v, key) for v in sorted(value, key=repr)]}
    if isinstance(value, dict):
        return {"dict": [[_json_encode(k, key), _json_encode(v, key)]
                         for k, v in value.items()]}
    raise CheckpointStateError(
        f"checkpoint: cannot save strategy attribute {key} ({type(value).__name__}): give "
        "it state_dict()/load_state_dict(), or list it in the strategy's "
        "`checkpoint_transient` if it is per-process state a resumed run rebuilds")


def _json_decode(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    (kind, items), = value.items()
    if kind == "dict":
        return {_json_decode(k): _json_decode(v) for k, v in items}
    decoded = [_json_decode(v) for v in items]
    return {"list": list, "tuple": tuple, "set": set}[kind](decoded)


def _configuration(value: Any) -> bool:
    """Callables, classes, modules and loggers configure a strategy; they are not state
    (the resumed run builds them again from its config).
    """
    import types

    return callable(value) or isinstance(value, type | types.ModuleType | logging.Logger)


def through(obj: Any) -> Any:
    """A transparent wrapper (``checkpoint_through = "strategy"``) is checkpointed as the
    strategy it wraps, so wrapping does not change the checkpoint's layout.
    """
    while getattr(type(obj), "checkpoint_through", None):
        obj = getattr(obj, type(obj).checkpoint_through)
    return obj


def capture_state(obj: Any, arrays: dict[str, np.ndarray], prefix: str = "s") -> dict:
    """The restorable state of a strategy object: JSON meta + arrays added to ``arrays``.
    Every attribute is saved, skipped as configuration (callables, classes, loggers) or as
    declared per-process state (the class's ``checkpoint_transient``), or refused with
    :class:`CheckpointStateError` naming it: nothing is dropped silently.
    """
    from flwr.app import ArrayRecord
    from flwr.serverapp.strategy import Strategy

    obj = through(obj)
    transient = set(getattr(type(obj), "checkpoint_transient", ()))
    meta: dict[str, Any] = {}
    for name, value in vars(obj).items():
        key = f"{prefix}.{name}"
        if name in transient:
            continue
        if isinstance(value, bool | int | float | str) or value is None:
            meta[name] = {"kind": "scalar", "value": value}
        elif isinstance(value, np.ndarray):
            arrays[key] = value
            meta[name] = {"kind": "ndarray"}
        elif _is_array_dict(value):
            keys = list(value)
            for i, k in enumerate(keys):
                arrays[f"{key}/{i}"] = value[k]
            meta[name] = {"kind": "ndarray-dict", "keys": keys}
        elif _is_array_list(value):
            for i, v in enumerate(value):
                arrays[f"{key}/{i}"] = v
            meta[name] = {"kind": "ndarray-list", "n": len(value)}
        elif isinstance(value, ArrayRecord):
            keys = list(value.keys())
            for i, k in enumerate(keys):
                arrays[f"{key}/{i}"] = value[k].numpy()
            meta[name] = {"kind": "array-record", "keys": keys}
        elif isinstance(value, Strategy):
            meta[name] = {"kind": "strategy", "value": capture_state(value, arrays, key)}
        elif callable(getattr(value, "state_dict", None)) and callable(
                getattr(value, "load_state_dict", None)) and not isinstance(value, type):
            state = value.state_dict()
            json.dumps(state)  # only JSON state is kept (Flower's accountant is)
            meta[name] = {"kind": "state-dict", "value": state}
        elif _configuration(value):
            continue
        else:
            meta[name] = {"kind": "json", "value": _json_encode(value, key)}
    return meta


def restore_state(obj: Any, meta: dict, arrays: dict[str, np.ndarray], prefix: str = "s"
                  ) -> None:
    """Set the state that :func:`capture_state` returned as ``meta`` (with its
    ``arrays``) back on the strategy object ``obj``, nested strategies included.
    """
    from flwr.app import Array, ArrayRecord

    obj = through(obj)
    for name, item in meta.items():
        key = f"{prefix}.{name}"
        kind = item["kind"]
        if kind == "scalar":
            value: Any = item["value"]
        elif kind == "json":
            value = _json_decode(item["value"])
        elif kind == "ndarray":
            value = arrays[key]
        elif kind == "ndarray-dict":
            value = {k: arrays[f"{key}/{i}"] for i, k in enumerate(item["keys"])}
        elif kind == "ndarray-list":
            value = [arrays[f"{key}/{i}"] for i in range(item["n"])]
        elif kind == "array-record":
            value = ArrayRecord({k: Array(arrays[f"{key}/{i}"])
                                 for i, k in enumerate(item["keys"])})
        elif kind == "strategy":
            restore_state(getattr(obj, name), item["value"], arrays, key)
            continue
        elif kind == "state-dict":
            getattr(obj, name).load_state_dict(item["value"])
            continue
        else:
            raise ValueError(f"checkpoint: unknown state kind {kind!r} for {key}")
        setattr(obj, name, value)


def capture_rng(arrays: dict[str, np.ndarray]) -> dict:
    """The RNG states of Python's ``random``, NumPy's global generator and (when loaded)
    torch: JSON meta returned, state arrays added to ``arrays``.
    """
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    arrays["rng.numpy"] = np_state[1]
    out = {"python": [version, list(internal), gauss],
           "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    if "torch" in sys.modules:
        arrays["rng.torch"] = sys.modules["torch"].random.get_rng_state().numpy()
        out["torch"] = True
    return out


def restore_rng(meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """Set the RNG states that :func:`capture_rng` saved (torch's only if it is loaded)."""
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, arrays["rng.numpy"], pos, has_gauss, cached))
    if meta.get("torch") and "torch" in sys.modules:
        torch = sys.modules["torch"]
        torch.random.set_rng_state(torch.from_numpy(arrays["rng.torch"].copy()))


# ----------------------------------------------------------------------------- files


@dataclass
class Checkpoint:
    """One completed round's checkpoint: the global arrays, the strategy's and the RNGs'
    state (JSON meta, plus ``state_arrays``), every node's serialized ``Context``, any
    ``extra`` JSON, and ``path``, the directory it was read from.
    """

    round: int
    arrays: Any                    # ArrayRecord: the global model after ``round``
    strategy: dict = field(default_factory=dict)
    rng: dict = field(default_factory=dict)
    contexts: dict[int, bytes] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    state_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    path: Path | None = None


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(root: Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` under ``root`` atomically; return its directory."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round-{ckpt.round}"
    tmp = root / f".tmp-round-{ckpt.round}-{uuid.uuid4().hex[:8]}"
    try:
        arrays = dict(ckpt.state_arrays)
        keys = list(ckpt.arrays.keys())
        for i, k in enumerate(keys):
            arrays[f"global/{i}"] = ckpt.arrays[k].numpy()
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        _write(tmp / "arrays.npz", buf.getvalue())
        for node_id, data in ckpt.contexts.items():
            _write(tmp / "contexts" / f"{int(node_id)}.pb", data)
        state = {"format": FORMAT, "round": ckpt.round, "global_keys": keys,
                 "strategy": ckpt.strategy, "rng": ckpt.rng, "extra": ckpt.extra,
                 "contexts": sorted(int(n) for n in ckpt.contexts)}
        _write(tmp / "state.json", json.dumps(state).encode())
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {str(p.relative_to(tmp)): _sha256_file(p) for p in files}
        _write(tmp / "manifest.json", json.dumps(manifest, indent=1).encode())
        _fsync_dir(tmp)
        if final.exists():  # a previous attempt at this round (e.g. resumed twice)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _write(root / ".LATEST.tmp", final.name.encode())
        os.replace(root / ".LATEST.tmp", root / "LATEST")
        _fsync_dir(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    rounds = sorted((int(p.name.split("-")[1]) for p in root.glob("round-*")), reverse=True)
    for r in rounds[KEEP:]:
        shutil.rmtree(root / f"round-{r}", ignore_errors=True)
    return final


def _read_checkpoint(path: Path) -> Checkpoint:
    from flwr.app import Array, ArrayRecord

    manifest = json.loads((path / "manifest.json").read_text())
    for rel, digest in manifest.items():
        if _sha256_file(path / rel) != digest:
            raise ValueError(f"{path / rel} fails its sha256 check")
    state = json.loads((path / "state.json").read_text())
    if state.get("format") != FORMAT:
        raise ValueError(f"checkpoint format {state.get('format')!r} not understood")
    with np.load(path / "arrays.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    global_arrays = ArrayRecord({k: Array(arrays.pop(f"global/{i}"))
                                 for i, k in enumerate(state["global_keys"])})
    contexts = {n: (path / "contexts" / f"{n}.pb").read_bytes() for n in state["contexts"]}
    return Checkpoint(round=int(state["round"]), arrays=global_arrays,
                      strategy=state["strategy"], rng=state["rng"], contexts=contexts,
                      extra=state.get("extra", {}), state_arrays=arrays, path=path)


def load_checkpoint(root: Path) -> Checkpoint | None:
    """The newest checkpoint under ``root`` that verifies, or None."""
    if not root.is_dir():
        return None
    candidates = []
    latest = root / "LATEST"
    if latest.exists():
        candidates.append(root / latest.read_text().strip())
    candidates += sorted(root.glob("round-*"), key=lambda p: int(p.name.split("-")[1]),
                         reverse=True)
    for path in dict.fromkeys(candidates):
        try:
            return _read_checkpoint(path)
        except (OSError, ValueError, KeyError) as err:
            log.warning("checkpoint %s is unusable (%s); trying an older one", path, err)
    return None
