"""`compare` against a real MLflow server holding real eval, train and sweep-trial runs."""

from __future__ import annotations

import math
import re

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from taxonclip import names, tracking
from taxonclip.cli import main
from taxonclip.compare import compare_runs, registry_name
from taxonclip.config import CompareConfig
from taxonclip.tracking import RunRecord
from tests.conftest import REPO

pytestmark = pytest.mark.integration

EXPERIMENT = "compare-tests"
REGISTERED = "taxonclip-tiny"  # the name `promote` gives tiny models
METRIC = "All/species/top1_cos"
TIE_BREAK = "All/species/mean_cos"
TRAIN_ARGS = ["--model", "tiny", "--batch_size", "16", "--workers", "0", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def populated(mlflow_server, specimens, tmp_path_factory) -> dict[str, str]:
    """Two baselines, a fine-tuned run, a sweep of two trials and a run without a table, all in
    one experiment of the session's server; returns the sweep's and the bare run's ids."""
    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    patch.setenv("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    patch.delenv("MLFLOW_RUN_ID", raising=False)
    patch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mlflow.set_tracking_uri(mlflow_server)
    data = ["--data", str(specimens)]
    assert main(["eval", "--model", "tiny", *data, "--workers", "0"]) == 0
    assert main(["eval", "--model", "tiny", *data, "--seed", "1", "--workers", "0"]) == 0
    assert main(["train", *TRAIN_ARGS, *data, "--epochs", "2", "--register_as", REGISTERED]) == 0
    storage = tmp_path_factory.mktemp("optuna") / "optuna.db"
    assert main(["sweep", "--sweep", str(REPO / "sweeps" / "margin_lr.yaml"), "--n_trials", "2",
                 "--storage", f"sqlite:///{storage}", "--study_name", "compare-m2",
                 "-P", f"data={specimens}", "-P", "epochs=1", "-P", "batch_size=16",
                 "-P", "workers=0"]) == 0
    with tracking.tracked_run("eval", run_name="no table") as bare:
        bare.log_params({"model": "tiny"})
    client = MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    [sweep] = client.search_runs([experiment.experiment_id],
                                 f"tags.`{names.TAG_ENTRY}` = 'sweep'")
    yield {"parent": sweep.info.run_id, "bare": bare.run_id}
    patch.undo()


def _scored_runs() -> list:
    """The experiment's eval and train runs that logged the metric, read straight from MLflow."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    key = names.eval_metric(*METRIC.split("/"))
    return [run for run in client.search_runs([experiment.experiment_id])
            if key in run.data.metrics and run.data.tags[names.TAG_ENTRY] in ("eval", "train")]


def _order_key(run) -> tuple[float, float, int]:
    metrics = run.data.metrics
    return (metrics[names.eval_metric(*METRIC.split("/"))],
            metrics[names.eval_metric(*TIE_BREAK.split("/"))], run.info.start_time)


def test_ranking_follows_the_metric_read_back_through_the_client(populated):
    comparison = compare_runs(CompareConfig(experiments=EXPERIMENT))
    expected = sorted(_scored_runs(), key=_order_key, reverse=True)
    assert list(comparison.board.index) == [run.info.run_id for run in expected]
    assert list(comparison.board["rank"]) == list(range(1, len(expected) + 1))
    for run in expected:
        metric = run.data.metrics[names.eval_metric(*METRIC.split("/"))]
        assert comparison.board.at[run.info.run_id, METRIC] == pytest.approx(metric)
    kinds = comparison.board["kind"].value_counts().to_dict()
    assert kinds == {"eval": 2, "train": 1, "sweep trial": 2}


def test_gain_is_the_difference_to_the_best_baseline_of_the_same_model_and_data(populated):
    comparison = compare_runs(CompareConfig(experiments=EXPERIMENT))
    runs = _scored_runs()
    key = names.eval_metric(*METRIC.split("/"))
    for run in runs:
        params = run.data.params
        baselines = [b for b in runs if b.data.tags[names.TAG_ENTRY] == "eval"
                     and (b.data.params["model"], b.data.params["data"]) ==
                     (params["model"], params["data"])]
        gain = comparison.board.at[run.info.run_id, "gain"]
        if run.data.tags[names.TAG_ENTRY] == "eval":
            assert math.isnan(gain)
            continue
        best = max(baselines, key=_order_key)
        assert gain == pytest.approx(run.data.metrics[key] - best.data.metrics[key])
        assert comparison.board.at[run.info.run_id, "baseline_run_id"] == best.info.run_id


def test_report_is_self_contained_lists_skipped_runs_and_is_logged(populated, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["compare", "--experiments", EXPERIMENT, "--out", str(out), "--top", "4"]) == 0
    printed = capsys.readouterr().out
    assert populated["bare"] in printed and "skipped 1 run" in printed
    assert populated["parent"] not in printed
    assert f"report: {(out / 'report.html').resolve()}" in printed

    page = (out / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    assert "<script" not in page and "<link" not in page and "@import" not in page
    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert plots == ["metric_by_taxa.png", f"sweep_{populated['parent'][:8]}.png",
                     "training_curves.png"]
    assert page.count('<img src="data:image/png;base64,') == len(plots)
    assert populated["bare"] in page and populated["bare"] in (out / "report.md").read_text()

    client = MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    [compare_run] = client.search_runs([experiment.experiment_id],
                                       f"tags.`{names.TAG_ENTRY}` = 'compare'")
    logged = {a.path for a in client.list_artifacts(compare_run.info.run_id)}
    logged |= {a.path for a in client.list_artifacts(compare_run.info.run_id, "plots")}
    assert {"report.html", "report.md", "leaderboard.csv"} <= logged
    assert {f"plots/{name}" for name in plots} <= logged


def test_bad_metric_and_unknown_experiment_are_one_clear_message(populated, capsys):
    assert main(["compare", "--experiments", EXPERIMENT, "--metric", "All/species/nope"]) == 1
    error = capsys.readouterr().err
    assert "'All/species/nope'" in error and "top1_cos" in error and "Traceback" not in error
    assert main(["compare", "--experiments", f"{EXPERIMENT},no-such-experiment"]) == 1
    error = capsys.readouterr().err
    assert "'no-such-experiment'" in error and "Traceback" not in error


def _aliases(client: MlflowClient) -> dict[str, str]:
    """champion, challenger and staging of the registered model, as the run ids they point at."""
    return {alias: client.get_model_version_by_alias(REGISTERED, alias).run_id
            for alias in ("champion", "challenger", "staging")}


def _versions(client: MlflowClient) -> list[tuple[str, str, str]]:
    return sorted((v.name, v.version, v.run_id) for v in client.search_model_versions())


def test_promote_moves_champion_and_challenger_and_is_idempotent(populated, tmp_path):
    client = MlflowClient()
    trained = sorted((run.info.run_id for run in _scored_runs()
                      if run.data.tags[names.TAG_ENTRY] == "train"),
                     key=lambda run_id: _order_key(client.get_run(run_id)), reverse=True)
    [registered_at_training] = client.search_model_versions(f"name = '{REGISTERED}'")
    client.set_registered_model_alias(REGISTERED, "staging", registered_at_training.version)
    promote = ["compare", "--experiments", EXPERIMENT, "--promote", "true", "--out", str(tmp_path)]

    assert main([*promote, "--filter", f"attributes.run_id != '{trained[0]}'"]) == 0
    assert _aliases(client) == {"champion": trained[1], "challenger": trained[2],
                                "staging": registered_at_training.run_id}
    assert main(promote) == 0
    assert _aliases(client) == {"champion": trained[0], "challenger": trained[1],
                                "staging": registered_at_training.run_id}
    registry = _versions(client)
    assert len({run_id for _, _, run_id in registry}) == len(registry), "a run registered twice"
    assert main(promote) == 0
    assert _aliases(client) == {"champion": trained[0], "challenger": trained[1],
                                "staging": registered_at_training.run_id}
    assert _versions(client) == registry


def test_registered_name_is_register_as_else_the_sanitised_model():
    run = RunRecord("id", "0", "train", "FINISHED", 0, "train", None,
                    params={"model": "ViT-L/14@336px", "register_as": ""})
    assert registry_name(run) == "taxonclip-ViT-L-14-336px"
    named = RunRecord("id", "0", "train", "FINISHED", 0, "train", None,
                      params={"model": "tiny", "register_as": "birds"})
    assert registry_name(named) == "birds"
