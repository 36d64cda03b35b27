"""Optuna studies over training parameters, described by `sweeps/*.yaml` files.

A sweep file names the study, the metric, the sampler and pruner, the fixed training parameters
and the searched ones (training parameters go by their `train` entry-point names):

    name: margin_lr                        # the study name unless --study_name is given
    metric: eval/All/species/top1_cos      # eval/<taxa>/<level>/<metric> of the per-taxa table
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
each `sweep` invocation starts, and reports the metric after every evaluation so the pruner can
stop it (the child run then ends KILLED). A trial that raises (out of memory, NaN loss, ...) ends
FAILED, its error in the child run (tag `taxonclip.error`, artifact `error.txt`), and the study
goes on. `n_trials` counts the trials of one invocation: every worker runs that many.

The seed of the sampler holds for a study stored in SQLite (one worker), offset by the trials the
study already holds so that a continued study does not repeat them; workers sharing PostgreSQL,
MySQL or a journal file each draw a fresh seed, so that workers started together do not suggest
the same values.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import yaml
from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution,
                                  IntDistribution)
from optuna.trial import TrialState

from taxonclip import names
from taxonclip.tracking import sweeps as sweep_runs
from taxonclip.tracking.runs import Run, RunKilled, tracked_run, tracking_uri
from taxonclip.config import SWEEP_PARAMS, TRAIN_PARAMS, SweepConfig, TrainConfig, from_params, to_params
from taxonclip.errors import ConfigError, MetricNotInTable, TaxonclipError, TrackingError
from taxonclip.evaluate import EvalResult, table_cell
from taxonclip.train import run_training

TOP_LEVEL_KEYS = ("name", "metric", "direction", "sampler", "pruner", "fixed", "search")
DIRECTIONS = ("maximize", "minimize")
DEFAULT_METRIC = f"eval/{names.HEADLINE_METRIC}"
SAMPLER_OPTIONS = {"tpe": ("seed", "n_startup_trials", "multivariate", "constant_liar"),
                   "random": ("seed",)}
PRUNER_OPTIONS = {"median": ("n_startup_trials", "n_warmup_steps", "interval_steps"),
                  "hyperband": ("min_resource", "max_resource", "reduction_factor"),
                  "threshold": ("lower", "upper", "n_warmup_steps", "interval_steps"),
                  "none": ()}
DISTRIBUTION_KEYS = {"float": ("low", "high", "log", "step"), "int": ("low", "high", "log", "step"),
                     "categorical": ("choices",)}
SHARED_STORAGE_PREFIXES = ("postgresql", "mysql", "journal:")
JOURNAL_PREFIX = "journal:"
OPTUNA_DB = "optuna.db"
# Workers on other machines mark a trial FAILED once its worker has been silent this long.
HEARTBEAT_S, GRACE_S = 60, 300
# Workers opening a fresh PostgreSQL database at once race to create Optuna's tables.
STORAGE_ATTEMPTS = 3

RUN_ID_ATTR = "mlflow_run_id"
ERROR_ATTR = "error"
METRIC_ATTR = "metric"

TrainFunction = Callable[..., EvalResult]
"""Called like `taxonclip.train.run_training(config, parent_run_id=, on_epoch=, run_tags=)`."""


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
        metric = self.metric.removeprefix("eval/")
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
    _check_buildable(spec)
    return spec


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
    if prefix != "eval" or not names.is_table_key(cell):
        raise _error(path, "metric", f"{key!r} is not eval/<taxa>/<level>/<metric> with <level> "
                                     f"one of {', '.join(names.LEVELS)} and <metric> one of "
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
        if section == "sampler":
            make_sampler(component, seed)
        else:
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


def make_sampler(component: Component, seed: int | None) -> optuna.samplers.BaseSampler:
    """The Optuna sampler of a sweep file, seeded with `seed` (None: a fresh seed)."""
    options = {**component.options, "seed": seed}
    if component.type == "random":
        return optuna.samplers.RandomSampler(**options)
    return optuna.samplers.TPESampler(**options)


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
    """The cell of a per-taxa table named `eval/<taxa>/<level>/<metric>` (NaN where it is empty)."""
    return table_cell(table, key.removeprefix("eval/"))


# --- storage -----------------------------------------------------------------------------------

def default_storage(tracking_uri: str) -> str:
    """`optuna.db` beside a SQLite MLflow store, else `sqlite:///optuna.db` in this folder."""
    if tracking_uri.startswith("sqlite:///"):
        return f"{tracking_uri.rsplit('/', 1)[0]}/{OPTUNA_DB}"
    return f"sqlite:///{OPTUNA_DB}"


def redact(url: str) -> str:
    """The storage URL with any password replaced by `***`."""
    url = re.sub(r"^([a-z0-9+]+://[^:/@]*):[^@/]*@", r"\1:***@", url, flags=re.IGNORECASE)
    return re.sub(r"(password=)[^&]*", r"\1***", url, flags=re.IGNORECASE)


def is_shared(url: str) -> bool:
    """Whether several workers can share the storage (PostgreSQL, MySQL, journal file)."""
    return url.startswith(SHARED_STORAGE_PREFIXES)


def open_storage(url: str) -> str | optuna.storages.BaseStorage:
    """The Optuna storage of a URL: `sqlite:///FILE`, `postgresql://...`, `mysql://...` or
    `journal:FILE` (a journal file on a disk every worker mounts)."""
    if url.startswith(JOURNAL_PREFIX):
        backend = optuna.storages.journal.JournalFileBackend(url[len(JOURNAL_PREFIX):])
        return optuna.storages.JournalStorage(backend)
    if url.startswith(("postgresql", "mysql")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(_with_driver(url), heartbeat_interval=HEARTBEAT_S,
                                              grace_period=GRACE_S)
    if url.startswith("sqlite:///"):
        return url
    raise ConfigError(f"storage {redact(url)!r}: use sqlite:///FILE, postgresql://USER@HOST/DB, "
                      f"mysql://USER@HOST/DB or journal:FILE")


def _with_driver(url: str) -> str:
    """`postgresql://` names no driver, and SQLAlchemy 2.1 then wants psycopg 3: use psycopg2
    (the project's `postgres` extra) where only that one is installed."""
    bare = "postgresql://"
    if url.startswith(bare) and find_spec("psycopg") is None and find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2://{url[len(bare):]}"
    return url


def open_study(spec: SweepSpec, study_name: str, storage_url: str) -> optuna.Study:
    """Create the study, or load it when it exists (another worker, an earlier invocation)."""
    study = _create_study(spec, study_name, storage_url)
    _check_same_objective(study, spec, study_name)
    seed = spec.sampler.options.get("seed")
    if is_shared(storage_url):
        seed = None
    elif seed is not None:
        seed += len(study.get_trials(deepcopy=False))
    study.sampler = make_sampler(spec.sampler, seed)
    return study


def _create_study(spec: SweepSpec, study_name: str, storage_url: str) -> optuna.Study:
    for attempt in range(STORAGE_ATTEMPTS):
        if attempt:
            time.sleep(attempt)
        try:
            return optuna.create_study(study_name=study_name, storage=open_storage(storage_url),
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

@dataclass
class Objective:
    """One trial: train the suggested configuration in a child run of the sweep's run."""

    spec: SweepSpec
    study_name: str
    parent_run_id: str
    train: TrainFunction
    trial_numbers: list[int] = field(default_factory=list)

    def __call__(self, trial: optuna.Trial) -> float:
        self.trial_numbers.append(trial.number)
        suggested = {name: suggest(trial, name, d) for name, d in self.spec.search.items()}
        tags = {names.TAG_ENTRY: "train", names.TAG_STUDY: self.study_name,
                names.TAG_TRIAL: str(trial.number)}
        params: Mapping[str, Any] = suggested
        try:
            config = self.spec.train_config(suggested)
            params = to_params(config, TRAIN_PARAMS)
            result = self.train(config, parent_run_id=self.parent_run_id,
                                on_epoch=partial(self.report, trial), run_tags=tags)
            value = metric_value(result.table, self.spec.metric)
        except RunKilled as pruned:
            self._link(trial, sweep_runs.child_run_id(self.parent_run_id, tags))
            raise optuna.TrialPruned(str(pruned)) from None
        except Exception as error:
            self._link(trial, sweep_runs.record_failure(self.parent_run_id, tags, params, error))
            trial.set_user_attr(ERROR_ATTR, f"{type(error).__name__}: {error}"[:1000])
            if isinstance(error, MetricNotInTable):
                raise
            raise TrialFailed(f"trial {trial.number}: {type(error).__name__}: {error}") from error
        self._link(trial, sweep_runs.child_run_id(self.parent_run_id, tags))
        return value

    def report(self, trial: optuna.Trial, epoch: int, result: EvalResult) -> None:
        """Report the metric of one epoch's evaluation; end the run KILLED if the pruner says so."""
        trial.report(metric_value(result.table, self.spec.metric), epoch)
        if trial.should_prune():
            raise RunKilled(f"pruned after epoch {epoch}")

    @staticmethod
    def _link(trial: optuna.Trial, run_id: str | None) -> None:
        if run_id is not None:
            trial.set_user_attr(RUN_ID_ATTR, run_id)


def run_sweep(config: SweepConfig, train: TrainFunction = run_training) -> optuna.Study:
    """Run `config.n_trials` trials of the study named by the sweep file (or `study_name`),
    creating it or continuing it, in one MLflow parent run; returns the study.

    Raises ConfigError for a malformed sweep file before any trial, and TaxonclipError when
    every trial of this invocation failed.
    """
    spec = load_sweep(config.sweep, config.overrides)
    study_name = check_study_name(config.study_name or spec.name, "--study_name")
    storage_url = config.storage or default_storage(tracking_uri())
    study = open_study(spec, study_name, storage_url)
    tags = {names.TAG_STUDY: study_name, names.TAG_STORAGE: redact(storage_url),
            names.TAG_METRIC: spec.metric, names.TAG_DIRECTION: spec.direction}
    with tracked_run("sweep", run_name=f"sweep {study_name}", tags=tags) as run:
        run.log_params(_sweep_params(config, study_name, storage_url))
        run.log_artifact(spec.path, "sweep")
        objective = Objective(spec, study_name, run.run_id, train)
        study.optimize(objective, n_trials=config.n_trials, timeout=config.timeout,
                       catch=(TrialFailed,), gc_after_trial=True)
        log_summary(study, spec, run)
        print(summary(study, objective.trial_numbers, spec.metric, storage_url))
        _check_some_succeeded(study, objective.trial_numbers)
    return study


def _sweep_params(config: SweepConfig, study_name: str, storage_url: str) -> dict[str, Any]:
    overrides = {f"override.{name}": value for name, value in config.overrides.items()}
    return {**to_params(config, SWEEP_PARAMS), "storage": redact(storage_url), "study_name": study_name,
            **overrides}


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
        run.log_metrics({f"best.{spec.metric}": best.value})
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
    if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        best = study.best_trial
        lines.append(f"best: trial {best.number}, {metric} = {best.value:.4f}, {best.params} "
                     f"(MLflow run {best.user_attrs.get(RUN_ID_ATTR, '?')})")
    lines.append(f"watch the study: optuna-dashboard {redact(_with_driver(storage_url))}")
    return "\n".join(lines)
