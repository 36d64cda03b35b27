"""Sweeps: the sweep files and their errors, storage URLs and tracking URIs whose passwords are
never shown, and studies run against a real MLflow server (one parent run, a child per trial,
pruned KILLED, failed FAILED with one line on stderr, continued studies)."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import mlflow
import optuna
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from taxonclip import names
from taxonclip.cli import main
from taxonclip.config import SweepConfig, TrainConfig
from taxonclip.errors import ConfigError, MetricNotInTable, TaxonclipError
from taxonclip.jobs import where_to_look
from taxonclip.sweep.run import metric_value, objective_value, open_study, run_sweep, suggest
from taxonclip.sweep.spec import load_sweep, make_pruner, make_sampler
from taxonclip.sweep.storage import (GRACE_BEATS, HEARTBEAT_ENV, HEARTBEAT_S, dashboard_target,
                                     default_storage, heartbeat_timing, open_storage, redact)
from taxonclip.tracking.connection import redacted_uri
from taxonclip.train import run_training
from tests.helpers import REPO, free_port, slow_but_all_three

SHIPPED = sorted((REPO / "sweeps").glob("*.yaml"))
METRIC = names.val_metric(names.ALL_TAXA, "species", "top1_cos")
TEST_METRIC = names.eval_metric(names.ALL_TAXA, "species", "top1_cos")

VALID = """\
metric: val/All/species/top1_cos
direction: maximize
sampler: {type: tpe, seed: 0}
pruner: {type: median, n_warmup_steps: 1}
fixed: {model: tiny, epochs: 2}
search:
  lr: {type: float, low: 1e-4, high: 1e-2, log: true}
  margin_m2: {type: float, low: 0.1, high: 0.5}
