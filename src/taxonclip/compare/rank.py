"""Ranking: runs are ranked by one cell of their per-taxa table, `<taxa>/<level>/<metric>`, higher
first (every score of the table is an accuracy or a retrieval score, a fraction the report shows
in percent), ties broken by a second cell, then by the newer run. The leaderboard holds a row per
run, best first: its rank, kind, key parameters, short split fingerprint and the metric in every
taxa x level cell.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from taxonclip import names
from taxonclip.config import CompareConfig
from taxonclip.errors import ConfigError
from taxonclip.tracking.queries import RunRecord

KIND_EVAL, KIND_TRAIN, KIND_TRIAL = "eval", "train", "sweep trial"
LEFT_OUT_ENTRIES = ("compare", "sweep")
KEY_PARAMS = ("margin_m2", "sample_rate", "lr", "class_fraction", "epochs", "embedding",
              "group_column")
SPLIT_COLUMN = "split"  # the leaderboard's column of the short fingerprint


@dataclass(frozen=True)
class Comparison:
    """The ranked runs (`board`, best first, indexed by run id) and what the report needs."""

    config: CompareConfig
    experiments: dict[str, str]
    board: pd.DataFrame
    cells: list[str]
    runs: dict[str, RunRecord]
    skipped: pd.DataFrame


def table_values(tables: pd.DataFrame) -> pd.DataFrame:
    """Every score of every table in long form: run_id, cell (`taxa/level`), key, value."""
    scores = [c for c in tables.columns if c not in ("run_id", "taxa", "level", *names.COUNT_COLUMNS)]
    long = tables.melt(id_vars=["run_id", "taxa", "level"], value_vars=scores,
                       var_name="metric", value_name="value")
    long["value"] = pd.to_numeric(long["value"], errors="coerce")
    long["key"] = [names.table_key(t, lv, m) for t, lv, m in
                   zip(long["taxa"], long["level"], long["metric"])]
    long["cell"] = long["key"].str.rsplit("/", n=1).str[0]
    return long


def check_key(values: pd.DataFrame, key: str, option: str) -> None:
    """Raise ConfigError naming `key` unless it is a `<taxa>/<level>/<metric>` of the tables."""
    if key in set(values["key"]):
        return
    cells = ", ".join(values["cell"].unique())
    metrics = ", ".join(values["metric"].unique())
    raise ConfigError(f"{option} {key!r} is not in the per-taxa tables; use "
                      f"<taxa>/<level>/<metric> with <taxa>/<level> one of {cells} and "
                      f"<metric> one of {metrics}")


def run_kind(run: RunRecord) -> str:
    """`eval` (a baseline or a logged model evaluated), `train`, or `sweep trial`."""
    if run.entry == KIND_EVAL:
        return KIND_EVAL
    return KIND_TRIAL if run.parent_run_id or names.TAG_TRIAL in run.tags else KIND_TRAIN


def rank(runs: dict[str, RunRecord], values: pd.DataFrame, config: CompareConfig,
         experiments: dict[str, str]) -> tuple[pd.DataFrame, list[str]]:
    """One row per run, best first, with its rank, kind, key params, the metric, the tie-break
    and the metric in every taxa x level cell; also the cells in table order."""
    scores = values.pivot(index="run_id", columns="key", values="value")
    metric_name = config.metric.rsplit("/", 1)[1]
    chosen = values[values["metric"] == metric_name]
    cells = list(chosen["cell"].unique())
    wide = chosen.pivot(index="run_id", columns="cell", values="value")[cells]
    newest_first = sorted(runs.values(), key=lambda run: run.start_time, reverse=True)
    board = pd.DataFrame([describe(run, experiments) for run in newest_first]).set_index("run_id")
    board[config.metric] = scores[config.metric]
    board[config.tie_break] = scores[config.tie_break]
    board = board.sort_values([config.metric, config.tie_break], ascending=False,
                              na_position="last", kind="stable")
    board.insert(0, "rank", range(1, len(board) + 1))
    return board.join(wide), cells


def describe(run: RunRecord, experiments: dict[str, str]) -> dict[str, object]:
    """The leaderboard columns that come from the run itself."""
    return {"run_id": run.run_id, "run_name": run.name, "kind": run_kind(run),
            "experiment": experiments.get(run.experiment_id, run.experiment_id),
            "model": run.params.get("model", ""), "weights": run.params.get("weights", ""),
            "data": run.params.get("data", ""), "parent_run_id": run.parent_run_id or "",
            SPLIT_COLUMN: fingerprint(run)[:names.SHORT_FINGERPRINT],
            **{name: run.params.get(name, "") for name in KEY_PARAMS}}


def fingerprint(run: RunRecord) -> str:
    """The run's split fingerprint (tag), "" when it has none (logged before fingerprints)."""
    return run.tags.get(names.TAG_SPLIT_FINGERPRINT, "").strip()


def skipped_frame(runs: list[RunRecord]) -> pd.DataFrame:
    """The runs left unranked for want of a readable table."""
    return pd.DataFrame({"run_id": [r.run_id for r in runs], "run_name": [r.name for r in runs],
                         "entry": [r.entry for r in runs], "status": [r.status for r in runs]})
