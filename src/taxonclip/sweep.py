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

Every trial trains through `taxonclip.train.run_training`, in a child MLflow run of the one run
each `sweep` invocation starts, and reports the metric of the validation table after every
evaluation so the pruner can stop it (the child run then ends KILLED). The objective is that
metric of the trial's selected epoch, on the validation rows: no choice of a sweep reads the
test split. Each trial's run still scores its model once on the test split; the summary shows
that result for the best trial only (`best.eval/<cell>`), a number no choice was made on. A trial that raises (out of memory, NaN loss, ...) ends
FAILED, its error in the child run (tag `taxonclip.error`, artifact `error.txt`, which also
takes Optuna's log of the failure, leaving one line on stderr), and the study goes on. `n_trials`
counts the trials of one invocation: every worker runs that many.

A sweep whose process died (SIGKILL, a lost machine) leaves its trial RUNNING and its runs
RUNNING. Database storages keep a heartbeat of every running trial, and each sweep's run keeps
one in its `taxonclip.heartbeat` tag; every invocation, before its first trial (and Optuna before
each trial), fails the trials and ends KILLED the runs silent for the grace period, saying why in
the tag `taxonclip.killed_reason`. A journal file keeps no heartbeat: there a RUNNING trial is
failed once the sweep run that started it is found dead.

Each trial draws with the sampler's seed plus its trial number (the storage numbers the trials
of every worker of a study apart), so a continued study does not repeat its trials, workers
started together on one study suggest different values, and a seed reproduces its trials.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from importlib.util import find_spec
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import optuna
import pandas as pd
import yaml
from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution,
                                  IntDistribution)
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from taxonclip import names
from taxonclip.tracking import sweeps as sweep_runs
from taxonclip.tracking.connection import tracking_uri
from taxonclip.tracking.run_logging import Run
from taxonclip.tracking.runs import RunKilled, tracked_run
from taxonclip.config import SWEEP_PARAMS, TRAIN_PARAMS, SweepConfig, TrainConfig, from_params, to_params
from taxonclip.errors import ConfigError, MetricNotInTable, TaxonclipError, TrackingError
from taxonclip.evaluate import EvalResult, table_cell
from taxonclip.formats import percent
from taxonclip.train import run_training

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
SHARED_STORAGE_PREFIXES = ("postgresql", "mysql", "journal:")
DATABASE_PREFIXES = ("postgresql", "mysql")
JOURNAL_PREFIX = "journal:"
SQLITE_PREFIX = "sqlite:///"
QUERY_PASSWORD = re.compile(r"([?&]password=)[^&]*", re.IGNORECASE)  # as MySQL URLs may hold it
OPTUNA_DB = "optuna.db"
# A running trial records a heartbeat in a database storage, and a running sweep in its MLflow
# run, every HEARTBEAT_S seconds; one silent for GRACE_BEATS beats has lost its process. Tests
# shorten the beat with the environment variable HEARTBEAT_ENV (whole seconds).
HEARTBEAT_S = 60
GRACE_BEATS = 5
HEARTBEAT_ENV = "TAXONCLIP_SWEEP_HEARTBEAT_S"
# Workers opening a fresh PostgreSQL database at once race to create Optuna's tables.
STORAGE_ATTEMPTS = 3

RUN_ID_ATTR = "mlflow_run_id"
PARENT_RUN_ATTR = "mlflow_parent_run_id"
ERROR_ATTR = "error"
TEST_ATTR = "test_value"  # a trial's metric on the test split: shown for the best trial only
METRIC_ATTR = "metric"
# The logger of Optuna's "Trial N failed ... because of the following error" and its traceback,
# and the function that logs them (private to Optuna: renamed, their lines pass untouched).
OPTUNA_TRIAL_LOGGER = "optuna.study._optimize"
OPTUNA_FAILURE_FUNCTION = "_log_failed_trial"

TrainFunction = Callable[..., EvalResult]
"""Called like `taxonclip.train.run_training(config, parent_run_id=, on_epoch=, run_tags=)`."""
StaleTrialCallback = Callable[[optuna.Study, FrozenTrial], None]
"""Called by Optuna for each trial it failed because its heartbeat went stale."""


class TrialFailed(Exception):
    """A trial that raised: recorded FAILED while the study goes on."""


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


