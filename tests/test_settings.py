"""Run settings: one set of keys for `flwr run .` (pyproject), TOML configs and --run-config."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from models.errors import FedrexError
from models.run_settings import RunSettings
from simulations.simulate import load_settings

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def flower_app_config() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_lists_every_run_setting_and_nothing_else():
    fields = {f.name.replace("_", "-") for f in dataclasses.fields(RunSettings)}
    assert set(flower_app_config()) == fields


def test_flwr_run_and_fedrex_run_start_from_the_same_settings():
    # One source of defaults: `flwr run .` reads pyproject's config, `fedrex run` RunSettings' own
    # defaults; the large config only overrides.
    assert RunSettings.from_flower(flower_app_config()) == load_settings(None, []) == RunSettings()
    large = load_settings("large", [])
    assert large.dataset == "sent140_users" and large.mode == RunSettings().mode


def test_run_config_values_are_coerced_and_checked():
    settings = load_settings(None, ["num-rounds=7", "dp=true", "client-cpus=0.5", 'mode="ditto"'])
    assert (settings.num_rounds, settings.dp, settings.client_cpus, settings.mode) == (7, True, 0.5, "ditto")
    with pytest.raises(FedrexError, match="unknown run-config key 'num-round'"):
        load_settings(None, ["num-round=7"])
    with pytest.raises(FedrexError, match="client-cpus must be > 0"):
        load_settings(None, ["client-cpus=0"])
    with pytest.raises(FedrexError, match="not key=value"):
        load_settings(None, ["num-rounds"])
