"""Optuna studies over training parameters, described by `sweeps/*.yaml` files.

A sweep file names the study, the metric, the sampler and pruner, the fixed training parameters
and the searched ones (training parameters go by their `train` entry-point names):

    name: margin_lr                        # the study name unless --study_name is given
    metric: val/All/species/top1_cos       # val/<taxa>/<level>/<metric>: the validation table
    direction: maximize                    # or minimize
    sampler: {type: tpe, seed: 0}          # tpe (options seed, n_startup_trials, multivariate,
                                           # constant_liar) or random (seed)
    pruner: {type: median, n_startup_trials: 2, n_warmup_steps: 1}
                                           # median, hyperband, threshold or none
    fixed: {model: tiny, data: synthetic, epochs: 4}
    search:
      lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      batch_size: {type: int, low: 16, high: 64, step: 16}
      class_fraction: {type: categorical, choices: [1.0, 0.1, 0.01]}

Everything malformed is refused here, naming the file and the key, before any trial runs;
`check_metric_in_data` also refuses a metric whose row the sweep's data cannot fill.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution,
                                  IntDistribution)

from taxonclip import names
from taxonclip.config import TRAIN_PARAMS, TrainConfig, from_params
from taxonclip.errors import ConfigError, MetricNotInTable

TOP_LEVEL_KEYS = ("name", "metric", "direction", "sampler", "pruner", "fixed", "search")
DIRECTIONS = ("maximize", "minimize")
DEFAULT_METRIC = f"{names.VAL_PREFIX}/{names.HEADLINE_METRIC}"
SAMPLER_OPTIONS = {"tpe": ("seed", "n_startup_trials", "multivariate", "constant_liar"),
                   "random": ("seed",), "grid": ("seed",)}
PRUNER_OPTIONS = {"median": ("n_startup_trials", "n_warmup_steps", "interval_steps"),
                  "hyperband": ("min_resource", "max_resource", "reduction_factor"),
                  "threshold": ("lower", "upper", "n_warmup_steps", "interval_steps"),
                  "none": ()}
DISTRIBUTION_KEYS = {"float": ("low", "high", "log", "step"), "int": ("low", "high", "log", "step"),
                     "categorical": ("choices",)}


@dataclass(frozen=True)
class Component:
    """A sampler or pruner: its type and the options its Optuna class takes."""

    type: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep file: fixed parameters (with the overrides applied) and search space."""

    path: Path
    name: str
    metric: str
    direction: str
    sampler: Component
    pruner: Component
    fixed: dict[str, Any]
    search: dict[str, BaseDistribution]

    def train_config(self, suggested: Mapping[str, Any]) -> TrainConfig:
        """The training configuration of one trial: the fixed parameters and the suggested ones."""
        # the trial keeps its best checkpoint by the metric its study optimises
        metric = self.metric.removeprefix(f"{names.VAL_PREFIX}/")
        return from_params(TrainConfig, {**self.fixed, **suggested, "metric": metric}, TRAIN_PARAMS)


def spec_error(path: Path, key: str, message: str) -> ConfigError:
    """The error of a sweep file's key, naming the file and the key."""
    return ConfigError(f"{path}: {key}: {message}")


def load_sweep(path: str | Path, overrides: Mapping[str, str] | None = None) -> SweepSpec:
    """Read and check a sweep file; `overrides` replace its fixed parameters (`-P name=value`).

    Anything malformed raises ConfigError naming the file and the key, before any trial runs.
    """
    path = Path(path)
    raw = _read_yaml(path)
    unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise spec_error(path, unknown[0],
                         f"unknown key; a sweep file has {', '.join(TOP_LEVEL_KEYS)}")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not name.strip():
        raise spec_error(path, "name", "give the study a non-empty name")
    search = _mapping(path, "search", raw.get("search"))
    if not search:
        raise spec_error(path, "search", "name at least one training parameter to search")
    spec = SweepSpec(
        path=path, name=check_study_name(name, f"{path}: name"),
        metric=_metric(path, raw.get("metric", DEFAULT_METRIC)),
        direction=_choice(path, "direction", raw.get("direction", "maximize"), DIRECTIONS),
        sampler=_component(path, "sampler", raw.get("sampler", "tpe"), SAMPLER_OPTIONS),
        pruner=_component(path, "pruner", raw.get("pruner", "median"), PRUNER_OPTIONS),
        fixed=_fixed(path, raw.get("fixed", {}), overrides or {}, search),
        search={name: _distribution(path, name, spec) for name, spec in search.items()})
    _check_grid(spec)
    _check_buildable(spec)
    return spec


