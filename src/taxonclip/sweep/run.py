"""Running a study: the objective, the trial-seeded sampler, the reconciler of dead sweeps and
`run_sweep`.

Every trial trains through `taxonclip.train.run_training`, in a child MLflow run of the one run
each `sweep` invocation starts, and reports the metric of the validation table after every
evaluation so the pruner can stop it (the child run then ends KILLED). The objective is that
metric of the trial's selected epoch, on the validation rows: no choice of a sweep reads the
test split. Each trial's run still scores its model once on the test split; the summary shows
that result for the best trial only (`best.eval/<cell>`), a number no choice was made on. A
trial that raises (out of memory, NaN loss, ...) ends FAILED, its error in the child run (tag
`taxonclip.error`, artifact `error.txt`, which also takes Optuna's log of the failure, leaving
one line on stderr), and the study goes on. `n_trials` counts the trials of one invocation:
every worker runs that many.

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
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import optuna
import pandas as pd
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from taxonclip import names
from taxonclip.tracking import sweeps as sweep_runs
from taxonclip.tracking.connection import tracking_uri
from taxonclip.tracking.run_logging import Run
from taxonclip.tracking.runs import RunKilled, tracked_run
from taxonclip.config import SWEEP_PARAMS, TRAIN_PARAMS, SweepConfig, to_params
from taxonclip.errors import ConfigError, MetricNotInTable, TaxonclipError, TrackingError
from taxonclip.table import EvalResult, table_cell
from taxonclip.sweep.report import log_summary, numbered_trials, summary
from taxonclip.sweep.spec import (Component, SweepSpec, check_metric_in_data, check_study_name,
                                  load_sweep, make_pruner, make_sampler, spec_error)
from taxonclip.sweep.storage import (ERROR_ATTR, JOURNAL_PREFIX, METRIC_ATTR, PARENT_RUN_ATTR,
                                     RUN_ID_ATTR, TEST_ATTR, StaleTrialCallback, default_storage,
                                     heartbeat_timing, open_storage, redact)
from taxonclip.train import run_training

# Workers opening a fresh PostgreSQL database at once race to create Optuna's tables.
STORAGE_ATTEMPTS = 3
# The logger of Optuna's "Trial N failed ... because of the following error" and its traceback,
# and the function that logs them (private to Optuna: renamed, their lines pass untouched).
OPTUNA_TRIAL_LOGGER = "optuna.study._optimize"
OPTUNA_FAILURE_FUNCTION = "_log_failed_trial"

TrainFunction = Callable[..., EvalResult]
"""Called like `taxonclip.train.run_training(config, parent_run_id=, on_epoch=, run_tags=)`."""


class TrialFailed(Exception):
    """A trial that raised: recorded FAILED while the study goes on."""


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
        raise spec_error(spec.path, "direction", f"study {study_name!r} already exists and "
                                                 f"{study.direction.name.lower()}s its metric")
    held = study.user_attrs.get(METRIC_ATTR)
    if held is None:
        study.set_user_attr(METRIC_ATTR, spec.metric)
    elif held != spec.metric:
        raise spec_error(spec.path, "metric", f"study {study_name!r} already exists and "
                                              f"optimises {held}; give another --study_name")


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


def _check_some_succeeded(study: optuna.Study, numbers: list[int]) -> None:
    mine = numbered_trials(study, numbers)
    if mine and all(t.state == TrialState.FAIL for t in mine):
        first = mine[0]
        raise TaxonclipError(f"all {len(mine)} trials of study {study.study_name!r} failed; trial "
                             f"{first.number}: {first.user_attrs.get(ERROR_ATTR, 'see its run')}")
