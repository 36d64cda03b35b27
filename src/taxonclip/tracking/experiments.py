"""How an experiment opens in the MLflow UI: as model development (not its GenAI pages), and
with a saved view of its runs that shows what tells them apart.

The view is MLflow's own "shared view" (the Share button of the runs page): a JSON state in the
experiment tag `mlflow.sharedViewState.<key>`, opened by the link `#/experiments/<id>/runs?
viewStateShareKey=<key>`. It names the runs table's columns (the headline metric, model,
weights, label and the searched parameters), sorts the runs by the headline metric, and puts
the charts of `train/loss` and the headline metric first; MLflow itself orders its charts by
section name, which would put 60 per-taxa charts before the loss.
"""

from __future__ import annotations

import json

from taxonclip import names

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
VIEW_KEY = "taxonclip"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
VIEW_VERSION_TAG = "taxonclip.view_version"
VIEW_VERSION = "4"

HEADLINE = names.eval_metric(*names.HEADLINE_METRIC.split("/"))
RUN_COLUMNS = (("metrics", HEADLINE), ("params", "model"), ("params", "weights"),
               ("params", "label"), ("params", "lr"), ("params", "margin_m2"))
# a training's per-epoch curve is its validation metric (its test table is scored once)
VAL_HEADLINE = names.val_metric(*names.HEADLINE_METRIC.split("/"))
FIRST_CHARTS = ((names.TRAIN_LOSS, "step"), (VAL_HEADLINE, "step"), (names.TRAIN_LR, "step"))


def column_key(kind: str, key: str) -> str:
    """A column of MLflow's runs table, as its view state names it: metrics.`train/loss`."""
    return f"{kind}.`{key}`"


def view_state() -> dict:
    """The saved view of an experiment's runs: columns, sort, and the first chart section."""
    section = "taxonclip-first"
    charts = [{"uuid": f"taxonclip-chart-{i}", "type": "LINE", "metricSectionId": section,
               "metricKey": key, "selectedMetricKeys": [key], "xAxisKey": axis,
               "scaleType": "linear", "lineSmoothness": 0, "runsCountToCompare": 10,
               "isGenerated": False, "deleted": False}
              for i, (key, axis) in enumerate(FIRST_CHARTS)]
    return {
        "orderByKey": column_key("metrics", HEADLINE), "orderByAsc": False,
        "selectedColumns": [column_key(kind, key) for kind, key in RUN_COLUMNS],
        "compareRunCharts": charts,
        "compareRunSections": [{"uuid": section, "name": "loss and headline",
                                "display": True, "isReordered": True}],
        # MLflow sorts the sections by name unless they were reordered
        "isAccordionReordered": True,
    }


def prepare_experiment(client, experiment_id: str) -> None:
    """Tag the experiment as model development and save its view, unless it holds them."""
    tags = client.get_experiment(experiment_id).tags
    if tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    if tags.get(VIEW_VERSION_TAG) != VIEW_VERSION:
        client.set_experiment_tag(experiment_id, VIEW_TAG, json.dumps(view_state()))
        client.set_experiment_tag(experiment_id, VIEW_VERSION_TAG, VIEW_VERSION)


def view_link(server: str, experiment_id: str) -> str:
    """The address of an experiment's saved view on the MLflow server at `server`."""
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}"
