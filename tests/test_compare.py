"""`compare` against a real MLflow server holding real eval, train and sweep-trial runs."""

from __future__ import annotations

import html
import math
import re
import shlex

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from taxonclip import names
from taxonclip.cli import main
from taxonclip.compare.baseline import (add_gains, architecture, baseline_key,
                                        is_pretrained_baseline, normalised)
from taxonclip.compare.promote import registry_name
from taxonclip.compare.run import compare_runs
from taxonclip.config import CompareConfig, DataConfig
from taxonclip.data.manifest import read_manifest
from taxonclip.data.splits import make_split, split_fingerprint, split_roles
from taxonclip.tracking.queries import RunRecord
from taxonclip.tracking.runs import tracked_run
from tests.helpers import REPO

pytestmark = pytest.mark.integration

EXPERIMENT = "compare-tests"
REGISTERED = "taxonclip-tiny"  # the name `promote` gives tiny models
METRIC = "All/species/top1_cos"
TIE_BREAK = "All/species/mean_cos"
TRAIN_ARGS = ["--model", "tiny", "--batch_size", "16", "--workers", "0", "--lr", "1e-3"]
# The rule a baseline follows, spelled out here rather than imported, so that the tests check
# compare's own list: the same split (by its fingerprint tag) and these parameters.
SAME_AS_BASELINE = ("model", "embedding")


