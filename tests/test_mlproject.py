"""The MLproject file cannot drift from the typed configs: every entry-point parameter is a
parameter of its command with the same default (the headline metric among them)."""

from __future__ import annotations

import pytest
import yaml

from taxonclip import config as cfg
from taxonclip import names
from tests.conftest import REPO

ENTRY_CONFIGS = {
    "eval": (cfg.EvalConfig, cfg.EVAL_PARAMS),
    "train": (cfg.TrainConfig, cfg.TRAIN_PARAMS),
    "sweep": (cfg.SweepConfig, {**cfg.SWEEP_PARAMS, "overrides": "overrides"}),
    "compare": (cfg.CompareConfig, cfg.COMPARE_PARAMS),
}


def _entry_points() -> dict:
    return yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]


@pytest.mark.parametrize("entry", sorted(ENTRY_CONFIGS))
def test_every_mlproject_default_is_the_config_default(entry):
    cls, mapping = ENTRY_CONFIGS[entry]
    defaults = cfg.flat_fields(cls())
    for name, spec in _entry_points()[entry]["parameters"].items():
        assert name in mapping, f"{entry}: MLproject parameter {name!r} is no parameter of the command"
        assert f"--{name} {{{name}}}" in _entry_points()[entry]["command"], name
        if name == "overrides":
            continue
        given = cfg.flat_fields(cfg.from_params(cls, {name: spec["default"]}, mapping))
        assert given[mapping[name]] == defaults[mapping[name]], f"{entry}: {name}"


def test_the_headline_metric_is_defined_once():
    entries = _entry_points()
    assert entries["compare"]["parameters"]["metric"]["default"] == names.HEADLINE_METRIC
    assert entries["train"]["parameters"]["metric"]["default"] == names.HEADLINE_METRIC
    assert cfg.TrainConfig().metric == cfg.CompareConfig().metric == names.HEADLINE_METRIC
    from taxonclip.sweep import DEFAULT_METRIC

    assert DEFAULT_METRIC == f"eval/{names.HEADLINE_METRIC}"
