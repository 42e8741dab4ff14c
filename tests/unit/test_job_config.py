"""Honest job configs: every override means what it says or is refused, naming the key
and where it came from (#18). Each case below was silently accepted before."""

from __future__ import annotations

import pytest

from flwr_hpc.errors import ConfigError
from strategies.job import STRATEGY_KEYS, compose_job, job_digest, job_from_run_config


def _refused(run_config: dict) -> str:
    with pytest.raises(ConfigError) as err:
        job_from_run_config(run_config)
    return str(err.value)


def test_the_federation_is_not_part_of_a_job():
    text = _refused({"overrides": "federation=sim_4facilities"})
    assert text.startswith("run config overrides 'federation=sim_4facilities': federation:")
    assert "flwr-hpc up federation=<name>" in text


def test_an_unknown_top_level_key_is_refused():
    text = _refused({"overrides": "+foo=1"})
    assert text.startswith("run config overrides '+foo=1': foo: unknown section")


@pytest.mark.parametrize("item", ["+strategy.eta=0.5", "strategy.eta=0.5"])
def test_fedavg_refuses_a_fedopt_parameter(item):
    text = _refused({"overrides": item})
    assert text.startswith(f"run config overrides {item!r}: strategy.eta: strategy 'fedavg' "
                           "has no parameter 'eta'")
    assert "fedadam, fedyogi, fedadagrad" in text


def test_each_strategy_takes_its_own_parameters_only():
    job = compose_job(["strategy=fedadam", "strategy.eta=0.5"])
    assert job["strategy"]["eta"] == 0.5
    assert set(job["strategy"]) - set(STRATEGY_KEYS["fedadam"]) == {
        "name", "num_rounds", "fraction_train", "fraction_evaluate", "min_train_nodes",
        "min_evaluate_nodes", "min_available_nodes", "round_timeout_s", "streaming",
        "time_budget_s"}
    assert "proximal_mu" not in compose_job([])["strategy"]  # FedAvg has no mu
    with pytest.raises(ConfigError, match="strategy 'fedbuff' has no parameter 'quorum'"):
        compose_job(["strategy=fedbuff", "strategy.quorum=0.3"])
    # a parameter the YAML leaves to the schema's default is set without Hydra's '+'
    assert compose_job(["model.dtype=bfloat16"])["model"]["dtype"] == "bfloat16"


def test_hydra_messages_are_kept_whole():
    text = _refused({"overrides": "model=nope"})
    assert "Could not find 'model/nope'" in text
    assert ("Available options in 'model': local_path, minilm, smollm2, tiny_albert, tiny_bert, "
            "tiny_deberta, tiny_llama") in text
    assert "search path" not in text
    text = _refused({"overrides": "train.foo=1"})
    assert "train.foo: unknown key; allowed keys here are batch_size, local_steps" in text


def test_flower_template_keys_map_onto_the_job():
    job = job_from_run_config({"overrides": "", "num-server-rounds": 2, "local-steps": 5,
                               "lr": 1e-3, "fraction-train": 0.5, "fraction-evaluate": ""})
    assert job["strategy"]["num_rounds"] == 2 and job["train"]["local_steps"] == 5
    assert job["train"]["lr"] == 1e-3 and job["strategy"]["fraction_train"] == 0.5
    assert job["strategy"]["fraction_evaluate"] == 1.0  # "" = the job's own value
    # the same value in both places is fine; different values are refused
    assert job_from_run_config({"overrides": "strategy.num_rounds=2",
                                "num-server-rounds": 2})["strategy"]["num_rounds"] == 2
    text = _refused({"overrides": "strategy.num_rounds=3", "num-server-rounds": 2})
    assert text == ("run config -c: num-server-rounds: 2 contradicts overrides "
                    "'strategy.num_rounds=3'; set strategy.num_rounds in one place")
    assert _refused({"num-server-rounds": "two"}) == (
        "run config -c: num-server-rounds: expected an integer, got 'two'")
    assert _refused({"num-server-rounds": 0}).startswith(
        "run config -c num-server-rounds: strategy.num_rounds:")


def test_the_job_digest_changes_with_the_job():
    a = job_from_run_config({"overrides": ""})
    assert job_digest(a) == job_digest(job_from_run_config({"overrides": ""}))
    assert job_digest(a) != job_digest(job_from_run_config({"num-server-rounds": 2}))
    assert len(job_digest(a)) == 16


def test_a_site_that_composes_another_job_refuses_the_task():
    from types import SimpleNamespace

    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

    from client_apps.app import _job

    run_config = {"overrides": "", "num-server-rounds": 2}
    digest = job_digest(job_from_run_config(run_config))
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0,
                      "num-partitions": 2}, state=RecordDict(), run_config=run_config)

    def message(sent: str) -> SimpleNamespace:  # what _job reads of a Message
        return SimpleNamespace(content=RecordDict({
            "arrays": ArrayRecord(), "config": ConfigRecord({"job-digest": sent})}))

    assert _job(message(digest), context)["strategy"]["num_rounds"] == 2
    with pytest.raises(ValueError, match=f"composed job {digest} from the run config, the "
                                         "server sent job 0123456789abcdef"):
        _job(message("0123456789abcdef"), context)