@pytest.fixture(scope="module")
def populated(mlflow_server, specimens, tmp_path_factory) -> dict[str, str]:
    """In one experiment of the session's server: the pretrained baseline of the tiny model, an
    eval of it with `weights=none` and a pretrained eval on another seed (neither a baseline of the
    runs on seed 0), a fine-tuned run, one on another test split (no baseline matches it), a sweep
    of two trials and a run without a table; returns their run ids."""
    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    patch.setenv("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    patch.delenv("MLFLOW_RUN_ID", raising=False)
    patch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mlflow.set_tracking_uri(mlflow_server)
    data = ["--data", str(specimens)]
    ids = {}
    for name, args in (("baseline", ["eval", "--model", "tiny", *data]),
                       ("random", ["eval", "--model", "tiny", *data, "--weights", "none"]),
                       ("other_seed", ["eval", "--model", "tiny", *data, "--seed", "1"])):
        assert main([*args, "--workers", "0"]) == 0
        ids[name] = _newest_run_id()
    assert main(["train", *TRAIN_ARGS, *data, "--epochs", "2", "--register_as", REGISTERED]) == 0
    ids["trained"] = _newest_run_id()
    # 0.4 of 8 images a species: 3 test images, where 0.2 (and 0.3) take 2: another split
    assert main(["train", *TRAIN_ARGS, *data, "--epochs", "1", "--test_size", "0.4"]) == 0
    ids["unmatched"] = _newest_run_id()
    storage = tmp_path_factory.mktemp("optuna") / "optuna.db"
    assert main(["sweep", "--sweep", str(REPO / "sweeps" / "margin_lr.yaml"), "--n_trials", "2",
                 "--storage", f"sqlite:///{storage}", "--study_name", "compare-m2",
                 "-P", f"data={specimens}", "-P", "epochs=1", "-P", "batch_size=16",
                 "-P", "workers=0"]) == 0
    with tracked_run("eval", run_name="no table") as bare:
        bare.log_params({"model": "tiny"})
    client = MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    [sweep] = client.search_runs([experiment.experiment_id],
                                 f"tags.`{names.TAG_ENTRY}` = 'sweep'")
    yield {**ids, "parent": sweep.info.run_id, "bare": bare.run_id}
    patch.undo()


def _newest_run_id() -> str:
    """The run started last in the test experiment."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    [run] = client.search_runs([experiment.experiment_id], max_results=1,
                               order_by=["attributes.start_time DESC"])
    return run.info.run_id


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
    assert kinds == {"eval": 3, "train": 2, "sweep trial": 2}


def _is_baseline(run) -> bool:
    """A pretrained baseline as the client shows it: an eval run of the tiny model's own weights
    (every eval here names a registry model)."""
    return run.data.tags[names.TAG_ENTRY] == "eval" and run.data.params["weights"] == "pretrained"


def _expected_baseline(run, runs: list):
    """The best-ranked baseline with the same parameters (all logged, in one spelling, by the
    commands that made these runs), or None."""
    fingerprint = run.data.tags[names.TAG_SPLIT_FINGERPRINT]
    same = [b for b in runs if _is_baseline(b) and all(
        b.data.params[name] == run.data.params[name] for name in SAME_AS_BASELINE)
        and b.data.tags[names.TAG_SPLIT_FINGERPRINT] == fingerprint]
    return max(same, key=_order_key, default=None)


def test_gain_is_the_difference_to_the_best_pretrained_baseline_of_the_same_params(populated):
    comparison = compare_runs(CompareConfig(experiments=EXPERIMENT))
    runs = _scored_runs()
    key = names.eval_metric(*METRIC.split("/"))
    matched = 0
    for run in runs:
        row = comparison.board.loc[run.info.run_id]
        best = None if _is_baseline(run) else _expected_baseline(run, runs)
        if best is None:
            assert math.isnan(row["gain"]) and pd.isna(row["baseline_run_id"])
            assert (row["baseline_missing"] != "") == (not _is_baseline(run))
            continue
        matched += 1
        assert row["gain"] == pytest.approx(run.data.metrics[key] - best.data.metrics[key])
        assert row["baseline_run_id"] == best.info.run_id and row["baseline_missing"] == ""
    # the train run, both trials and the weights=none eval
    assert matched == 4


def _cell_where_higher(wrong_id: str, right_id: str) -> str:
    """The table cell (`taxa/level/score`) in which run `wrong_id` beats run `right_id` most."""
    client = MlflowClient()
    wrong, right = client.get_run(wrong_id).data.metrics, client.get_run(right_id).data.metrics
    cells = [key for key in right if key.startswith("eval/") and len(key.split("/")) == 4
             and key.rsplit("/", 1)[1] not in names.COUNT_COLUMNS]
    best = max(sorted(cells), key=lambda cell: wrong[cell] - right[cell])
    assert wrong[best] > right[best], f"run {wrong_id} scores below {right_id} in every cell"
    return best.removeprefix("eval/")


@pytest.mark.parametrize("wrong", ["random", "other_seed"])
def test_baseline_is_the_matching_pretrained_eval_even_where_another_eval_ranks_higher(
        populated, wrong):
    # Ranked by a cell where the weights=none (or other-seed) eval beats the true baseline, so
    # that taking it as the baseline would show.
    metric = _cell_where_higher(populated[wrong], populated["baseline"])
    board = compare_runs(CompareConfig(experiments=EXPERIMENT, metric=metric)).board
    assert board.at[populated[wrong], "rank"] < board.at[populated["baseline"], "rank"]
    matching = board[board["baseline_run_id"].notna()]
    assert set(matching["baseline_run_id"]) == {populated["baseline"]}
    assert populated["trained"] in matching.index and populated["other_seed"] not in matching.index
    assert board.at[populated["trained"], "gain"] == pytest.approx(
        board.at[populated["trained"], metric] - board.at[populated["baseline"], metric])


def _printed_gain(block: list[str], run_id: str) -> str:
    """The gain column (third, after rank and metric) of `run_id`'s row of a printed board."""
    [row] = [line for line in block if run_id in line]
    return row.split()[2]


def test_side_by_side_gain_is_the_leaderboard_gain_of_the_same_run(populated, tmp_path, capsys):
    assert main(["compare", "--experiments", EXPERIMENT, "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    [at] = [i for i, line in enumerate(lines) if "vs its pretrained baseline" in line]
    tuned_id, base_id = re.findall(r"\(([0-9a-f]{32})\)", lines[at])
    metric_cell = METRIC.rsplit("/", 1)[0]
    [cell_row] = [line for line in lines[at + 2:] if line.split()[:1] == [metric_cell]]
    heading = next(i for i, line in enumerate(lines) if "run(s) ranked by" in line)
    board_block = lines[heading + 1:lines.index("", heading)]
    assert cell_row.split()[-1] == _printed_gain(board_block, tuned_id)

    runs = _scored_runs()
    # the side-by-side shows a fine-tuned run: not an eval of a registry model (weights=none)
    fine_tuned = [run for run in runs if run.data.tags[names.TAG_ENTRY] != "eval"
                  or run.data.params["model"].startswith(("runs:/", "models:/"))]
    with_baseline = [run for run in sorted(fine_tuned, key=_order_key, reverse=True)
                     if _expected_baseline(run, runs) is not None]
    assert tuned_id == with_baseline[0].info.run_id
    assert base_id == _expected_baseline(with_baseline[0], runs).info.run_id


def test_a_run_without_a_matching_baseline_has_no_gain_and_its_baseline_is_named(
        populated, specimens, tmp_path, capsys):
    command = (f"taxonclip eval --model tiny --embedding visual --data "
               f"{shlex.quote(str(specimens))} --test_size 0.4")
    board = compare_runs(CompareConfig(experiments=EXPERIMENT)).board
    unmatched = board.loc[populated["unmatched"]]
    assert math.isnan(unmatched["gain"]) and pd.isna(unmatched["baseline_run_id"])
    assert unmatched["baseline_missing"] == command
    assert (board["baseline_missing"] != "").sum() == 1

    assert main(["compare", "--experiments", EXPERIMENT, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert f"{command}  (1 run(s): #{unmatched['rank']})" in printed
    report = (tmp_path / "report.md").read_text()
    assert "## Missing baselines" in report and command in report
    page = (tmp_path / "report.html").read_text()
    assert "<h2>Missing baselines</h2>" in page and html.escape(command) in page


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
                                       f"tags.`{names.TAG_ENTRY}` = 'compare'", max_results=1,
                                       order_by=["attributes.start_time DESC"])
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


def _record(run_id: str, entry: str, fingerprint: str = "f" * 64, **params: str) -> RunRecord:
    """A run as `find_runs` reads it, with only an entry point, parameters and its split's
    fingerprint."""
    return RunRecord(run_id, "0", run_id, "FINISHED", 0, entry, None, params=params,
                     tags={names.TAG_SPLIT_FINGERPRINT: fingerprint} if fingerprint else {})


def test_params_match_as_numbers_and_a_missing_one_as_the_config_default():
    assert normalised("test_size", "0.20") == normalised("test_size", "0.2")
    assert normalised("class_fraction", "1") == normalised("class_fraction", "1.0")
    assert normalised("data", " /data/x ") == "/data/x"
    runs = {"base": _record("base", "eval", model="tiny", weights="pretrained", data="synthetic",
                            seed="0", test_size="0.2", class_fraction="1.0", embedding="visual"),
            # embedding missing: visual
            "tuned": _record("tuned", "train", model=" tiny ", test_size="0.20"),
            # another split: another fingerprint, whatever its parameters say
            "far": _record("far", "train", "e" * 64, model="tiny", test_size="0.3"),
            # logged before fingerprints: matched by nothing
            "old": _record("old", "train", "", model="tiny")}
    board = pd.DataFrame({"rank": [1, 2, 3, 4], METRIC: [0.5, 0.4, 0.35, 0.3]},
                         index=["tuned", "far", "old", "base"])
    board = add_gains(board, runs, METRIC)
    assert board.at["tuned", "baseline_run_id"] == "base"
    assert board.at["tuned", "gain"] == pytest.approx(0.2)
    assert pd.isna(board.at["far", "baseline_run_id"]) and math.isnan(board.at["far", "gain"])
    assert board.at["far", "baseline_missing"] == "taxonclip eval --model tiny --embedding visual --test_size 0.3"
    assert pd.isna(board.at["old", "baseline_run_id"])
    assert "no split fingerprint" in board.at["old", "baseline_missing"]


def _fingerprint_of(table: pd.DataFrame, data: DataConfig) -> str:
    """The fingerprint of the split an eval or train run of `data` logs for `table`."""
    split = make_split(table, data)
    order, roles = split_roles(split)
    frame = table.iloc[order][["image_id"]].assign(split=roles)
    return split_fingerprint(frame.to_csv(index=False))


def test_a_grouped_run_gets_its_grouped_baseline_and_never_the_leaky_ungrouped_one(specimens):
    table = read_manifest(specimens).table
    # frames of one clip: every two images of a species share a group
    grouped_table = table.assign(group=[f"{s}-{i // 2}" for s, i in
                                        zip(table["species"], table.groupby("species").cumcount())])
    plain = _fingerprint_of(table, DataConfig())
    grouped = _fingerprint_of(grouped_table, DataConfig(group_column="group"))
    assert plain != grouped
    assert _fingerprint_of(table.sample(frac=1, random_state=1), DataConfig()) == plain
    params = {"model": "tiny", "data": str(specimens)}
    leaky = _record("leaky", "eval", plain, weights="pretrained", **params)
    tuned = _record("tuned", "train", grouped, group_column="group", **params)
    board = pd.DataFrame({"rank": [1, 2], METRIC: [0.9, 0.6]}, index=["leaky", "tuned"])
    alone = add_gains(board, {"leaky": leaky, "tuned": tuned}, METRIC)
    assert pd.isna(alone.at["tuned", "baseline_run_id"]) and math.isnan(alone.at["tuned", "gain"])
    assert alone.at["tuned", "baseline_missing"] == (
        f"taxonclip eval --model tiny --embedding visual --data {shlex.quote(str(specimens))} "
        f"--group_column group")
    fair = _record("fair", "eval", grouped, weights="pretrained", group_column="group", **params)
    board = pd.DataFrame({"rank": [1, 2, 3], METRIC: [0.9, 0.6, 0.45]},
                         index=["leaky", "tuned", "fair"])
    matched = add_gains(board, {"leaky": leaky, "tuned": tuned, "fair": fair}, METRIC)
    assert matched.at["tuned", "baseline_run_id"] == "fair"
    assert matched.at["tuned", "gain"] == pytest.approx(0.6 - 0.45)


def test_only_an_eval_of_the_published_weights_is_a_pretrained_baseline():
    def baseline(entry: str = "eval", **params: str) -> bool:
        return is_pretrained_baseline(_record("id", entry, **params))

    assert baseline(model="tiny", weights="pretrained") and baseline(model="tiny")
    assert baseline(model="ViT-B/32", weights="openai")
    assert baseline(model="unicom:ViT-B/32", weights="unicom")
    assert not baseline(model="tiny", weights="none")
    assert not baseline(model="tiny", weights="/weights/tiny.pt")
    assert not baseline(model="ViT-B/32", weights="unicom")
    assert not baseline("train", model="tiny", weights="pretrained")
    assert not baseline(model="runs:/abc/model", weights="pretrained")


def test_an_eval_of_a_logged_model_matches_on_its_source_runs_model():
    runs = {"src": _record("src", "train", model="ViT-B/32", data="/x"),
            "logged": _record("logged", "eval", model="runs:/src/model", data="/x"),
            "registered": _record("registered", "eval", model="models:/birds@champion"),
            "elsewhere": _record("elsewhere", "eval", model="runs:/not-compared/model")}
    assert architecture(runs["logged"], runs) == "ViT-B/32"
    base = _record("base", "eval", model="ViT-B/32", weights="openai", data="/x")
    assert baseline_key(runs["logged"], runs) == baseline_key(base, runs)
    assert baseline_key(runs["registered"], runs) is None
    assert baseline_key(runs["elsewhere"], runs) is None
