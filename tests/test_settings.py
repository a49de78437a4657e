"""Run settings: one set of keys for `flwr run .` (pyproject), TOML configs and --run-config."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from models.errors import FedrexError
from models.run_settings import CONTROL_KEYS, RunSettings
from simulations.simulate import load_settings

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def flower_app_config() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_lists_every_run_setting_and_nothing_else():
    fields = {f.name.replace("_", "-") for f in dataclasses.fields(RunSettings)}
    assert set(flower_app_config()) == fields | set(CONTROL_KEYS)  # run controls: accepted, not settings


def test_flwr_run_and_fedrex_run_start_from_the_same_settings():
    # One source of defaults: `flwr run .` reads pyproject's config, `fedrex run` RunSettings' own
    # defaults; the large config only overrides.
    assert RunSettings.from_flower(flower_app_config()) == load_settings(None, []) == RunSettings()
    large = load_settings("large", [])
    assert large.dataset == "sent140_users" and large.mode == RunSettings().mode


def test_run_config_values_are_coerced_and_checked():
    settings = load_settings(None, ["num-rounds=7", "dp=true", "client-cpus=2", 'mode="ditto"'])
    assert (settings.num_rounds, settings.dp, settings.client_cpus, settings.mode) == (7, True, 2, "ditto")
    with pytest.raises(FedrexError, match="unknown run-config key 'num-round'"):
        load_settings(None, ["num-round=7"])
    with pytest.raises(FedrexError, match="client-cpus and client-threads must be >= 1"):
        load_settings(None, ["client-cpus=0"])
    with pytest.raises(FedrexError, match="not key=value"):
        load_settings(None, ["num-rounds"])


def test_client_attacks_are_checked_against_the_recipes():
    from models.errors import FedrexError
    from models.run_settings import RunSettings

    assert RunSettings(client_attacks="char, synonym-sim").attacks() == ("char", "synonym-sim")
    with pytest.raises(FedrexError, match="unknown attack 'typo'"):
        RunSettings(client_attacks="char,typo").validate()
    with pytest.raises(FedrexError, match="names no attack"):
        RunSettings(client_attacks=" ,").validate()
    RunSettings(client_attacks="", attack_examples=0).validate()  # measuring none is fine


def test_metric_keys_round_trip_through_the_protocol():
    from models.protocol import attack_metric, metric_key, split_metric_key

    key = metric_key("global", attack_metric("adv_acc", "char-beam"))
    assert key == "global.adv_acc.char-beam" and split_metric_key(key) == ("global", "adv_acc.char-beam")
    assert split_metric_key("n_train") == ("", "n_train")


def test_fault_rates_are_drawn_reproducibly_at_their_rates_and_bad_values_get_one_error():
    import time

    from client.faults import before_training, drawn_fault

    settings = RunSettings(fault_rates="raise=0.1,hang=0.1,nan=0.2,shape=0.1")
    settings.validate()
    draws = [drawn_fault(settings, r, p) for r in range(1, 21) for p in range(200)]
    assert draws == [drawn_fault(settings, r, p) for r in range(1, 21) for p in range(200)]
    for kind, rate in {**settings.faults(), None: 0.5}.items():
        assert abs(draws.count(kind) / len(draws) - rate) < 0.02, kind
    assert drawn_fault(RunSettings(), 1, 0) is None
    with pytest.raises(RuntimeError, match="injected fault"):
        before_training("raise", settings, 3)
    started = time.time()
    before_training("hang", settings.replace(round_timeout=0.1), 3)  # sleeps past the round timeout
    assert time.time() - started >= 1.1
    import numpy as np
    import torch

    from client.faults import corrupted

    for sent in ({"b": torch.zeros(3), "a": torch.ones(2)}, {"b": np.zeros(3), "a": np.ones(2)}):  # torch, numpy
        for kind, check in (("nan", np.isnan), ("inf", np.isposinf)):
            replied = corrupted(kind, sent)
            assert check(np.asarray(replied["a"])).tolist() == [True, False]  # the first floating tensor by name
            assert np.asarray(sent["a"]).tolist() == [1.0, 1.0] and replied["b"] is sent["b"]  # on a copy
        assert np.asarray(corrupted("shape", sent)["a"]).shape == (1,)
    for bad, message in [("nan=2", "must be in"), ("boom=0.1", "unknown fault 'boom'"), ("nan=0.6,shape=0.6", "sum"),
                         ("nan", "not kind=rate"), (",", "names no fault"), ("nan=0.1,nan=0.1", "twice")]:
        with pytest.raises(FedrexError, match=message):
            RunSettings(fault_rates=bad).validate()