def _error(path: Path, key: str, message: str) -> ConfigError:
    return ConfigError(f"{path}: {key}: {message}")


def load_sweep(path: str | Path, overrides: Mapping[str, str] | None = None) -> SweepSpec:
    """Read and check a sweep file; `overrides` replace its fixed parameters (`-P name=value`).

    Anything malformed raises ConfigError naming the file and the key, before any trial runs.
    """
    path = Path(path)
    raw = _read_yaml(path)
    unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise _error(path, unknown[0], f"unknown key; a sweep file has {', '.join(TOP_LEVEL_KEYS)}")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not name.strip():
        raise _error(path, "name", "give the study a non-empty name")
    search = _mapping(path, "search", raw.get("search"))
    if not search:
        raise _error(path, "search", "name at least one training parameter to search")
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
            raise _error(spec.path, f"search.{name}", "a grid sampler searches categorical "
                                                      "choices only; give this parameter choices")


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
        raise _error(path, key, f"expected a mapping, got {value!r}")
    return value


def _choice(path: Path, key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise _error(path, key, f"{value!r} is not one of {', '.join(choices)}")
    return value


def check_study_name(name: str, where: str) -> str:
    """The study name, checked: it goes into MLflow tag filters, which take no quotes."""
    if re.search(r"['\"`]", name):
        raise ConfigError(f"{where}: the study name {name!r} may not contain quotes or backticks")
    return name


def _metric(path: Path, key: Any) -> str:
    prefix, _, cell = key.partition("/") if isinstance(key, str) else ("", "", "")
    if prefix == names.EVAL_PREFIX and names.is_table_key(cell):
        raise _error(path, "metric", f"{key!r} names the test table, which no choice may read: a "
                                     f"sweep optimises the validation table, "
                                     f"{names.VAL_PREFIX}/{cell}")
    if prefix != names.VAL_PREFIX or not names.is_table_key(cell):
        raise _error(path, "metric", f"{key!r} is not val/<taxa>/<level>/<metric> with <level> "
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
            raise _error(path, f"{section}.{option}",
                         f"unknown option of a {kind} {section} ({allowed})")
    seed = settings.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _error(path, f"{section}.seed", f"expected an integer, got {seed!r}")
    component = Component(kind, settings)
    try:
        if section == "sampler" and kind != "grid":  # a grid is checked with its search space
            make_sampler(component, seed)
        elif section == "pruner":
            make_pruner(component)
    except (TypeError, ValueError) as exc:
        raise _error(path, section, str(exc)) from None
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
            raise _error(path, f"search.{name}", "also given under fixed; keep one")
    return {**fixed, **overrides}


def _distribution(path: Path, name: str, spec: Any) -> BaseDistribution:
    key = f"search.{name}"
    _check_training_param(f"{path}: {key}", name)
    spec = dict(_mapping(path, key, spec))
    kind = _choice(path, f"{key}.type", spec.pop("type", None), tuple(DISTRIBUTION_KEYS))
    for option in spec:
        if option not in DISTRIBUTION_KEYS[kind]:
            raise _error(path, f"{key}.{option}", f"unknown key of a {kind} distribution "
                                                  f"({', '.join(DISTRIBUTION_KEYS[kind])})")
    if kind == "categorical":
        return _categorical(path, key, spec.get("choices"))
    return _numeric(path, key, spec, integer=kind == "int")


def _categorical(path: Path, key: str, choices: Any) -> CategoricalDistribution:
    scalar = (type(None), bool, int, float, str)
    if not (isinstance(choices, list) and choices and all(isinstance(c, scalar) for c in choices)):
        raise _error(path, f"{key}.choices", "give a non-empty list of numbers, strings, booleans")
    return CategoricalDistribution(choices)


def _numeric(path: Path, key: str, spec: dict,
             integer: bool) -> FloatDistribution | IntDistribution:
    low = _number(path, f"{key}.low", spec.get("low"), integer)
    high = _number(path, f"{key}.high", spec.get("high"), integer)
    log = spec.get("log", False)
    step = None if spec.get("step") is None else _number(path, f"{key}.step", spec["step"], integer)
    if low >= high:
        raise _error(path, f"{key}.low", f"must be below high ({low} >= {high})")
    if not isinstance(log, bool):
        raise _error(path, f"{key}.log", f"true or false, not {log!r}")
    if log and low <= 0:
        raise _error(path, f"{key}.low", f"a log distribution needs low > 0, got {low}")
    if step is not None and step <= 0:
        raise _error(path, f"{key}.step", f"must be positive, got {step}")
    if log and step not in (None, 1):
        raise _error(path, f"{key}.step", "a log distribution takes no step")
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
        raise _error(path, key, f"expected a number, got {value!r}") from None
    if integer and not number.is_integer():
        raise _error(path, key, f"expected an integer, got {value!r}")
    return int(number) if integer else number


def _check_buildable(spec: SweepSpec) -> None:
    """Build the training config at every bound and choice, so a value the training code rejects
    (sample_rate 1.5, batch_size 0) fails now rather than in some trial."""
    try:
        spec.train_config({})
    except ConfigError as exc:
        raise _error(spec.path, "fixed", str(exc)) from None
    for name, distribution in spec.search.items():
        values = (distribution.choices if isinstance(distribution, CategoricalDistribution)
                  else (distribution.low, distribution.high))
        for value in values:
            try:
                spec.train_config({name: value})
            except ConfigError as exc:
                raise _error(spec.path, f"search.{name}", str(exc)) from None


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


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """The sweep file's sampler, made afresh for every trial with the seed `seed + trial
    number`: trial numbers are unique across the workers of a study (the storage hands them
    out), so workers started together on one study draw different values, and one worker's
    trials are reproducible from the seed and their numbers. No seed: a fresh one per trial."""

    def __init__(self, component: Component, seed: int | None,
                 search: Mapping[str, BaseDistribution] | None = None) -> None:
        self.component, self.seed, self.search = component, seed, search
        self._sampler = make_sampler(component, seed, search)

    def trial_seed(self, number: int) -> int | None:
        """The seed of trial `number`'s draws."""
        return None if self.seed is None else self.seed + number

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._sampler = make_sampler(self.component, self.trial_seed(trial.number), self.search)
        self._sampler.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._sampler.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._sampler.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._sampler.reseed_rng()


def make_pruner(component: Component) -> optuna.pruners.BasePruner:
    """The Optuna pruner of a sweep file (steps are epochs)."""
    classes = {"median": optuna.pruners.MedianPruner, "hyperband": optuna.pruners.HyperbandPruner,
               "threshold": optuna.pruners.ThresholdPruner, "none": optuna.pruners.NopPruner}
    return classes[component.type](**component.options)


def suggest(trial: optuna.Trial, name: str, distribution: BaseDistribution) -> Any:
    """Ask the trial for a value of one searched parameter."""
    if isinstance(distribution, FloatDistribution):
        return trial.suggest_float(name, distribution.low, distribution.high,
                                   log=distribution.log, step=distribution.step)
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high,
                                 log=distribution.log, step=distribution.step)
    return trial.suggest_categorical(name, distribution.choices)


def metric_value(table: pd.DataFrame, key: str) -> float:
    """The cell `<taxa>/<level>/<metric>` of a per-taxa table, named with or without its prefix
    (`val/`, `eval/`); NaN where it is empty."""
    prefix, _, cell = key.partition("/")
    return table_cell(table, cell if prefix in (names.VAL_PREFIX, names.EVAL_PREFIX) else key)


# --- storage -----------------------------------------------------------------------------------

def default_storage(tracking_uri: str) -> str:
    """`optuna.db` beside a SQLite MLflow store, else `sqlite:///optuna.db` in this folder."""
    if tracking_uri.startswith(SQLITE_PREFIX):
        return f"{tracking_uri.rsplit('/', 1)[0]}/{OPTUNA_DB}"
    return f"{SQLITE_PREFIX}{OPTUNA_DB}"


def redact(url: str) -> str:
    """The storage URL fit for a message, param or tag: its password, and a `password=` option,
    replaced by `***`. A journal file or SQLite database is a path, shown as it is."""
    if url.startswith((JOURNAL_PREFIX, SQLITE_PREFIX)):
        return url
    # The option first: an `@` in its value would end the credentials there.
    url = QUERY_PASSWORD.sub(r"\1***", url)
    try:
        shown = _parse_database_url(url).render_as_string(hide_password=True)
    except ConfigError:
        return _masked(url)
    return QUERY_PASSWORD.sub(r"\1***", shown)  # SQLAlchemy percent-encodes the `***`


def _masked(url: str) -> str:
    """A storage URL that does not parse, everything before its last `@` (the credentials, if
    any, end there at the latest) shown as `***`."""
    head, at, address = url.rpartition("@")
    if not at:
        return url
    scheme, separator, _ = head.partition("://")
    return f"{scheme}://***@{address}" if separator else f"***@{address}"


def _parse_database_url(url: str) -> URL:
    """SQLAlchemy's URL of a database storage. SQLAlchemy ends a password at its first `@`; here
    the credentials run from `://` to the last `@` (a host, port or database name holds none), so
    a password may hold `/`, `@` and `:` unencoded, or percent-encoded as SQLAlchemy wants."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        raise ConfigError(f"storage {_masked(url)!r}: not a database URL (no scheme://)")
    credentials, at, address = rest.rpartition("@")
    try:
        parsed = make_url(f"{scheme}://{address}")
    except (ArgumentError, ValueError) as exc:  # ValueError: a port that is not a number
        raise ConfigError(f"storage {_masked(url)!r}: not a database URL ({exc})") from None
    if not at:
        return parsed
    user, has_password, password = credentials.partition(":")
    return parsed.set(username=unquote(user), password=unquote(password) if has_password else None)


def is_shared(url: str) -> bool:
    """Whether several workers can share the storage (PostgreSQL, MySQL, journal file)."""
    return url.startswith(SHARED_STORAGE_PREFIXES)


def heartbeat_timing() -> tuple[int, int]:
    """(heartbeat interval, grace period) in seconds: HEARTBEAT_S, or the HEARTBEAT_ENV variable."""
    text = os.environ.get(HEARTBEAT_ENV, "").strip()
    if not text:
        return HEARTBEAT_S, GRACE_BEATS * HEARTBEAT_S
    if not text.isdigit() or int(text) == 0:
        raise ConfigError(f"{HEARTBEAT_ENV}={text!r}: give a whole number of seconds above 0")
    return int(text), GRACE_BEATS * int(text)


def open_storage(url: str, on_stale: StaleTrialCallback | None = None,
                 ) -> optuna.storages.BaseStorage:
    """The Optuna storage of a URL: `sqlite:///FILE`, `postgresql://...`, `mysql://...` or
    `journal:FILE` (a journal file on a disk every worker mounts).

    A database storage records a heartbeat of each running trial; Optuna fails a trial silent
    for the grace period, then calls `on_stale(study, trial)`. Optuna 5's journal storage keeps
    no heartbeat (`Reconciler` covers it)."""
    if url.startswith(JOURNAL_PREFIX):
        backend = optuna.storages.journal.JournalFileBackend(url[len(JOURNAL_PREFIX):])
        return optuna.storages.JournalStorage(backend)
    if url.startswith((SQLITE_PREFIX, *DATABASE_PREFIXES)):
        interval_s, grace_s = heartbeat_timing()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                _engine_url(url), heartbeat_interval=interval_s, grace_period=grace_s,
                heartbeat_stale_trial_callback=on_stale)
    raise ConfigError(f"storage {redact(url)!r}: use sqlite:///FILE, postgresql://USER@HOST/DB, "
                      f"mysql://USER@HOST/DB or journal:FILE")


def _engine_url(url: str) -> str:
    """The URL SQLAlchemy connects to: a PostgreSQL or MySQL one re-encoded (its password
    percent-encoded) with a driver that is installed."""
    if url.startswith(SQLITE_PREFIX):
        return url
    return _with_driver(_parse_database_url(url)).render_as_string(hide_password=False)


def _with_driver(url: URL) -> URL:
    """`postgresql://` names no driver, and SQLAlchemy 2.1 then wants psycopg 3: use psycopg2
    (the project's `postgres` extra) where only that one is installed."""
    if url.drivername == "postgresql" and find_spec("psycopg") is None and \
            find_spec("psycopg2") is not None:
        return url.set(drivername="postgresql+psycopg2")
    return url


def dashboard_target(url: str) -> str:
    """What `optuna-dashboard` opens for a storage, without the password."""
    if url.startswith(JOURNAL_PREFIX):
        return url[len(JOURNAL_PREFIX):]
    return redact(_engine_url(url))


def open_study(spec: SweepSpec, study_name: str, storage_url: str,
               on_stale: StaleTrialCallback | None = None) -> optuna.Study:
    """Create the study, or load it when it exists (another worker, an earlier invocation);
    `on_stale` as for `open_storage`."""
    study = _create_study(spec, study_name, storage_url, on_stale)
    _check_same_objective(study, spec, study_name)
    study.sampler = TrialSeededSampler(spec.sampler, spec.sampler.options.get("seed"), spec.search)
    return study


def _create_study(spec: SweepSpec, study_name: str, storage_url: str,
                  on_stale: StaleTrialCallback | None) -> optuna.Study:
    for attempt in range(STORAGE_ATTEMPTS):
        if attempt:
            time.sleep(attempt)
        try:
            storage = open_storage(storage_url, on_stale)
            return optuna.create_study(study_name=study_name, storage=storage,
                                       direction=spec.direction, pruner=make_pruner(spec.pruner),
                                       load_if_exists=True)
        except TaxonclipError:
            raise
        except Exception as exc:
            error = exc
    raise TrackingError(f"cannot open the Optuna storage {redact(storage_url)}: "
                        f"{_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _check_same_objective(study: optuna.Study, spec: SweepSpec, study_name: str) -> None:
    if study.direction.name.lower() != spec.direction:
        raise _error(spec.path, "direction", f"study {study_name!r} already exists and "
                                             f"{study.direction.name.lower()}s its metric")
    held = study.user_attrs.get(METRIC_ATTR)
    if held is None:
        study.set_user_attr(METRIC_ATTR, spec.metric)
    elif held != spec.metric:
        raise _error(spec.path, "metric", f"study {study_name!r} already exists and optimises "
                                          f"{held}; give another --study_name")


# --- trials ------------------------------------------------------------------------------------

def trial_tags(study_name: str, number: int) -> dict[str, str]:
    """The tags of a trial's child run, which find it under its sweep's run."""
    return {names.TAG_ENTRY: "train", names.TAG_STUDY: study_name, names.TAG_TRIAL: str(number)}


@dataclass
class Objective:
    """One trial: train the suggested configuration in a child run of the sweep's run.

    `failures` holds, by trial number, the run and one-line error of each trial that raised."""

    spec: SweepSpec
    study_name: str
    parent_run_id: str
    train: TrainFunction
    trial_numbers: list[int] = field(default_factory=list)
    failures: dict[int, tuple[str, str]] = field(default_factory=dict)

    def __call__(self, trial: optuna.Trial) -> float:
        self.trial_numbers.append(trial.number)
        # How a sweep that finds this trial RUNNING after this process died finds its run.
        trial.set_user_attr(PARENT_RUN_ATTR, self.parent_run_id)
        suggested = {name: suggest(trial, name, d) for name, d in self.spec.search.items()}
        tags = trial_tags(self.study_name, trial.number)
        params: Mapping[str, Any] = suggested
        try:
            config = self.spec.train_config(suggested)
            params = to_params(config, TRAIN_PARAMS)
            result = self.train(config, parent_run_id=self.parent_run_id,
                                on_epoch=partial(self.report, trial), run_tags=tags)
            value = objective_value(result, self.spec.metric)
            trial.set_user_attr(TEST_ATTR, metric_value(result.table, self.spec.metric))
        except RunKilled as pruned:
            self._link(trial, sweep_runs.child_run_id(self.parent_run_id, tags))
            raise optuna.TrialPruned(str(pruned)) from None
        except Exception as error:
            run_id = sweep_runs.record_failure(self.parent_run_id, tags, params, error)
            self._link(trial, run_id)
            trial.set_user_attr(ERROR_ATTR, f"{type(error).__name__}: {error}"[:1000])
            self.failures[trial.number] = (run_id, f"{type(error).__name__}: {_first_line(error)}")
            if isinstance(error, MetricNotInTable):
                raise
            raise TrialFailed(f"trial {trial.number}: {type(error).__name__}: {error}") from error
        self._link(trial, sweep_runs.child_run_id(self.parent_run_id, tags))
        return value

    def report(self, trial: optuna.Trial, epoch: int, result: EvalResult) -> None:
        """Report the metric of one epoch's validation; end the run KILLED if the pruner says so."""
        trial.report(metric_value(result.table, self.spec.metric), epoch)
        if trial.should_prune():
            raise RunKilled(f"pruned after epoch {epoch}")

    @staticmethod
    def _link(trial: optuna.Trial, run_id: str | None) -> None:
        if run_id is not None:
            trial.set_user_attr(RUN_ID_ATTR, run_id)


def objective_value(result, metric: str) -> float:
    """A trial's objective: `metric` of its selected epoch's validation table, never the test
    table; a training without validation rows has none."""
    if result.validation is None:
        raise ConfigError("a sweep's objective reads the validation table, and this trial has no "
                          "validation rows: give val_size above 0 (fixed: {val_size: 0.1})")
    return metric_value(result.validation, metric)


class FailureLog(logging.Filter):
    """Moves Optuna's log of a trial that failed in `objective` (its message and traceback) into
    the trial's error artifact, and prints one line on stderr in its place."""

    def __init__(self, objective: Objective):
        super().__init__()
        self.objective = objective

    def filter(self, record: logging.LogRecord) -> bool:
        """False (drop it) for Optuna's lines on a failed trial whose run holds the error."""
        numbers = self.objective.trial_numbers
        # Optuna logs a trial's failure right after its objective returns, before the next trial.
        failure = self.objective.failures.get(numbers[-1]) if numbers else None
        if record.funcName != OPTUNA_FAILURE_FUNCTION or failure is None:
            return True
        if record.exc_info:  # the first of Optuna's two lines; the other only says "value None"
            run_id, error = failure
            try:
                Run(run_id).log_text(logging.Formatter().format(record), names.ERROR_ARTIFACT)
            except Exception:  # the artifact holds the error's traceback already: show Optuna's
                return True
            print(f"trial {numbers[-1]} failed: {error} (traceback: {names.ERROR_ARTIFACT} of "
                  f"MLflow run {run_id})", file=sys.stderr)
        return False


@contextlib.contextmanager
def failures_logged_to_runs(objective: Objective) -> Iterator[None]:
    """Within the block, `FailureLog` filters Optuna's log of the trials."""
    logger = logging.getLogger(OPTUNA_TRIAL_LOGGER)
    log = FailureLog(objective)
    logger.addFilter(log)
    try:
        yield
    finally:
        logger.removeFilter(log)


# --- dead sweeps -------------------------------------------------------------------------------

@dataclass
class Reconciler:
    """Closes what sweeps of a study whose process died (SIGKILL, a lost machine) left RUNNING.

    A trial in a database storage is dead once its heartbeat is older than the grace period:
    Optuna fails it and calls `stale_trial`. A sweep run is dead once its heartbeat tag is that
    old; on another machine a live sweep's tag stays fresh, so only dead ones are ended (the
    workers' clocks must agree to well within the grace period). A journal file keeps no
    heartbeat of trials: a RUNNING trial there is dead once the sweep run that started it is.
    """

    study_name: str
    grace_s: int
    trials_beat: bool
    started: str = field(default_factory=sweep_runs.utc_now)
    run_id: str | None = None  # this invocation's sweep run, once started

    def reason(self, detail: str) -> str:
        """The `taxonclip.killed_reason` of a run this invocation ends."""
        return (f"its process stopped sending heartbeats ({detail}); reconciled by the sweep "
                f"started at {self.started} (MLflow run {self.run_id})")

    def reconcile(self, study: optuna.Study) -> None:
        """Before this invocation's first trial: fail the dead trials, end the dead runs KILLED."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # calls stale_trial for each
        dead = self.end_dead_sweeps()
        if not self.trials_beat:
            for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if trial.user_attrs.get(PARENT_RUN_ATTR) in dead:
                    study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
                    self._end_trial_run(trial)

    def stale_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Optuna's callback for a trial it failed as heartbeat-stale: end its run KILLED, and
        the sweep run that died with it."""
        self._end_trial_run(trial)
        try:
            self.end_dead_sweeps()
        except Exception as exc:  # leftovers of another process must not stop this sweep
            print(f"warning: dead sweep runs of study {self.study_name!r} not ended: "
                  f"{_first_line(exc)}", file=sys.stderr)

    def _end_trial_run(self, trial: FrozenTrial) -> None:
        """End the run of a trial just failed for a dead process KILLED, and say so."""
        outcome = ""
        try:
            run_id = self._run_of(trial)
            reason = self.reason(f"trial {trial.number}: none for over {self.grace_s} s")
            if run_id is not None and sweep_runs.end_killed(run_id, reason):
                outcome = f"; its MLflow run {run_id} ended KILLED"
        except Exception as exc:  # leftovers of another process must not stop this sweep
            outcome = f"; its MLflow run not ended: {_first_line(exc)}"
        print(f"study {self.study_name!r}: trial {trial.number} had lost its process and is "
              f"FAILED{outcome}")

    def end_dead_sweeps(self) -> set[str]:
        """End the study's dead sweep runs KILLED; returns their ids."""
        dead = sweep_runs.dead_sweep_runs(self.study_name, self.grace_s, self.run_id)
        for run_id, last_beat in dead.items():
            if sweep_runs.end_killed(run_id, self.reason(f"the last at {last_beat}")):
                print(f"study {self.study_name!r}: sweep run {run_id} had sent no heartbeat "
                      f"since {last_beat}; ended KILLED")
        return set(dead)

    def _run_of(self, trial: FrozenTrial) -> str | None:
        """A trial's MLflow run: its `mlflow_run_id` attribute, set as the trial ends, else the
        run with its tags under the sweep run that started it."""
        parent_run_id = trial.user_attrs.get(PARENT_RUN_ATTR)
        if RUN_ID_ATTR in trial.user_attrs or parent_run_id is None:
            return trial.user_attrs.get(RUN_ID_ATTR)
        return sweep_runs.child_run_id(parent_run_id, trial_tags(self.study_name, trial.number))


def run_sweep(config: SweepConfig, train: TrainFunction = run_training) -> optuna.Study:
    """Run `config.n_trials` trials of the study named by the sweep file (or `study_name`),
    creating it or continuing it, in one MLflow parent run; returns the study.

    Raises ConfigError for a malformed sweep file before any trial, and TaxonclipError when
    every trial of this invocation failed.
    """
    spec = load_sweep(config.sweep, config.overrides)
    study_name = check_study_name(config.study_name or spec.name, "--study_name")
    storage_url = config.storage or default_storage(tracking_uri())
    interval_s, grace_s = heartbeat_timing()
    reconciler = Reconciler(study_name, grace_s,
                            trials_beat=not storage_url.startswith(JOURNAL_PREFIX))
    check_metric_in_data(spec)
    study = open_study(spec, study_name, storage_url, on_stale=reconciler.stale_trial)
    tags = {names.TAG_STUDY: study_name, names.TAG_STORAGE: redact(storage_url),
            names.TAG_METRIC: spec.metric, names.TAG_DIRECTION: spec.direction}
    with (tracked_run("sweep", run_name=f"sweep {study_name}", tags=tags) as run,
          sweep_runs.heartbeat(run.run_id, interval_s)):
        reconciler.run_id = run.run_id
        run.log_params(_sweep_params(config, study_name, storage_url, study))
        run.log_artifact(spec.path, "sweep")
        reconciler.reconcile(study)
        objective = Objective(spec, study_name, run.run_id, train)
        with failures_logged_to_runs(objective):
            study.optimize(objective, n_trials=config.n_trials, timeout=config.timeout,
                           catch=(TrialFailed,), gc_after_trial=True)
        log_summary(study, spec, run)
        print(summary(study, objective.trial_numbers, spec.metric, storage_url))
        _check_some_succeeded(study, objective.trial_numbers)
    return study


def check_metric_in_data(spec: SweepSpec) -> None:
    """Refuse, before any run, a metric whose row the table of the sweep's data will not have
    (a taxa the data lacks); skipped where the data itself is searched."""
    from taxonclip.data.manifest import load_manifest
    from taxonclip.evaluate import check_metric_cell

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
        raise _error(spec.path, "metric", f"{error} of {manifest.report.source}") from None


def _sweep_params(config: SweepConfig, study_name: str, storage_url: str,
                  study: optuna.Study | None = None) -> dict[str, Any]:
    overrides = {f"override.{name}": value for name, value in config.overrides.items()}
    return {**to_params(config, SWEEP_PARAMS), "storage": redact(storage_url), "study_name": study_name,
            **overrides, **_seed_params(study)}


def _seed_params(study: optuna.Study | None) -> dict[str, Any]:
    """How this worker's sampler is seeded: each trial with the sweep's seed + its number."""
    sampler = getattr(study, "sampler", None)
    if not isinstance(sampler, TrialSeededSampler):
        return {}
    return {"sampler_seed": "fresh per trial" if sampler.seed is None else
            f"{sampler.seed} + trial number"}


def _trials(study: optuna.Study, numbers: list[int]) -> list[optuna.trial.FrozenTrial]:
    wanted = set(numbers)
    return [t for t in study.get_trials(deepcopy=False) if t.number in wanted]


def _check_some_succeeded(study: optuna.Study, numbers: list[int]) -> None:
    mine = _trials(study, numbers)
    if mine and all(t.state == TrialState.FAIL for t in mine):
        first = mine[0]
        raise TaxonclipError(f"all {len(mine)} trials of study {study.study_name!r} failed; trial "
                             f"{first.number}: {first.user_attrs.get(ERROR_ATTR, 'see its run')}")


# --- results -----------------------------------------------------------------------------------

def log_summary(study: optuna.Study, spec: SweepSpec, run: Run) -> None:
    """On the sweep's run: the best trial's params (`best.<name>`), its metric (`best.<metric>`),
    a tag naming its child run, and the optimisation history and importance plots."""
    import matplotlib.pyplot as plt

    if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        best = study.best_trial
        run.log_params({"best.trial": best.number,
                        **{f"best.{name}": value for name, value in best.params.items()}})
        test = best.user_attrs.get(TEST_ATTR)
        test_key = f"best.{names.EVAL_PREFIX}/{spec.metric.partition('/')[2]}"
        run.log_metrics({f"best.{spec.metric}": best.value,
                         **({test_key: test} if test is not None else {})})
        run.set_tags({names.TAG_BEST_CHILD: best.user_attrs.get(RUN_ID_ATTR, "")})
    for name, figure in plots(study).items():
        run.log_figure(figure, f"plots/{name}.png")
        plt.close(figure)


def plots(study: optuna.Study) -> dict[str, Any]:
    """Optuna's optimisation history and, when two complete trials differ in some parameter,
    parameter importances, as matplotlib figures."""
    import matplotlib

    matplotlib.use("Agg")  # sweeps run on servers without a display
    from optuna.visualization import matplotlib as optuna_plots

    figures = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        figures["optimization_history"] = optuna_plots.plot_optimization_history(study).figure
        if _importances_defined(study):
            try:
                figures["param_importances"] = optuna_plots.plot_param_importances(study).figure
            except (ValueError, RuntimeError) as exc:
                print(f"parameter importances not plotted: {exc}")
    return figures


def _importances_defined(study: optuna.Study) -> bool:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    names_seen = {name for trial in complete for name in trial.params}
    return len(complete) >= 2 and any(
        len({repr(t.params.get(name)) for t in complete}) > 1 for name in names_seen)


def summary(study: optuna.Study, numbers: list[int], metric: str, storage_url: str) -> str:
    """A few lines on what this invocation did and where to look."""
    mine = _trials(study, numbers)
    counts = {state: sum(t.state == state for t in mine) for state in TrialState}
    lines = [f"study {study.study_name!r}: {len(mine)} trials run now "
             f"({counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned, "
             f"{counts[TrialState.FAIL]} failed), {len(study.get_trials(deepcopy=False))} in all"]
    for trial in mine:
        if trial.state == TrialState.COMPLETE:
            lines.append(f"  trial {trial.number}: validation {metric} = "
                         f"{percent(trial.value)}%, {trial.params}")
    if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        best = study.best_trial
        test = best.user_attrs.get(TEST_ATTR)
        cell = metric.partition("/")[2]
        tested = ("" if test is None else
                  f"; its model on the test split, scored once: {cell} = {percent(test)}%")
        lines.append(f"best: trial {best.number}, validation {metric} = {percent(best.value)}%"
                     f"{tested}, {best.params} (MLflow run "
                     f"{best.user_attrs.get(RUN_ID_ATTR, '?')})")
    lines.append(f"watch the study: optuna-dashboard {dashboard_target(storage_url)}")
    return "\n".join(lines)
