"""Checkpoint files: complete state, atomic writes, verified reads (no training needed)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from flwr_hpc.strategy import checkpoint as ck


def _dp_fedadam_and_fedavg():
    from flwr.serverapp.strategy import (
        DifferentialPrivacyServerSideFixedClipping,
        FedAdam,
        FedAvg,
    )
    from flwr.supercore.privacy_accounting import (
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    def accountant():
        return RdpAccountant(PrivacyConfig(
            target_delta=1e-5, population_size=4,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION))

    dp = DifferentialPrivacyServerSideFixedClipping(
        FedAvg(), noise_multiplier=1.0, clipping_norm=1.0, num_sampled_clients=4,
        accountant=accountant())
    return FedAdam(), dp, accountant


def _array_record(seed: int):
    from flwr.app import Array, ArrayRecord

    rng = np.random.default_rng(seed)
    return ArrayRecord({"a": Array(rng.normal(size=(3, 2)).astype(np.float32)),
                        "b": Array(rng.normal(size=4).astype(np.float32))})


def test_strategy_state_round_trips_moments_wrapped_state_and_accountant(tmp_path):
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

    fedadam, dp, _ = _dp_fedadam_and_fedavg()
    fedadam.current_arrays = {"a": np.ones(3), "b": np.zeros(2)}
    fedadam.m_t = {"a": np.full(3, 0.5), "b": np.full(2, -1.0)}
    fedadam.v_t = {"a": np.full(3, 0.25), "b": np.full(2, 4.0)}
    dp.current_arrays = _array_record(1)
    dp.accountant.compose(GaussianPrivacyEvent(noise_multiplier=1.0, sample_size=4,
                                               population_size=4), count=3)
    eps = dp.accountant.get_epsilon(1e-5)

    arrays: dict = {}
    meta = {"fedadam": ck.capture_state(fedadam, arrays, "x"),
            "dp": ck.capture_state(dp, arrays, "y")}
    json.dumps(meta)  # plain JSON plus arrays: nothing pickled
    fresh_adam, fresh_dp, _ = _dp_fedadam_and_fedavg()
    ck.restore_state(fresh_adam, meta["fedadam"], arrays, "x")
    ck.restore_state(fresh_dp, meta["dp"], arrays, "y")
    for name in ("current_arrays", "m_t", "v_t"):
        got, want = getattr(fresh_adam, name), getattr(fedadam, name)
        assert got.keys() == want.keys()
        assert all(np.array_equal(got[k], want[k]) for k in want)
    assert fresh_dp.accountant.get_epsilon(1e-5) == pytest.approx(eps, rel=1e-12)
    assert fresh_dp.accountant.num_releases == 3
    assert all(np.array_equal(fresh_dp.current_arrays[k].numpy(),
                              dp.current_arrays[k].numpy()) for k in ("a", "b"))
    assert fresh_dp.strategy.fraction_train == dp.strategy.fraction_train


def test_rng_state_is_restored_exactly():
    arrays: dict = {}
    random.seed(3)
    np.random.seed(4)
    meta = ck.capture_rng(arrays)
    want = (random.random(), np.random.normal(size=3))
    random.seed(99)
    np.random.seed(99)
    ck.restore_rng(json.loads(json.dumps(meta)), arrays)
    got = (random.random(), np.random.normal(size=3))
    assert got[0] == want[0] and np.array_equal(got[1], want[1])


def _ckpt(rnd: int) -> ck.Checkpoint:
    return ck.Checkpoint(round=rnd, arrays=_array_record(rnd), strategy={}, rng={},
                         contexts={7: b"ctx-7-%d" % rnd, 9: b"ctx-9"})


def test_checkpoints_are_atomic_verified_and_fall_back_when_corrupted(tmp_path, monkeypatch):
    root = tmp_path / "checkpoint"
    for r in (1, 2, 3):
        ck.write_checkpoint(root, _ckpt(r))
    assert sorted(p.name for p in root.glob("round-*")) == ["round-2", "round-3"]  # KEEP=2
    assert (root / "LATEST").read_text() == "round-3"
    got = ck.load_checkpoint(root)
    assert got.round == 3 and got.contexts == {7: b"ctx-7-3", 9: b"ctx-9"}
    assert np.array_equal(got.arrays["a"].numpy(), _array_record(3)["a"].numpy())

    # a flipped byte in the newest checkpoint: it is refused, the previous one is used
    npz = root / "round-3" / "arrays.npz"
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 0xFF
    npz.write_bytes(bytes(data))
    assert ck.load_checkpoint(root).round == 2

    # a write that dies half-way (disk full) leaves no round-4 and LATEST untouched
    calls = {"n": 0}
    real = ck._write

    def failing(path, payload):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        real(path, payload)

    monkeypatch.setattr(ck, "_write", failing)
    with pytest.raises(OSError, match="No space"):
        ck.write_checkpoint(root, _ckpt(4))
    assert not (root / "round-4").exists() and not list(root.glob(".tmp-*"))
    assert (root / "LATEST").read_text() == "round-3"


def test_strategy_state_is_saved_or_refused_never_dropped():
    """Containers of scalars round-trip (int keys, tuples and sets kept); an object the
    checkpoint cannot save is refused naming the attribute; a strategy's declared
    per-process state is skipped; wrappers are checkpointed as what they wrap."""
    from flwr.serverapp.strategy import FedAvg

    from flwr_hpc.strategy.checkpoint import CheckpointStateError, capture_state, restore_state
    from strategies.recorder import RecordingStrategy

    strategy = FedAvg()
    strategy.budgets = {7: (3, 0.5), 9: (1, 1.0)}
    strategy.seen = {"a", "b"}
    arrays: dict[str, np.ndarray] = {}
    meta = capture_state(strategy, arrays)
    fresh = FedAvg()
    restore_state(fresh, meta, arrays)
    assert fresh.budgets == {7: (3, 0.5), 9: (1, 1.0)} and fresh.seen == {"a", "b"}

    wrapped = RecordingStrategy(strategy, recorder=None)
    assert capture_state(wrapped, {}) == meta  # same layout as the bare strategy

    class Opaque:
        pass

    strategy.cache = Opaque()
    with pytest.raises(CheckpointStateError, match=r"s\.cache \(Opaque\)"):
        capture_state(strategy, {})

    class WithRuntimeState(FedAvg):
        checkpoint_transient = ("cache",)

    declared = WithRuntimeState()
    declared.cache = Opaque()
    assert "cache" not in capture_state(declared, {})
