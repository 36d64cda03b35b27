"""What a researcher reads: the console of `train` and `eval`, the numbers' formats, and how runs
and experiments look in the MLflow UI (names, descriptions, saved view, counts, artifacts)."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

from taxonclip import formats, names
from taxonclip.progress import Progress
from taxonclip.tracking import experiments
from taxonclip.tracking.runs import command_line
from taxonclip.tracking.tables import markdown_table

def test_percent_and_rounding_are_one_way():
    assert formats.percent(0.341666666) == "34.17"
    assert formats.percent(1.0) == "100.00"
    assert formats.percent(float("nan")) == formats.percent(None) == "-"
    assert formats.rounded(0.123456789) == 0.123457
    assert formats.rounded(123456.789) == 123457.0
    assert formats.rounded(0.0) == 0.0 and math.isnan(formats.rounded(float("nan")))
    text = formats.csv_text(pd.DataFrame({"taxa": ["All"], "n_test": [360], "top1_cos": [1 / 3]}))
    assert text.splitlines() == ["taxa,n_test,top1_cos", "All,360,0.333333"]


def test_progress_off_a_terminal_prints_plain_lines(capsys):
    progress = Progress(120, "epoch 1/2", "steps", every=50)
    for _ in range(120):
        progress.update()
        progress.note(loss="2.3000")
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" steps")[0] for line in lines] == [
        "epoch 1/2: 50/120", "epoch 1/2: 100/120", "epoch 1/2: 120/120"]
    assert all("loss 2.3000" in line and "\r" not in line for line in lines)
    Progress(10, "embed", "batches", show=False).close()
    assert capsys.readouterr().err == ""


def test_command_line_is_what_a_user_types_without_passwords():
    text = command_line(["/x/taxonclip/__main__.py", "sweep", "--storage",
                         "postgresql://tuner:s3cr@t@db-host/optuna", "-P", "lr=1e-3"])
    assert text == "taxonclip sweep --storage 'postgresql://***@db-host/optuna' -P lr=1e-3"
    assert command_line(["mlproject/train.py", "--model", "ViT-B/32"]) == (
        "python mlproject/train.py --model ViT-B/32")


def test_markdown_table_shows_percent_scores_and_counts_apart():
    table = pd.DataFrame({"taxa": ["All"], "level": ["species"], "n_test": [360],
                          "n_classes": [60], "n_lone": [0], "top1_cos": [0.341666],
                          "macro_top1_cos": [float("nan")]})
    text = markdown_table(table)
    assert "| taxa/level | top1_cos | macro_top1_cos |" in text
    assert "| All/species | 34.17 | - |" in text
    assert "| taxa/level | n_test | n_classes | n_lone |" in text
    assert "| All/species | 360 | 60 | 0 |" in text
    assert formats.PERCENT_NOTE in text


@pytest.fixture(scope="module")
def trained(demo_runs):
    """The stdout and stderr of one `taxonclip train`, its store and its MLflow run."""
    return demo_runs["stdout"], demo_runs["stderr"], demo_runs["client"], demo_runs["train"]


def test_train_prints_both_headlines_the_selected_epoch_its_checkpoint_and_the_run(trained):
    stdout, _, client, run = trained
    history = {m.step: m.value for m in
               client.get_metric_history(run.info.run_id, f"val/{names.HEADLINE_METRIC}")}
    best_epoch = max(history, key=lambda step: (history[step], -step))
    assert "top1_cos" in stdout and formats.PERCENT_NOTE in stdout
    assert (f"the model: epoch {best_epoch} of 3 (select=best: the best validation "
            f"{names.HEADLINE_METRIC} {formats.percent(history[best_epoch])}%)") in stdout
    test = run.data.metrics[f"eval/{names.HEADLINE_METRIC}"]
    assert (f"test (scored once, the table above): {names.HEADLINE_METRIC} "
            f"{formats.percent(test)}%") in stdout
    checkpoint = Path(re.search(r"its checkpoint: (\S+)", stdout).group(1))
    assert checkpoint.name == f"epoch_{best_epoch:03d}.pt"
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"] == best_epoch
    assert f"runs:/{run.info.run_id}/model" in stdout
    assert f"viewStateShareKey={experiments.VIEW_KEY}" in stdout


def test_train_off_a_terminal_prints_one_plain_line_per_epoch(trained):
    _, stderr, _, _ = trained
    epochs = [line for line in stderr.splitlines() if re.match(r"epoch \d/3: ", line)]
    assert len(epochs) == 3, stderr
    for line in epochs:
        assert re.search(r"loss \d+\.\d{4}, lr \S+, img/s \d+; validation All/species/top1_cos "
                         r"\d+\.\d\d% \(best \d+\.\d\d% at epoch \d\)", line), line
    assert "\r" not in stderr and "Downloading artifacts" not in stderr


def test_a_train_run_is_named_described_and_keeps_counts_out_of_the_charts(trained):
    _, _, client, run = trained
    assert run.info.run_name == "train tiny species lr=0.002 m2=0.2"
    assert "Made by `taxonclip train --model tiny" in run.data.tags[names.TAG_NOTE]
    assert not [key for key in run.data.metrics if key.endswith(names.COUNT_COLUMNS)]
    table = pd.read_csv(client.download_artifacts(run.info.run_id, names.TABLE_CSV))
    overall = table.set_index(["taxa", "level"]).loc[("All", "species")]
    assert int(run.data.params["eval/All/species/n_test"]) == overall["n_test"]
    assert int(run.data.params["eval/All/species/n_classes"]) == overall["n_classes"]


def test_the_table_artifacts_are_rounded_and_in_percent(trained):
    _, _, client, run = trained
    csv = Path(client.download_artifacts(run.info.run_id, names.TABLE_CSV)).read_text()
    cells = [cell for line in csv.splitlines()[1:] for cell in line.split(",")[5:]]
    assert cells and all(len(cell.replace("0.", "").lstrip("0")) <= 6 for cell in cells)
    table = pd.read_csv(io.StringIO(csv)).set_index(["taxa", "level"])
    markdown = Path(client.download_artifacts(run.info.run_id, names.TABLE_MARKDOWN)).read_text()
    value = table.loc[("All", "species"), "top1_cos"]
    assert f"| All/species | {formats.percent(value)} |" in markdown


def test_the_experiment_opens_on_model_development_with_the_saved_view(trained):
    _, _, client, run = trained
    tags = client.get_experiment(run.info.experiment_id).tags
    assert tags[experiments.EXPERIMENT_KIND_TAG] == "custom_model_development"
    view = json.loads(tags[experiments.VIEW_TAG])
    assert view["selectedColumns"][:4] == ["metrics.`eval/All/species/top1_cos`",
                                           "params.`model`", "params.`weights`", "params.`label`"]
    assert view["orderByKey"] == "metrics.`eval/All/species/top1_cos`"
    first = [chart["metricKey"] for chart in view["compareRunCharts"]]
    assert first[:2] == [names.TRAIN_LOSS, f"val/{names.HEADLINE_METRIC}"]  # per epoch: validation
    assert all(key in run.data.metrics for key in first)
    assert view["isAccordionReordered"] is True
