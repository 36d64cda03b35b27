"""What a sweep shows of its study: the best trial on the sweep's MLflow run, Optuna's plots,
and the few lines printed at the end of an invocation."""

from __future__ import annotations

import warnings
from typing import Any

import optuna
from optuna.trial import TrialState

from taxonclip import names
from taxonclip.formats import percent
from taxonclip.sweep.spec import SweepSpec
from taxonclip.sweep.storage import RUN_ID_ATTR, TEST_ATTR, dashboard_target
from taxonclip.tracking.run_logging import Run


def numbered_trials(study: optuna.Study, numbers: list[int]) -> list[optuna.trial.FrozenTrial]:
    """The trials of `study` numbered in `numbers` (those one invocation ran)."""
    wanted = set(numbers)
    return [t for t in study.get_trials(deepcopy=False) if t.number in wanted]


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
    mine = numbered_trials(study, numbers)
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
