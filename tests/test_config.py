"""The typed config refuses nonsense where it is built: every numeric parameter of every entry
point refuses nan, the infinities and -1, naming itself; registered model names are checked
before training; sweep values are parsed like command-line ones. Every parameter of every
command has a one-line description, and the choices a field declares are those it accepts."""

from __future__ import annotations

import math
import re

import pytest

from taxonclip import config as cfg
from taxonclip.errors import ConfigError
from taxonclip.params import (COMPARE_PARAMS, DATA_PARAMS, EVAL_PARAMS, PREPARE_PARAMS,
                              SWEEP_PARAMS, TRAIN_PARAMS, description, field_type, from_params)

ENTRY_POINTS = {"train": (cfg.TrainConfig, TRAIN_PARAMS),
                "eval": (cfg.EvalConfig, EVAL_PARAMS),
                "sweep": (cfg.SweepConfig, SWEEP_PARAMS),
                "compare": (cfg.CompareConfig, COMPARE_PARAMS)}


# every command's typed parameters: the entry points', and those of `data check` and `data prepare`
COMMAND_PARAMS = {**ENTRY_POINTS, "data check": (cfg.EvalConfig, DATA_PARAMS),
                  "data prepare": (cfg.PrepareConfig, {**PREPARE_PARAMS, "out": "out"})}


def _numeric_params() -> list[tuple[str, str]]:
    """(entry point, parameter) for every int and float parameter (not the booleans)."""
    return [(entry, name) for entry, (cls, mapping) in ENTRY_POINTS.items()
            for name, path in mapping.items() if field_type(cls, path) in (int, float)]


def _choice_params() -> list[tuple[str, str]]:
    """(entry point, parameter) for every parameter whose field declares a fixed set of values."""
    return [(entry, name) for entry, (cls, mapping) in ENTRY_POINTS.items()
            for name, path in mapping.items() if description(cls, path)[1]]


def test_the_defaults_build():
    for cls, _ in ENTRY_POINTS.values():
        cls()


@pytest.mark.parametrize("entry, name", _numeric_params())
@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "-1"])
def test_every_numeric_parameter_refuses_nonsense_naming_itself(entry, name, raw):
    cls, mapping = ENTRY_POINTS[entry]
    with pytest.raises(ConfigError, match=f"'{name}'"):
        from_params(cls, {name: raw}, mapping)


@pytest.mark.parametrize("name, value", [("lr", "0"), ("lr_pfc_weight", "0"), ("margin_s", "0"),
                                         ("margin_s", "128.5"), ("workers", "-1")])
def test_bounds_are_refused(name, value):
    with pytest.raises(ConfigError, match=f"'{name}'"):
        from_params(cfg.TrainConfig, {name: value}, TRAIN_PARAMS)


def test_the_edges_of_each_range_are_accepted():
    config = from_params(cfg.TrainConfig, {"weight_decay": "0", "grad_clip": "0", "workers": "0",
                                               "margin_s": "128", "seed": str(cfg.MAX_SEED)},
                             TRAIN_PARAMS)
    assert (config.loss.s, config.data.seed, config.workers) == (128.0, 2**32 - 1, 0)


def test_cosface_takes_a_finite_margin_only():
    with pytest.raises(ConfigError, match="'margin_m3'.*finite"):
        from_params(cfg.TrainConfig, {"margin_m2": "0", "margin_m3": "inf"}, TRAIN_PARAMS)


@pytest.mark.parametrize("name", ["a/b", "team:model", ".", "..", "...", "..x", " ", "it's",
                                  'the "best"', "back`tick", "birds@champion", "x" * 257])
def test_register_as_refuses_what_the_registry_cannot_take(name):
    with pytest.raises(ConfigError, match="'register_as'"):
        cfg.TrainConfig(register_as=name)


@pytest.mark.parametrize("name", ["birds-b16", "birds b16", "v1.2_final", ".hidden", "Ünïcode"])
def test_register_as_accepts_ordinary_names(name):
    assert cfg.TrainConfig(register_as=name).register_as == name


def test_sweep_values_are_parsed_like_command_line_ones():
    build = lambda **values: from_params(cfg.TrainConfig, values, TRAIN_PARAMS)  # noqa: E731
    assert build(batch_size=16.0).batch_size == 16
    assert build(lr=1).lr == 1.0 and math.isclose(build(lr=3e-4).lr, 3e-4)
    assert build(compile=1).compile is True
    with pytest.raises(ConfigError, match="'batch_size': '16.5' is not an integer"):
        build(batch_size=16.5)
    with pytest.raises(ConfigError, match="'lr': 'True' is not a number"):
        build(lr=True)


@pytest.mark.parametrize("command, name", [(command, name) for command, (_, mapping)
                                           in COMMAND_PARAMS.items() for name in mapping])
def test_every_parameter_has_a_one_line_description(command, name):
    cls, mapping = COMMAND_PARAMS[command]
    text, _ = description(cls, mapping[name])
    assert text.strip(), (f"{command}: parameter {name!r} ({cls.__name__}.{mapping[name]}) has no "
                          f"description; declare the field with params.described(default, help)")
    assert "\n" not in text, f"{command}: the description of {name!r} is not one line"


@pytest.mark.parametrize("entry, name", _choice_params())
def test_the_choices_a_field_declares_are_those_it_accepts(entry, name):
    cls, mapping = ENTRY_POINTS[entry]
    _, choices = description(cls, mapping[name])
    for choice in choices:
        from_params(cls, {name: choice}, mapping)
    with pytest.raises(ConfigError, match=re.escape(f"'{name}' is 'nothing'; choose one of "
                                                    f"{', '.join(choices)}")):
        from_params(cls, {name: "nothing"}, mapping)


def test_the_choices_are_found_where_the_issue_names_them():
    assert {("train", "embedding"), ("train", "decode"), ("train", "split"), ("train", "missing"),
            ("train", "label"), ("eval", "embedding")} <= set(_choice_params())


def test_the_prepare_formats_are_those_prepare_writes():
    from taxonclip.data.prepare import IMAGE_FORMATS

    assert description(cfg.PrepareConfig, "image_format")[1] == tuple(IMAGE_FORMATS)
