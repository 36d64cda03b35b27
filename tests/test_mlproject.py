"""The MLproject file cannot drift from the typed configs: every entry-point parameter is a
parameter of its command with the same default (the headline metric among them), the command
line passes each one, and every config field is either an entry-point parameter or listed, with
the reason, in NOT_IN_MLPROJECT."""

from __future__ import annotations

import re

import pytest
import yaml

from taxonclip import config as cfg
from taxonclip import names
from taxonclip.launch.options import LaunchConfig
from taxonclip.launch.submit import ARRAY_COMMANDS, MLPROJECT_LAUNCH_PARAMS
from taxonclip.params import (CAPTION_PARAMS, COMPARE_PARAMS, EVAL_PARAMS, SWEEP_PARAMS,
                              TRAIN_PARAMS, flat_fields, from_params)
from tests.helpers import REPO

ENTRY_CONFIGS = {
    "eval": (cfg.EvalConfig, EVAL_PARAMS),
    "train": (cfg.TrainConfig, TRAIN_PARAMS),
    "sweep": (cfg.SweepConfig, {**SWEEP_PARAMS, "overrides": "overrides"}),
    "compare": (cfg.CompareConfig, COMPARE_PARAMS),
    "caption": (cfg.CaptionConfig, CAPTION_PARAMS),
}

# Config fields an MLproject entry point deliberately does not expose, each with the reason. They
# stay parameters of the `taxonclip` command (all but cache_embeddings). A new config field goes
# into the entry point's `parameters` and `command` in MLproject, or here with its reason.
_LAYOUT = ("how one manifest names its columns, which VLM4Bio folders, BIOSCAN-5M and prepared "
           "data need not be told: set with taxonclip <command> --{name}")
_NOT_IN_MLPROJECT_OF_BOTH = {
    "data.image_column": _LAYOUT.format(name="image_column"),
    "data.name_column": _LAYOUT.format(name="name_column"),
    "data.taxa": _LAYOUT.format(name="taxa"),
    "data.caption_column": _LAYOUT.format(name="caption_column"),
    "data.missing": "a logged run scores every image of its data (missing=error); leaving broken "
                    "images out is a choice made at the command: taxonclip --missing skip",
    "device": "chosen by the machine, not the experiment: set with taxonclip <command> --device",
}
NOT_IN_MLPROJECT = {
    "eval": {
        **_NOT_IN_MLPROJECT_OF_BOTH,
        "workers": "changes eval's speed, never its table: set with taxonclip eval --workers",
        "chunk_size": "changes the kNN scoring's memory and speed, never the metrics",
        "cache_embeddings": "no command's parameter: eval reuses the cached embeddings of named "
                            "weights, train's evaluations never cache (TrainConfig.eval_config)",
    },
    "train": {
        **_NOT_IN_MLPROJECT_OF_BOTH,
        "data.captions": "MLproject's train evaluates visual embeddings (no `embedding` either); "
                         "caption embeddings are scored by the eval entry on the logged model",
        "embedding": "MLproject's train evaluates visual embeddings, as its baselines by the eval "
                     "entry do by default; taxonclip train --embedding for others",
        "allow_label_text": "MLproject's train evaluates visual embeddings, with no captions to "
                            "let in: taxonclip train --allow_label_text",
        "keep_checkpoints": "storage housekeeping (the best checkpoint is always kept): "
                            "taxonclip train --keep_checkpoints",
    },
    "sweep": {},
    "compare": {},
    "caption": {
        **{path: reason for path, reason in _NOT_IN_MLPROJECT_OF_BOTH.items()
           if path != "data.caption_column"},
        "data.captions": "caption writes captions; it reads none",
        "data.caption_column": "caption writes captions; it reads none",
        "workers": "changes the job's speed, never its captions: taxonclip caption --workers",
        "progress_every": "how often a log shows progress: taxonclip caption --progress_every",
    },
}


def _entry_points() -> dict:
    return yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]


def _exposed(entry: str) -> set[str]:
    """The field paths that the entry point's MLproject parameters set."""
    _, mapping = ENTRY_CONFIGS[entry]
    return {mapping[name] for name in _entry_points()[entry]["parameters"] if name in mapping}


def test_mlproject_has_the_entry_points_of_the_configs():
    assert set(_entry_points()) == set(ENTRY_CONFIGS) == set(NOT_IN_MLPROJECT)