"""


def _write(folder: Path, text: str, name: str = "sweep.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_sweep_file_builds_its_space(path, specimens):
    spec = load_sweep(path, {"model": "tiny", "data": str(specimens), "workers": "0"})
    make_sampler(spec.sampler, 0)
    make_pruner(spec.pruner)
    trial = optuna.create_study(direction=spec.direction).ask()
    values = {name: suggest(trial, name, d) for name, d in spec.search.items()}
    config = spec.train_config(values)
    assert isinstance(config, TrainConfig) and config.data.data == str(specimens)
    assert spec.metric == METRIC and spec.name == path.stem and len(spec.search) >= 1


def test_valid_file_gives_its_space_and_fixed_values(tmp_path):
    spec = load_sweep(_write(tmp_path, VALID), {"epochs": "3"})
    assert spec.name == "sweep" and spec.fixed == {"model": "tiny", "epochs": "3"}
    lr = spec.search["lr"]
    assert (lr.low, lr.high, lr.log) == (1e-4, 1e-2, True)
    config = spec.train_config({"lr": 1e-3, "margin_m2": 0.25})
    assert (config.epochs, config.lr, config.loss.m2) == (3, 1e-3, 0.25)


def _search(name: str, **distribution) -> dict:
    return {"search": {name: distribution}}


MALFORMED = {  # changes to VALID's top-level keys (None deletes one) -> the key the error names
    "unknown top-level key": ({"epochz": 3}, "epochz"),
    "unknown searched parameter": (_search("learning_rate", type="float", low=0.1, high=1),
                                   "search.learning_rate"),
    "unknown fixed parameter": ({"fixed": {"epoch": 3}}, "fixed.epoch"),
    "resume in a sweep": ({"fixed": {"resume": "0123abcd"}}, "fixed.resume"),
    "unknown distribution": (_search("lr", type="gaussian", low=0.1, high=1), "search.lr.type"),
    "unknown distribution key": (_search("lr", type="float", low=0.1, high=1, scale=2),
                                 "search.lr.scale"),
    "low not below high": (_search("lr", type="float", low=0.1, high=0.1), "search.lr.low"),
    "log with low <= 0": (_search("lr", type="float", low=0, high=1, log=True), "search.lr.low"),
    "bound not a number": (_search("lr", type="float", low="small", high=1), "search.lr.low"),
    "int with a fraction": (_search("batch_size", type="int", low=1.5, high=4),
                            "search.batch_size.low"),
    "empty choices": (_search("class_fraction", type="categorical", choices=[]),
                      "search.class_fraction.choices"),
    "value training rejects": (_search("sample_rate", type="float", low=0.5, high=1.5),
                               "search.sample_rate"),
    "margin the loss rejects": (_search("margin_m2", type="float", low=0.1, high=4.0),
                                "search.margin_m2"),
    "searched and fixed": ({"fixed": {"lr": 0.1}}, "search.lr"),
    "no search": ({"search": None}, "search"),
    "metric level": ({"metric": "val/All/tribe/top1_cos"}, "metric"),
    "metric name": ({"metric": "val/All/species/accuracy"}, "metric"),
    "metric prefix": ({"metric": "All/species/top1_cos"}, "metric"),
    "direction": ({"direction": "up"}, "direction"),
    "sampler type": ({"sampler": {"type": "cmaes"}}, "sampler.type"),
    "sampler seed": ({"sampler": {"type": "tpe", "seed": "zero"}}, "sampler.seed"),
    "pruner type": ({"pruner": {"type": "patient"}}, "pruner.type"),
    "pruner option": ({"pruner": {"type": "median", "warmup": 2}}, "pruner.warmup"),
    "pruner value": ({"pruner": {"type": "median", "n_warmup_steps": -1}}, "pruner"),
}


@pytest.mark.parametrize("kind", MALFORMED)
def test_malformed_file_names_file_and_key(kind, tmp_path):
    changes, key = MALFORMED[kind]
    content = {**yaml.safe_load(VALID), **changes}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in content.items() if v is not None}))
    with pytest.raises(ConfigError) as raised:
        load_sweep(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: {key}"), message


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = _write(tmp_path, "search:\n  lr: {type: float, low: 0.1\n")
    with pytest.raises(ConfigError, match=r"sweep\.yaml: not valid YAML.*line"):
        load_sweep(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nowhere.yaml: no such sweep file"):
        load_sweep(tmp_path / "nowhere.yaml")


def test_unknown_override_is_named(tmp_path):
    with pytest.raises(ConfigError, match="-P epoch: not a training parameter"):
        load_sweep(_write(tmp_path, VALID), {"epoch": "3"})


def test_cli_rejects_malformed_file_before_any_trial(tmp_path, capsys):
    path = _write(tmp_path, VALID.replace("margin_m2", "margin_m9"))
    storage = tmp_path / "optuna.db"
    code = main(["sweep", "--sweep", str(path), "--storage", f"sqlite:///{storage}"])
    error = capsys.readouterr().err
    assert code == 1 and "search.margin_m9" in error and str(path) in error
    assert "Traceback" not in error and not storage.exists()


def test_default_storage_sits_beside_a_sqlite_mlflow_store():
    assert default_storage("sqlite:////srv/mlflow/mlflow.db") == "sqlite:////srv/mlflow/optuna.db"
    assert default_storage("sqlite:///mlflow.db") == "sqlite:///optuna.db"
    assert default_storage("http://127.0.0.1:5000") == "sqlite:///optuna.db"


def test_redact_hides_passwords_only():
    assert redact("postgresql://ana:s3cr%40t@db.lab:5432/optuna") == \
        "postgresql://ana:***@db.lab:5432/optuna"
    assert redact("mysql://u@h/db?password=x&ssl=1") == "mysql://u@h/db?password=***&ssl=1"
    assert redact("postgresql://ana@db.lab/optuna") == "postgresql://ana@db.lab/optuna"
    assert redact("sqlite:///optuna.db") == "sqlite:///optuna.db"


# Passwords that a naive URL parser splits wrongly, each unencoded in the URL.
PASSWORDS = {"slash": "se/cr3t", "at": "p@ss", "colon": "a:b", "all three": "x/y@z:w"}


@pytest.mark.parametrize("password", PASSWORDS.values(), ids=PASSWORDS)
def test_redact_hides_passwords_holding_url_characters(password):
    url = f"postgresql://ana:{password}@db.lab:5432/optuna"
    assert redact(url) == "postgresql://ana:***@db.lab:5432/optuna"
    assert dashboard_target(url).endswith("://ana:***@db.lab:5432/optuna")
    assert redact(f"{url}?password={password}") == \
        "postgresql://ana:***@db.lab:5432/optuna?password=***"


def test_redact_hides_what_it_cannot_parse():
    unparsable = "postgresql://ana:pw/x@db.lab:port/optuna"  # a port that is not a number
    assert redact(unparsable) == "postgresql://***@db.lab:port/optuna"
    with pytest.raises(ConfigError, match=r"'postgresql://\*\*\*@db.lab:port/optuna': not a "):
        open_storage(unparsable)


@pytest.mark.parametrize("case", slow_but_all_three(PASSWORDS))
def test_unreachable_storage_is_named_without_its_password(case, tmp_path, capsys):
    password = PASSWORDS[case]
    url = f"postgresql://ana:{password}@127.0.0.1:{free_port()}/optuna"
    code = main(["sweep", "--sweep", str(_write(tmp_path, VALID)), "--storage", url])
    printed = capsys.readouterr()
    assert code == 1 and "postgresql://ana:***@127.0.0.1" in printed.err, printed.err
    assert password not in printed.out + printed.err


@pytest.mark.parametrize("password", PASSWORDS.values(), ids=PASSWORDS)
def test_tracking_uri_credentials_are_hidden_in_messages(password, monkeypatch):
    uri = f"http://ana:{password}@mlflow.lab:5000"
    assert redacted_uri(uri) == "http://***@mlflow.lab:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert where_to_look("0123") == "MLflow run 0123: open http://***@mlflow.lab:5000 and pick " \
                                    "the run to see it"
    assert redacted_uri("sqlite:////home/ana@lab/mlflow.db") == "sqlite:////home/ana@lab/mlflow.db"


@pytest.mark.parametrize("password", PASSWORDS.values(), ids=PASSWORDS)
def test_unreachable_tracking_server_is_named_without_its_password(password, tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://ana:{password}@127.0.0.1:{free_port()}")
    code = main(["sweep", "--sweep", str(_write(tmp_path, VALID)),
                 "--storage", f"sqlite:///{tmp_path / 'optuna.db'}"])
    printed = capsys.readouterr()
    assert code == 1 and "tracking server at http://127.0.0.1:" in printed.err, printed.err
    assert password not in printed.out + printed.err


def test_heartbeat_interval_and_grace_period(tmp_path, monkeypatch):
    monkeypatch.delenv(HEARTBEAT_ENV, raising=False)
    assert heartbeat_timing() == (HEARTBEAT_S, GRACE_BEATS * HEARTBEAT_S)
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    assert storage.get_heartbeat_interval() == HEARTBEAT_S
    monkeypatch.setenv(HEARTBEAT_ENV, "2")
    assert heartbeat_timing() == (2, 2 * GRACE_BEATS)
    for wrong in ("0", "1.5", "soon"):
        monkeypatch.setenv(HEARTBEAT_ENV, wrong)
        with pytest.raises(ConfigError, match=f"{HEARTBEAT_ENV}='{wrong}': give a whole number"):
            heartbeat_timing()


def test_open_storage_journal_file_and_unknown_scheme(tmp_path):
    journal = open_storage(f"journal:{tmp_path / 'study.log'}")
    study = optuna.create_study(study_name="j", storage=journal)
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    assert len(optuna.load_study(study_name="j", storage=open_storage(
        f"journal:{tmp_path / 'study.log'}")).trials) == 2
    with pytest.raises(ConfigError, match="redis://u:\\*\\*\\*@h"):
        open_storage("redis://u:pw@h/0")


def test_continued_study_does_not_repeat_the_seeded_suggestions(tmp_path):
    spec = load_sweep(_write(tmp_path, VALID))
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = open_study(spec, "seeded", storage)
    first.optimize(lambda trial: suggest(trial, "lr", spec.search["lr"]), n_trials=2)
    again = open_study(spec, "seeded", storage)
    again.optimize(lambda trial: suggest(trial, "lr", spec.search["lr"]), n_trials=1)
    values = [t.params["lr"] for t in again.trials]
    assert len(values) == 3 and values[2] not in values[:2]


def test_existing_study_with_another_metric_or_direction_is_refused(tmp_path):
    spec = load_sweep(_write(tmp_path, VALID))
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    open_study(spec, "kept", storage)
    other_metric = load_sweep(_write(tmp_path, VALID.replace("species/top1_cos", "genus/top1_cos"),
                                     "genus.yaml"))
    with pytest.raises(ConfigError, match="genus.yaml: metric: .*val/All/species/top1_cos"):
        open_study(other_metric, "kept", storage)
    minimise = load_sweep(_write(tmp_path, VALID.replace("maximize", "minimize"), "min.yaml"))
    with pytest.raises(ConfigError, match="min.yaml: direction: .*maximizes"):
        open_study(minimise, "kept", storage)


def test_a_sweep_metric_on_the_test_table_is_refused_and_the_objective_reads_validation(tmp_path):
    with pytest.raises(ConfigError, match="metric: 'eval/All/species/top1_cos' names the test table"):
        load_sweep(_write(tmp_path, VALID.replace("val/All/", "eval/All/")))
    test = pd.DataFrame({"taxa": ["All"], "level": ["species"], "top1_cos": [0.9]})
    validation = test.assign(top1_cos=[0.4])
    result = SimpleNamespace(table=test, validation=validation)
    assert objective_value(result, METRIC) == 0.4
    with pytest.raises(ConfigError, match="no validation rows"):
        objective_value(SimpleNamespace(table=test, validation=None), METRIC)


def test_metric_value_reads_one_cell_and_names_missing_rows():
    table = pd.DataFrame({"taxa": ["Fish", "All"], "level": ["species", "species"],
                          "top1_cos": [0.25, 0.5]})
    assert metric_value(table, METRIC) == 0.5
    with pytest.raises(MetricNotInTable, match="Fish/species"):
        metric_value(table, "eval/Beetle/species/top1_cos")


# --- studies against the real MLflow server ---------------------------------------------------

FAST = {"epochs": "1", "batch_size": "16", "workers": "0"}


def _config(tmp_path: Path, sweep: Path, specimens: Path, n_trials: int, name: str,
            **overrides: str) -> SweepConfig:
    return SweepConfig(sweep=str(sweep), n_trials=n_trials, study_name=name,
                       storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                       overrides={"data": str(specimens), **FAST, **overrides})


def _runs_of(study_name: str) -> tuple[list, list]:
    """(parent runs, child runs) of a study, oldest first."""
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`{names.TAG_STUDY}` = '{study_name}'",
                              order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if r.data.tags[names.TAG_ENTRY] == "sweep"]
    children = [r for r in runs if r.data.tags[names.TAG_ENTRY] == "train"]
    return parents, children


def _as_text(params: dict) -> dict[str, str]:
    """Parameters as MLflow holds them."""
    return {name: str(value) for name, value in params.items()}


def _child_of_trial(children: list, number: int):
    found = [c for c in children if c.data.tags[names.TAG_TRIAL] == str(number)]
    assert len(found) == 1, [c.info.run_id for c in found]
    return found[0]


@pytest.mark.integration
def test_mlflow_run_sweep_of_four_trials_links_four_children_to_one_parent(
        tracking, specimens, tmp_path):
    # The shipped margin_lr.yaml, its fixed parameters pointed at the generated specimens.
    content = yaml.safe_load((REPO / "sweeps" / "margin_lr.yaml").read_text())
    content["fixed"].update(data=str(specimens), **FAST)
    sweep = tmp_path / "margin_lr.yaml"
    sweep.write_text(yaml.safe_dump(content))
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    command = [str(Path(sys.executable).parent / "mlflow"), "run", str(REPO), "-e", "sweep",
               "--env-manager", "local", "-P", f"sweep={sweep}", "-P", "n_trials=4",
               "-P", f"storage={storage}", "-P", "study_name=four"]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]

    study = optuna.load_study(study_name="four", storage=storage)
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    parents, children = _runs_of("four")
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    status_of = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED"}
    for trial in study.trials:
        child = _child_of_trial(children, trial.number)
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert trial.user_attrs["mlflow_run_id"] == child.info.run_id
        assert child.info.status == status_of[trial.state]
        assert {k: child.data.params[k] for k in trial.params} == _as_text(trial.params)
        if trial.state == TrialState.COMPLETE:
            # the objective is the selected (best) epoch's validation metric, not the test one
            history = MlflowClient().get_metric_history(child.info.run_id, METRIC)
            assert trial.value == pytest.approx(max(m.value for m in history))
            assert trial.user_attrs["test_value"] == pytest.approx(child.data.metrics[TEST_METRIC])

    best = study.best_trial
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[names.TAG_BEST_CHILD] == best.user_attrs["mlflow_run_id"]
    assert {k: parent.data.params[f"best.{k}"] for k in best.params} == _as_text(best.params)
    assert parent.data.metrics[f"best.{METRIC}"] == pytest.approx(best.value)
    best_child = _child_of_trial(children, best.number)
    assert parent.data.metrics[f"best.{TEST_METRIC}"] == pytest.approx(
        best_child.data.metrics[TEST_METRIC])
    assert f"validation {METRIC} = " in done.stdout and "on the test split, scored once" in done.stdout
    artifacts = {a.path for folder in ("sweep", "plots")
                 for a in MlflowClient().list_artifacts(parent.info.run_id, folder)}
    assert {"sweep/margin_lr.yaml", "plots/optimization_history.png",
            "plots/param_importances.png"} <= artifacts


def _logged_text(runs: list) -> str:
    """Every parameter and tag of some runs, as one string to search."""
    return "\n".join(f"{key}={value}" for run in runs
                     for key, value in {**run.data.params, **run.data.tags}.items())


@pytest.mark.integration
@pytest.mark.parametrize("case", slow_but_all_three(sorted(PASSWORDS)))
def test_tracking_uri_with_credentials_is_used_and_never_shown(case, tracking, specimens,
                                                                tmp_path):
    # The test server takes any basic auth: a URI with credentials must reach it like one without.
    password, study_name = PASSWORDS[case], f"tracked-{case.replace(' ', '-')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.replace("://", f"://ana:{password}@")}
    overrides = [item for name, value in FAST.items() for item in ("-P", f"{name}={value}")]
    command = [sys.executable, "-m", "taxonclip", "sweep", "--sweep", str(_write(tmp_path, VALID)),
               "--n_trials", "1", "--study_name", study_name,
               "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "-P", f"data={specimens}",
               *overrides]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert password not in done.stdout + done.stderr
    parents, children = _runs_of(study_name)
    assert [len(parents), len(children)] == [1, 1]
    assert password not in _logged_text(parents + children)


def _training_that(break_trial: dict[int, BaseException], before_run: set[int] = frozenset()):
    """run_training, except that trial N raises break_trial[N] from its epoch hook (inside its
    MLflow run), or raises before its run starts when N is in `before_run`."""
    def train(config, *, parent_run_id, on_epoch, run_tags):
        number = int(run_tags[names.TAG_TRIAL])
        if number in before_run:
            raise ValueError(f"trial {number} could not start")

        def hook(epoch, result):
            if number in break_trial:
                raise break_trial[number]
            on_epoch(epoch, result)

        return run_training(config, parent_run_id=parent_run_id, on_epoch=hook, run_tags=run_tags)
    return train


@pytest.mark.integration
def test_failed_trials_are_recorded_and_the_study_goes_on(tracking, specimens, tmp_path, capsys):
    sweep = _write(tmp_path, VALID)
    out_of_memory = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    train = _training_that({0: out_of_memory}, before_run={1})
    optuna_log = logging.StreamHandler(io.StringIO())  # what Optuna's own handler gets to print
    logging.getLogger("optuna").addHandler(optuna_log)
    try:
        study = run_sweep(_config(tmp_path, sweep, specimens, 3, "failing"), train=train)
    finally:
        logging.getLogger("optuna").removeHandler(optuna_log)
    stderr = capsys.readouterr().err
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    parents, children = _runs_of("failing")
    client = MlflowClient()
    for number, expected in ((0, "CUDA out of memory"), (1, "could not start")):
        child = _child_of_trial(children, number)
        assert child.info.status == "FAILED"
        assert expected in child.data.tags[names.TAG_ERROR]
        assert child.data.params["lr"] == str(study.trials[number].params["lr"])
        error_file = client.download_artifacts(child.info.run_id, names.ERROR_ARTIFACT, str(tmp_path))
        error_text = Path(error_file).read_text()
        assert "Traceback" in error_text and expected in error_text
        assert f"Trial {number} failed with parameters" in error_text  # Optuna's log of it
        assert study.trials[number].user_attrs["mlflow_run_id"] == child.info.run_id
        summary = [line for line in stderr.splitlines()
                   if line.startswith(f"trial {number} failed")]
        assert len(summary) == 1 and expected in summary[0] and child.info.run_id in summary[0]
    assert "Traceback" not in stderr
    assert "because of the following error" not in optuna_log.stream.getvalue()
    assert _child_of_trial(children, 2).info.status == "FINISHED"
    assert parents[0].info.status == "FINISHED" and parents[0].data.params["best.trial"] == "2"


@pytest.mark.integration
def test_pruned_trials_end_their_runs_killed(tracking, specimens, tmp_path):
    # No accuracy reaches 1.01, so the threshold pruner stops every trial at its first report.
    sweep = _write(tmp_path, VALID.replace("{type: median, n_warmup_steps: 1}",
                                           "{type: threshold, lower: 1.01}"))
    study = run_sweep(_config(tmp_path, sweep, specimens, 2, "pruned", epochs="2"))
    assert [t.state for t in study.trials] == [TrialState.PRUNED, TrialState.PRUNED]
    parents, children = _runs_of("pruned")
    client = MlflowClient()
    for trial in study.trials:
        child = _child_of_trial(children, trial.number)
        assert child.info.status == "KILLED"
        assert [m.step for m in client.get_metric_history(child.info.run_id, METRIC)] == [1]
    assert parents[0].info.status == "FINISHED" and names.TAG_BEST_CHILD not in parents[0].data.tags


@pytest.mark.integration
def test_interrupted_sweep_continues_the_trial_count(tracking, specimens, tmp_path):
    sweep = _write(tmp_path, VALID)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(_config(tmp_path, sweep, specimens, 3, "resumed"),
                  train=_training_that({1: KeyboardInterrupt()}))
    study = run_sweep(_config(tmp_path, sweep, specimens, 1, "resumed"))
    assert [(t.number, t.state) for t in study.trials] == [
        (0, TrialState.COMPLETE), (1, TrialState.FAIL), (2, TrialState.COMPLETE)]
    parents, children = _runs_of("resumed")
    assert [p.info.status for p in parents] == ["KILLED", "FINISHED"]
    assert _child_of_trial(children, 1).info.status == "KILLED"
    assert _child_of_trial(children, 2).data.tags["mlflow.parentRunId"] == parents[1].info.run_id


@pytest.mark.integration
def test_sweep_whose_every_trial_failed_says_so(tracking, specimens, tmp_path):
    sweep = _write(tmp_path, VALID)
    with pytest.raises(TaxonclipError, match="all 2 trials .* failed; trial 0: ValueError"):
        run_sweep(_config(tmp_path, sweep, specimens, 2, "doomed"),
                  train=_training_that({}, before_run={0, 1}))
    parents, children = _runs_of("doomed")
    assert [p.info.status for p in parents] == ["FAILED"]
    assert [c.info.status for c in children] == ["FAILED", "FAILED"]


@pytest.mark.integration
def test_metric_the_table_lacks_stops_the_sweep_before_any_run(tracking, specimens, tmp_path):
    sweep = _write(tmp_path, VALID.replace("val/All/", "val/Unicorn/"))
    with pytest.raises(ConfigError, match="metric: metric 'Unicorn/species/top1_cos'"):
        run_sweep(_config(tmp_path, sweep, specimens, 3, "unicorn"))
    assert _runs_of("unicorn") == ([], [])


def test_the_cluster_sweep_is_a_grid_of_three_cluster_sizes(tmp_path):
    spec = load_sweep(REPO / "sweeps" / "cluster_size.yaml")
    assert spec.sampler.type == "grid" and spec.fixed["label"] == "cluster"
    study = optuna.create_study(sampler=make_sampler(spec.sampler, 0, spec.search))
    study.optimize(lambda trial: suggest(trial, "clusters", spec.search["clusters"]), n_trials=3)
    assert sorted(t.params["clusters"] for t in study.trials) == [0.01, 0.1, 1.0]
    mixed = _write(tmp_path, VALID.replace("{type: tpe, seed: 0}", "{type: grid}"))
    with pytest.raises(ConfigError, match="search.lr: a grid sampler searches categorical choices"):
        load_sweep(mixed)
