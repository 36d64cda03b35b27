"""`eval` through its real entry points against a real MLflow server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from taxonclip import names
from taxonclip.cli import main
from tests.helpers import REPO

pytestmark = pytest.mark.integration


def _runs(experiment: str):
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment}"
    return client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"])


def test_mlflow_run_eval_logs_params_table_metrics_artifacts(tracking, specimens, tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "TAXONCLIP_CACHE": str(tmp_path / "cache")}  # embed for real, so the speed is logged
    command = [str(Path(sys.executable).parent / "mlflow"), "run", str(REPO), "-e", "eval",
               "--env-manager", "local", "--experiment-name", "eval-integration",
               "-P", f"data={specimens}", "-P", "model=tiny", "-P", "batch_size=32",
               "-P", "seed=1"]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    [run] = _runs("eval-integration")
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model"] == "tiny" and params["seed"] == "1" and params["batch_size"] == "32"
    assert params["data"] == str(specimens) and params["embedding"] == "visual"

    table = MlflowClient().load_table(run.info.experiment_id, names.PER_TAXA_TABLE, [run.info.run_id])
    all_species = table[(table["taxa"] == "All") & (table["level"] == "species")].iloc[0]
    key = names.eval_metric("All", "species", "top1_cos")
    assert run.data.metrics[key] == pytest.approx(all_species["top1_cos"])
    assert names.EVAL_EMBED_IMG_PER_S in run.data.metrics
    assert run.data.tags[names.TAG_EMBEDDINGS] == "computed"

    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "eval")}
    assert {names.TABLE_CSV, names.TABLE_MARKDOWN, names.SPLIT_ARTIFACT} <= artifacts
    split = MlflowClient().download_artifacts(run.info.run_id, names.SPLIT_ARTIFACT, str(tmp_path))
    lines = Path(split).read_text().splitlines()
    assert lines[0] == "image_id,split"
    assert sum(line.endswith(",test") for line in lines) == all_species["n_test"] + all_species["n_lone"]


def test_taxonclip_eval_on_real_butterflies(tracking, leeds, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "eval-leeds")
    assert main(["eval", "--model", "tiny", "--data", str(leeds), "--workers", "0",
                 "--batch_size", "64"]) == 0
    printed = capsys.readouterr().out
    assert "Butterfly" in printed and "All" in printed
    [run] = _runs("eval-leeds")
    table = MlflowClient().load_table(run.info.experiment_id, names.PER_TAXA_TABLE, [run.info.run_id])
    row = table[(table["taxa"] == "Butterfly") & (table["level"] == "species")].iloc[0]
    assert row["n_classes"] == 10 and row["n_lone"] == 0
    assert row["n_test"] == pytest.approx(832 * 0.2, abs=10)


def test_unreachable_server_is_one_clear_message(specimens, monkeypatch, capsys):
    from tests.helpers import free_port

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    assert main(["eval", "--data", str(specimens), "--workers", "0"]) == 1
    error = capsys.readouterr().err
    assert "cannot reach the MLflow tracking server" in error and "Traceback" not in error


def test_bad_data_path_fails_before_any_run(tracking, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "eval-bad-input")
    assert main(["eval", "--data", str(tmp_path / "nowhere.csv"), "--workers", "0"]) == 1
    assert "nowhere.csv" in capsys.readouterr().err
    assert MlflowClient().get_experiment_by_name("eval-bad-input") is None or not _runs("eval-bad-input")