def _check_grid(spec: SweepSpec) -> None:
    """A grid sampler takes every combination of categorical choices, and nothing else."""
    if spec.sampler.type != "grid":
        return
    for name, distribution in spec.search.items():
        if not isinstance(distribution, CategoricalDistribution):
            raise spec_error(spec.path, f"search.{name}",
                             "a grid sampler searches categorical choices only; give this "
                             "parameter choices")


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        shipped = sorted(p.name for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        hint = f" (there: {', '.join(shipped)})" if shipped else ""
        raise ConfigError(f"{path}: no such sweep file{hint}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", exc)
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a sweep file is a mapping with keys "
                          f"{', '.join(TOP_LEVEL_KEYS)}")
    return raw


def _mapping(path: Path, key: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise spec_error(path, key, f"expected a mapping, got {value!r}")
    return value


def _choice(path: Path, key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise spec_error(path, key, f"{value!r} is not one of {', '.join(choices)}")
    return value


def check_study_name(name: str, where: str) -> str:
    """The study name, checked: it goes into MLflow tag filters, which take no quotes."""
    if re.search(r"['\"`]", name):
        raise ConfigError(f"{where}: the study name {name!r} may not contain quotes or backticks")
    return name


def _metric(path: Path, key: Any) -> str:
    prefix, _, cell = key.partition("/") if isinstance(key, str) else ("", "", "")
    if prefix == names.EVAL_PREFIX and names.is_table_key(cell):
        raise spec_error(path, "metric",
                         f"{key!r} names the test table, which no choice may read: a "
                         f"sweep optimises the validation table, "
                         f"{names.VAL_PREFIX}/{cell}")
    if prefix != names.VAL_PREFIX or not names.is_table_key(cell):
        raise spec_error(path, "metric",
                         f"{key!r} is not val/<taxa>/<level>/<metric> with <level> "
                         f"one of {', '.join(names.KNOWN_LEVELS)} and <metric> one of "
                         f"{', '.join(names.SCORES)}")
    return key


def _component(path: Path, section: str, value: Any,
               known: Mapping[str, tuple[str, ...]]) -> Component:
    settings = {"type": value} if isinstance(value, str) else dict(_mapping(path, section, value))
    kind = _choice(path, f"{section}.type", settings.pop("type", None), tuple(known))
    for option in settings:
        if option not in known[kind]:
            allowed = ", ".join(known[kind]) or "no options"
            raise spec_error(path, f"{section}.{option}",
                             f"unknown option of a {kind} {section} ({allowed})")
    seed = settings.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise spec_error(path, f"{section}.seed", f"expected an integer, got {seed!r}")
    component = Component(kind, settings)
    try:
        if section == "sampler" and kind != "grid":  # a grid is checked with its search space
            make_sampler(component, seed)
        elif section == "pruner":
            make_pruner(component)
    except (TypeError, ValueError) as exc:
        raise spec_error(path, section, str(exc)) from None
    return component


def _check_training_param(where: str, name: str) -> None:
    if name not in TRAIN_PARAMS:
        raise ConfigError(f"{where}: not a training parameter")
    if name == "resume":
        raise ConfigError(f"{where}: every trial starts a run of its own; a sweep resumes none")
    if name == "metric":
        raise ConfigError(f"{where}: the sweep file's top-level `metric` sets it for every trial")


def _fixed(path: Path, fixed: Any, overrides: Mapping[str, str], search: Mapping) -> dict[str, Any]:
    fixed = dict(_mapping(path, "fixed", fixed))
    for name in fixed:
        _check_training_param(f"{path}: fixed.{name}", name)
    for name in overrides:
        _check_training_param(f"-P {name}", name)
        if name in search:
            raise ConfigError(f"-P {name}: {path} searches this parameter; edit its search instead")
    for name in search:
        if name in fixed:
            raise spec_error(path, f"search.{name}", "also given under fixed; keep one")
    return {**fixed, **overrides}


def _distribution(path: Path, name: str, spec: Any) -> BaseDistribution:
    key = f"search.{name}"
    _check_training_param(f"{path}: {key}", name)
    spec = dict(_mapping(path, key, spec))
    kind = _choice(path, f"{key}.type", spec.pop("type", None), tuple(DISTRIBUTION_KEYS))
    for option in spec:
        if option not in DISTRIBUTION_KEYS[kind]:
            raise spec_error(path, f"{key}.{option}", f"unknown key of a {kind} distribution "
                                                      f"({', '.join(DISTRIBUTION_KEYS[kind])})")
    if kind == "categorical":
        return _categorical(path, key, spec.get("choices"))
    return _numeric(path, key, spec, integer=kind == "int")


def _categorical(path: Path, key: str, choices: Any) -> CategoricalDistribution:
    scalar = (type(None), bool, int, float, str)
    if not (isinstance(choices, list) and choices and all(isinstance(c, scalar) for c in choices)):
        raise spec_error(path, f"{key}.choices",
                         "give a non-empty list of numbers, strings, booleans")
    return CategoricalDistribution(choices)


def _numeric(path: Path, key: str, spec: dict,
             integer: bool) -> FloatDistribution | IntDistribution:
    low = _number(path, f"{key}.low", spec.get("low"), integer)
    high = _number(path, f"{key}.high", spec.get("high"), integer)
    log = spec.get("log", False)
    step = None if spec.get("step") is None else _number(path, f"{key}.step", spec["step"], integer)
    if low >= high:
        raise spec_error(path, f"{key}.low", f"must be below high ({low} >= {high})")
    if not isinstance(log, bool):
        raise spec_error(path, f"{key}.log", f"true or false, not {log!r}")
    if log and low <= 0:
        raise spec_error(path, f"{key}.low", f"a log distribution needs low > 0, got {low}")
    if step is not None and step <= 0:
        raise spec_error(path, f"{key}.step", f"must be positive, got {step}")
    if log and step not in (None, 1):
        raise spec_error(path, f"{key}.step", "a log distribution takes no step")
    if integer:
        return IntDistribution(low, high, log=log, step=step or 1)
    return FloatDistribution(low, high, log=log, step=step)


def _number(path: Path, key: str, value: Any, integer: bool) -> float | int:
    # YAML reads `1e-4` (no dot) as a string: accept any numeric spelling.
    try:
        if isinstance(value, bool) or value is None:
            raise ValueError
        number = float(value)
    except (TypeError, ValueError):
        raise spec_error(path, key, f"expected a number, got {value!r}") from None
    if integer and not number.is_integer():
        raise spec_error(path, key, f"expected an integer, got {value!r}")
    return int(number) if integer else number


def _check_buildable(spec: SweepSpec) -> None:
    """Build the training config at every bound and choice, so a value the training code rejects
    (sample_rate 1.5, batch_size 0) fails now rather than in some trial."""
    try:
        spec.train_config({})
    except ConfigError as exc:
        raise spec_error(spec.path, "fixed", str(exc)) from None
    for name, distribution in spec.search.items():
        values = (distribution.choices if isinstance(distribution, CategoricalDistribution)
                  else (distribution.low, distribution.high))
        for value in values:
            try:
                spec.train_config({name: value})
            except ConfigError as exc:
                raise spec_error(spec.path, f"search.{name}", str(exc)) from None


def make_sampler(component: Component, seed: int | None,
                 search: Mapping[str, BaseDistribution] | None = None) -> optuna.samplers.BaseSampler:
    """The Optuna sampler of a sweep file, seeded with `seed` (None: a fresh seed); a grid
    sampler takes the choices of the categorical `search`."""
    options = {**component.options, "seed": seed}
    if component.type == "grid":
        space = {name: list(distribution.choices) for name, distribution in (search or {}).items()}
        return optuna.samplers.GridSampler(space, **options)
    if component.type == "random":
        return optuna.samplers.RandomSampler(**options)
    return optuna.samplers.TPESampler(**options)


def make_pruner(component: Component) -> optuna.pruners.BasePruner:
    """The Optuna pruner of a sweep file (steps are epochs)."""
    classes = {"median": optuna.pruners.MedianPruner, "hyperband": optuna.pruners.HyperbandPruner,
               "threshold": optuna.pruners.ThresholdPruner, "none": optuna.pruners.NopPruner}
    return classes[component.type](**component.options)


def check_metric_in_data(spec: SweepSpec) -> None:
    """Refuse, before any run, a metric whose row the table of the sweep's data will not have
    (a taxa the data lacks); skipped where the data itself is searched."""
    from taxonclip.data.manifest import load_manifest
    from taxonclip.table import check_metric_cell

    if "data" in spec.search:
        return
    config = spec.train_config({})
    manifest = load_manifest(config.data)
    with_seen = (config.data.split == "official" or config.data.class_fraction < 1
                 or "class_fraction" in spec.search)
    try:
        check_metric_cell(config.metric, manifest.table["taxa"].unique(), with_seen,
                          manifest.levels)
    except MetricNotInTable as error:
        raise spec_error(spec.path, "metric", f"{error} of {manifest.report.source}") from None