@pytest.mark.parametrize("entry", sorted(ENTRY_CONFIGS))
def test_every_mlproject_default_is_the_config_default(entry):
    cls, mapping = ENTRY_CONFIGS[entry]
    defaults = flat_fields(cls())
    for name, spec in _entry_points()[entry]["parameters"].items():
        if name in _launch_params(entry):  # where it runs: test_the_launch_parameters_...
            continue
        assert name in mapping, f"{entry}: MLproject parameter {name!r} is no parameter of the command"
        if name == "overrides":
            continue
        given = flat_fields(from_params(cls, {name: spec["default"]}, mapping))
        assert given[mapping[name]] == defaults[mapping[name]], f"{entry}: {name}"


@pytest.mark.parametrize("entry", sorted(ENTRY_CONFIGS))
def test_the_command_passes_every_parameter_to_its_script(entry):
    spec = _entry_points()[entry]
    command = " ".join(spec["command"].split())
    assert command.startswith(f"python mlproject/{entry}.py "), command
    passed = re.findall(r"--(\w+) \{(\w+)\}", command)
    assert all(flag == value for flag, value in passed), f"{entry}: a flag takes another's value"
    assert sorted(flag for flag, _ in passed) == sorted(spec["parameters"]), (
        f"{entry}: the command line and the parameters differ")
    assert len(re.findall(r"--\w+", command)) == len(passed), f"{entry}: a flag without a value"


@pytest.mark.parametrize("entry", sorted(ENTRY_CONFIGS))
def test_every_config_field_is_an_mlproject_parameter_or_left_out_for_a_reason(entry):
    cls, _ = ENTRY_CONFIGS[entry]
    exposed, left_out = _exposed(entry), NOT_IN_MLPROJECT[entry]
    for path in flat_fields(cls()):
        assert path in exposed or path in left_out, (
            f"{cls.__name__} field {path!r} is not a parameter of MLproject entry point {entry!r}: "
            f"add it there (to `parameters`, with the config's default, and to `command`), or "
            f"list it in NOT_IN_MLPROJECT[{entry!r}] of tests/test_mlproject.py with the reason")


@pytest.mark.parametrize("entry", sorted(ENTRY_CONFIGS))
def test_what_is_left_out_is_a_field_that_mlproject_lacks(entry):
    cls, _ = ENTRY_CONFIGS[entry]
    fields = flat_fields(cls())
    for path, reason in NOT_IN_MLPROJECT[entry].items():
        assert path in fields, f"NOT_IN_MLPROJECT[{entry!r}]: {cls.__name__} has no field {path!r}"
        assert path not in _exposed(entry), (
            f"NOT_IN_MLPROJECT[{entry!r}]: {path!r} is an MLproject parameter; remove it here")
        assert reason.strip(), path


def test_train_and_eval_take_the_same_split_parameters():
    """compare matches a train run with the eval baseline of the same split."""
    entries = _entry_points()
    for name in ("seed", "test_size", "group_column", "split", "class_fraction", "val_size"):
        for entry in ("train", "eval"):
            assert name in entries[entry]["parameters"], f"{entry}: {name}"


def test_the_headline_metric_is_defined_once():
    entries = _entry_points()
    assert entries["compare"]["parameters"]["metric"]["default"] == names.HEADLINE_METRIC
    assert entries["train"]["parameters"]["metric"]["default"] == names.HEADLINE_METRIC
    assert cfg.TrainConfig().metric == cfg.CompareConfig().metric == names.HEADLINE_METRIC
    from taxonclip.sweep.spec import DEFAULT_METRIC

    assert DEFAULT_METRIC == f"val/{names.HEADLINE_METRIC}"  # a sweep optimises validation


def _launch_params(entry: str) -> tuple[str, ...]:
    if entry not in ("train", "eval", "caption", "sweep"):
        return ()
    return (*MLPROJECT_LAUNCH_PARAMS, *((ARRAY_COMMANDS[entry],) if entry in ARRAY_COMMANDS else ()))


@pytest.mark.parametrize("entry", ["train", "eval", "caption", "sweep"])
def test_the_launch_parameters_default_to_running_here(entry):
    from taxonclip.launch.submit import split_launch_options

    parameters = _entry_points()[entry]["parameters"]
    given = [word for name in _launch_params(entry)
             for word in (f"--{name}", parameters[name]["default"])]
    launch, rest = split_launch_options([entry, *given])
    assert rest == [entry] and launch == LaunchConfig()
