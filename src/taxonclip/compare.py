"""Compare: rank every run that carries a per-taxa table, write the report, promote the best.

Runs come from the chosen MLflow experiments (default: every active one), narrowed by an optional
MLflow search filter: pretrained baselines (`eval` runs), fine-tuned runs (`train`) and sweep
trials alike. Compare runs and sweep parent runs (their trials are ranked themselves) are left
out; any other run without a readable table is listed as skipped.

Runs are ranked by one cell of the table, `<taxa>/<level>/<metric>`, higher first (every score
of the table is an accuracy or a retrieval score, a fraction the report shows in percent), ties
broken by a second cell, then by the newer run. A pretrained baseline is an `eval` run of a
registry model name (not of a logged `runs:/` or `models:/` model) with its published weights
(`weights=pretrained`, or its synonym `openai` or `unicom`; not `none`, nor a file). The gain of
every other run is its metric minus that of the best-ranked baseline of the same split, model
and embedding: the split by its fingerprint (the sha256 of its `eval/split.csv`, every row and
its role, tag `taxonclip.split_fingerprint`), so that a group-aware split, another seed, test or
val size, or other data never meet; the model and embedding (and the captions of a text
embedding) by their parameters (BASELINE_MATCH), compared as values. An eval of a logged
`runs:/` model matches on the `model` of its source run when that run is compared. There is no
looser match: a run that no baseline matches (or that carries no fingerprint) has no gain, and
the report gives the `taxonclip eval` command that would make its baseline.

The report (CSV, Markdown, self-contained HTML, PNG plots) is written under `out` and logged as
artifacts of a `compare` run. It shows scores in percent with two decimals and fits a 1280 px wide
browser window: its tables name a run by its name and the first digits of its id, and the
scores per taxa and level are a table of their own; leaderboard.csv holds every column, the
scores as fractions rounded to six significant digits (taxonclip.formats).

With `promote`, the registry alias `champion` moves to the model version of the best run that
logged a model and `challenger` to the runner-up; other aliases of the registered models are left
as they are.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
import shlex
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from taxonclip import names
from taxonclip.config import (COMPARE_PARAMS, DATA_PARAMS, EVAL_PARAMS, TRAIN_PARAMS,
                              CompareConfig, EvalConfig, flat_fields, to_params)
from taxonclip.errors import ConfigError, ModelError, TrackingError
from taxonclip.formats import PERCENT_NOTE, csv_text, markdown_grid, percent
from taxonclip.tracking import models, queries
from taxonclip.tracking.models import MODEL_URI_PREFIXES
from taxonclip.tracking.queries import RunRecord, metric_history
from taxonclip.tracking.runs import tracked_run

KIND_EVAL, KIND_TRAIN, KIND_TRIAL = "eval", "train", "sweep trial"
LEFT_OUT_ENTRIES = ("compare", "sweep")
KEY_PARAMS = ("margin_m2", "sample_rate", "lr", "class_fraction", "epochs", "embedding",
              "group_column")
# What a run shares with its pretrained baseline besides the split (matched by its fingerprint,
# names.TAG_SPLIT_FINGERPRINT): the architecture, the embedding and the captions it reads, so
# that the gain is the fine-tuning's alone.
BASELINE_MATCH = ("model", "embedding", "captions", "caption_column")
# The parameters that make the split, which the command making a missing baseline repeats
SPLIT_PARAMS = tuple(name for name in DATA_PARAMS if name not in BASELINE_MATCH)
SPLIT_COLUMN = "split"  # the leaderboard's column of the short fingerprint
# A parameter a run lacks (logged before it existed) had the eval config's default, which is also
# the train config's for every one of these.
_EVAL_DEFAULTS = flat_fields(EvalConfig())
PARAM_DEFAULTS = {name: _EVAL_DEFAULTS[EVAL_PARAMS[name]]
                  for name in (*BASELINE_MATCH, *SPLIT_PARAMS, "weights")}
MATCH_TEXT = (f"split (fingerprint of {names.SPLIT_ARTIFACT}: every row and its role), model, "
              f"embedding and captions")
CHAMPION, CHALLENGER = "champion", "challenger"
SHORT_ID = 8  # hex digits of a run id that the report shows: enough to tell its runs apart
LABEL_CHARS = 28  # longest run or model name in the report's tables and legends
# The widest plot: at the 100 dpi of `png` it is shown at its own size in a 1280 px window.
PLOT_INCHES = 12.0
SWEEP_PLOTS_PER_ROW = 3
HTML_STYLE = ("body{font-family:sans-serif;margin:2em;max-width:100em}"
              ".note{color:#555}"
              # the last resort for a table too wide to wrap: it scrolls, the page does not
              ".table{overflow-x:auto;margin-bottom:1em}"
              "table{border-collapse:collapse;font-size:13px}"
              "th,td{border:1px solid #ccc;padding:2px 6px;text-align:right;vertical-align:top}"
              ".text{text-align:left}"
              "img{max-width:100%}")


@dataclass(frozen=True)
class Comparison:
    """The ranked runs (`board`, best first, indexed by run id) and what the report needs."""

    config: CompareConfig
    experiments: dict[str, str]
    board: pd.DataFrame
    cells: list[str]
    runs: dict[str, RunRecord]
    skipped: pd.DataFrame


@dataclass(frozen=True)
class Plot:
    """One figure of the report, rendered to PNG."""

    name: str
    title: str
    png: bytes


@dataclass(frozen=True)
class Section:
    """One part of the report: a heading with text, a table or a plot."""

    title: str
    text: str = ""
    table: pd.DataFrame | None = None
    plot: Plot | None = None


@dataclass(frozen=True)
class Promotion:
    """A registry alias set on the model version of a ranked run."""

    alias: str
    run_id: str
    model_name: str
    version: str


def run_compare(config: CompareConfig) -> Path:
    """Rank the runs, print the leaderboard, write and log the report (and move the aliases when
    `config.promote`); returns the path of the HTML report."""
    comparison = compare_runs(config)
    print(format_skipped(comparison.skipped) + format_board(comparison)
          + format_missing(comparison.board))
    side = side_by_side(comparison)
    if side is not None:
        table, line = side
        print(f"\n{line}\n{display(table).to_string(index=False)}")
    print(f"({PERCENT_NOTE})")
    with tracked_run("compare", run_name="compare") as run:
        run.log_params(to_params(config, COMPARE_PARAMS))
        promotions = promote(comparison) if config.promote else []
        print(format_promotions(promotions, config.promote))
        out = Path(config.out)
        written = write_report(comparison, make_plots(comparison), promotions, out)
        for path in written:
            folder = path.parent.relative_to(out).as_posix()
            run.log_artifact(path, None if folder == "." else folder)
        run.log_metrics({"compare/runs_ranked": len(comparison.board),
                         "compare/runs_skipped": len(comparison.skipped)})
        run.set_tags({names.TAG_BEST_CHILD: comparison.board.index[0]})
    return out / "report.html"


def compare_runs(config: CompareConfig) -> Comparison:
    """Query the runs, read their tables and rank them (nothing is logged)."""
    experiments = queries.find_experiments(config.experiments)
    found = [run for run in queries.find_runs(list(experiments), config.filter)
             if run.entry not in LEFT_OUT_ENTRIES]
    with_table = [run for run in found if names.PER_TAXA_TABLE in run.tables]
    tables = queries.load_tables(with_table, names.PER_TAXA_TABLE)
    loaded = set(tables["run_id"])
    skipped = skipped_frame([run for run in found if run.run_id not in loaded])
    if not loaded:
        matching = f" matching {config.filter!r}" if config.filter else ""
        raise TrackingError(f"no run{matching} in experiment(s) {', '.join(experiments.values())} "
                            f"carries the table {names.PER_TAXA_TABLE} ({len(skipped)} run(s) "
                            f"without it): nothing to compare")
    values = table_values(tables)
    check_key(values, config.metric, "metric")
    check_key(values, config.tie_break, "tie_break")
    runs = {run.run_id: run for run in found if run.run_id in loaded}
    board, cells = rank(runs, values, config, experiments)
    board = add_gains(board, runs, config.metric)
    return Comparison(config, experiments, board, cells, runs, skipped)


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


def param_text(params: Mapping[str, str], name: str) -> str:
    """A run's parameter as logged, stripped; the config default where the run lacks it."""
    return str(params.get(name, PARAM_DEFAULTS[name])).strip()


def normalised(name: str, text: str) -> float | str:
    """A parameter's value as compared: a number where the config field is numeric ("0.20" and
    "0.2", "1" and "1.0" are equal), else the stripped text."""
    text = text.strip()
    if isinstance(PARAM_DEFAULTS[name], (int, float)):
        try:
            return float(text)
        except ValueError:
            pass  # not a number: compared as the text it is
    return text


def architecture(run: RunRecord, runs: Mapping[str, RunRecord]) -> str | None:
    """The registry name of a run's model: its `model` parameter, or for a `runs:/<run_id>/...`
    model that of the source run when it is among `runs`; None when unknown (`models:/`)."""
    model = param_text(run.params, "model")
    if not model.startswith(MODEL_URI_PREFIXES):
        return model
    source = runs.get(source_run_id(model))
    return None if source is None else architecture(source, runs)


def source_run_id(model: str) -> str:
    """The run id of a `runs:/<run_id>/<path>` model URI; "" for any other model."""
    return model.removeprefix("runs:/").split("/", 1)[0] if model.startswith("runs:/") else ""


def fingerprint(run: RunRecord) -> str:
    """The run's split fingerprint (tag), "" when it has none (logged before fingerprints)."""
    return run.tags.get(names.TAG_SPLIT_FINGERPRINT, "").strip()


def baseline_key(run: RunRecord, runs: Mapping[str, RunRecord]) -> tuple | None:
    """What the run's baseline must have: the split fingerprint and the BASELINE_MATCH values,
    normalised (the model as its architecture; the captions only for a text embedding); None
    when the architecture or the fingerprint is unknown, so that no baseline matches."""
    model = architecture(run, runs)
    if model is None or not fingerprint(run):
        return None
    visual = param_text(run.params, "embedding") == "visual"
    values = tuple(normalised(name, model if name == "model" else
                              "" if visual and name.startswith("caption") else
                              param_text(run.params, name)) for name in BASELINE_MATCH)
    return (fingerprint(run), *values)


def is_pretrained_baseline(run: RunRecord) -> bool:
    """Whether the run is an eval of a registry model with its published weights."""
    # Imported here: the registry loads torch, which ranking runs needs nowhere else.
    from taxonclip.models.registry import get_spec, is_published

    model = param_text(run.params, "model")
    if run_kind(run) != KIND_EVAL or model.startswith(MODEL_URI_PREFIXES):
        return False
    try:
        source = get_spec(model).source
    except ModelError:
        return False  # a model name the registry no longer knows has no published weights
    return is_published(source, param_text(run.params, "weights"))


def baseline_command(run: RunRecord, model: str) -> str:
    """The `taxonclip eval` command that makes the baseline of a run (its weights are the
    default, `pretrained`): its model (architecture) and embedding, and every parameter of its
    split or captions that differs from the default."""
    given = {"model": model, "embedding": param_text(run.params, "embedding")}
    for name in (*SPLIT_PARAMS, "captions", "caption_column"):
        text = param_text(run.params, name)
        if text.lower() not in ("", "none") and normalised(name, text) != normalised(
                name, str(PARAM_DEFAULTS[name])):
            given[name] = normalised(name, text)
    return "taxonclip eval " + " ".join(f"--{name} {shlex.quote(command_text(name, value))}"
                                        for name, value in given.items())


def command_text(name: str, value: float | str) -> str:
    """A normalised parameter as the command line takes it: an integer field without `.0`."""
    integer = isinstance(PARAM_DEFAULTS[name], int) and not isinstance(PARAM_DEFAULTS[name], bool)
    if isinstance(value, float) and integer and value.is_integer():
        return str(int(value))
    return str(value)


def missing_baseline(run: RunRecord, runs: Mapping[str, RunRecord]) -> str:
    """What a run that no baseline matches lacks: the command that makes its baseline, or why
    none can match."""
    model = architecture(run, runs)
    if model is None:
        return (f"none: the architecture of {param_text(run.params, 'model')} is unknown "
                f"(not a runs:/ model of a compared run)")
    if not fingerprint(run):
        return (f"none: the run has no split fingerprint (tag {names.TAG_SPLIT_FINGERPRINT}), "
                f"so its split cannot be matched; run it again")
    return baseline_command(run, model)


def add_gains(board: pd.DataFrame, runs: Mapping[str, RunRecord], metric: str) -> pd.DataFrame:
    """Add to every run that is not a pretrained baseline `baseline_run_id` (the best-ranked
    baseline of the same split fingerprint and BASELINE_MATCH values; never a looser match),
    `gain` (its metric minus the baseline's) and,
    where none matches, `baseline_missing` (see `missing_baseline`)."""
    is_baseline = {run_id: is_pretrained_baseline(runs[run_id]) for run_id in board.index}
    keys = {run_id: baseline_key(runs[run_id], runs) for run_id in board.index}
    best_baseline: dict[tuple, str] = {}
    for run_id in board.index:  # best first, so the first baseline of a key is its best
        if is_baseline[run_id] and keys[run_id] is not None:
            best_baseline.setdefault(keys[run_id], run_id)
    baseline_ids = [None if is_baseline[run_id] else best_baseline.get(keys[run_id])
                    for run_id in board.index]
    board = board.copy()
    board["baseline_run_id"] = baseline_ids
    board["gain"] = [board.at[run_id, metric] - board.at[base, metric] if base else math.nan
                     for run_id, base in zip(board.index, baseline_ids)]
    board["baseline_missing"] = [
        "" if is_baseline[run_id] or base else missing_baseline(runs[run_id], runs)
        for run_id, base in zip(board.index, baseline_ids)]
    return board


def matched_pair(board: pd.DataFrame) -> tuple[str, str] | None:
    """The best-ranked fine-tuned run (a train run, a sweep trial or an eval of a logged model)
    that has a matched baseline, and that baseline; None if none has."""
    tuned = (board["kind"] != KIND_EVAL) | board["model"].str.startswith(MODEL_URI_PREFIXES)
    matched = board.loc[tuned, "baseline_run_id"].dropna()
    return None if matched.empty else (matched.index[0], matched.iloc[0])


def missing_baselines(board: pd.DataFrame) -> pd.DataFrame:
    """One row per missing baseline: how many ranked runs need it, their ranks, and the command
    that makes it (or why none can match)."""
    needing = board[board["baseline_missing"] != ""]
    rows = [{"runs": len(group), "ranks": ", ".join(f"#{rank}" for rank in group["rank"]),
             "missing baseline": missing}
            for missing, group in needing.groupby("baseline_missing", sort=False)]
    return pd.DataFrame(rows, columns=["runs", "ranks", "missing baseline"])


def best_per_model(comparison: Comparison) -> pd.DataFrame:
    """The best-ranked run of each model architecture (`run_id` a column)."""
    return comparison.board.reset_index().drop_duplicates("model")


def side_by_side(comparison: Comparison) -> tuple[pd.DataFrame, str] | None:
    """The metric per taxa x level of the best-ranked run with a matched baseline and of that
    baseline, with the gain (in the metric's cell, the run's `gain`), and a line naming both;
    None when no run has a matched baseline."""
    pair = matched_pair(comparison.board)
    if pair is None:
        return None
    tuned_id, base_id = pair
    board, cells = comparison.board, comparison.cells
    table = pd.DataFrame({"taxa/level": cells,
                          "baseline": board.loc[base_id, cells].astype(float).to_numpy(),
                          "fine-tuned": board.loc[tuned_id, cells].astype(float).to_numpy()})
    table["gain"] = table["fine-tuned"] - table["baseline"]
    metric_name = comparison.config.metric.rsplit("/", 1)[1]
    line = (f"{metric_name}: best-ranked fine-tuned run with a matched baseline "
            f"{run_label(board, tuned_id)} vs its pretrained baseline {run_label(board, base_id)}")
    return table, line


def run_label(board: pd.DataFrame, run_id: str) -> str:
    """`#rank run name (run id)`, as the report names a run."""
    return f"#{board.at[run_id, 'rank']} {board.at[run_id, 'run_name']} ({run_id})"


def shortened(text: str, limit: int = LABEL_CHARS) -> str:
    """`text`, cut to `limit` characters ending in an ellipsis where it is longer."""
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def short_run(name: str, run_id: str) -> str:
    """`name (first digits of the run id)`, as the report's tables and legends name a run."""
    return f"{shortened(name)} ({run_id[:SHORT_ID]})"


def summary_columns(config: CompareConfig) -> list[str]:
    """The leaderboard columns printed before the per-cell block (the report's tables join
    `run_name` and `run_id` into one column, see `report_board`)."""
    return ["rank", config.metric, "gain", "kind", "model", "weights", SPLIT_COLUMN, *KEY_PARAMS,
            "run_name", "run_id"]


def skipped_frame(runs: list[RunRecord]) -> pd.DataFrame:
    """The runs left unranked for want of a readable table."""
    return pd.DataFrame({"run_id": [r.run_id for r in runs], "run_name": [r.name for r in runs],
                         "entry": [r.entry for r in runs], "status": [r.status for r in runs]})


def report_board(runs: pd.DataFrame, config: CompareConfig) -> pd.DataFrame:
    """Ranked runs (board rows with `run_id` a column) as the report's tables show them: the
    printed columns, run name and id in one short `run` column, as text (see `display`)."""
    table = runs[summary_columns(config)].copy()
    table["run"] = [short_run(name, run_id) for name, run_id in
                    zip(table.pop("run_name"), table.pop("run_id"))]
    table["model"] = table["model"].map(shortened)
    return display(table)


def cells_table(comparison: Comparison) -> pd.DataFrame:
    """The metric in every taxa x level cell of the top runs: a row per cell and a column per run,
    so that more cells make the table longer, not wider than the page."""
    top = comparison.board.head(comparison.config.top)
    table = top[comparison.cells].astype(float).T
    table.columns = [f"#{rank} {shortened(name)}" for rank, name in
                     zip(top["rank"], top["run_name"])]
    return display(table.rename_axis("taxa/level").reset_index())


def display(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame as text: scores (the float columns) in percent with 2 decimals ("-" where a
    run has none), numeric key params with 4 significant digits, other missing values blank."""
    def cell(value: object) -> str:
        if isinstance(value, float):
            return percent(value)
        return "" if value is None else str(value)

    shown = frame.apply(lambda column: column.map(cell))
    for name in [c for c in KEY_PARAMS if c in frame.columns]:
        shown[name] = shown[name].map(short_number)
    return shown


def short_number(text: str) -> str:
    """A logged parameter with numbers cut to 4 significant digits (0.31952540 -> 0.3195)."""
    try:
        return f"{float(text):.4g}"
    except ValueError:
        return text


def format_board(comparison: Comparison) -> str:
    """The printed leaderboard: the top runs, aligned."""
    config = comparison.config
    shown = comparison.board.head(config.top).reset_index()[summary_columns(config)]
    heading = (f"{len(comparison.board)} run(s) ranked by {config.metric} (ties: "
               f"{config.tie_break}); top {len(shown)}:")
    return f"{heading}\n{display(shown).to_string(index=False)}"


def format_missing(board: pd.DataFrame) -> str:
    """The printed list of missing baselines, one line per command (empty when none)."""
    missing = missing_baselines(board)
    if missing.empty:
        return ""
    lines = [f"\n\n{missing['runs'].sum()} run(s) without a pretrained baseline of the same "
             f"{MATCH_TEXT} (no gain; no looser match is made); missing:"]
    lines += [f"  {row['missing baseline']}  ({row['runs']} run(s): {row['ranks']})"
              for _, row in missing.iterrows()]
    return "\n".join(lines)


def format_skipped(skipped: pd.DataFrame) -> str:
    """The printed list of skipped runs (empty when none)."""
    if skipped.empty:
        return ""
    lines = [f"skipped {len(skipped)} run(s) without a readable {names.PER_TAXA_TABLE}:"]
    lines += [f"  {r.run_id}  {r.run_name}  ({r.entry or 'unknown entry'}, {r.status})"
              for r in skipped.itertuples()]
    return "\n".join(lines) + "\n\n"


def format_promotions(promotions: list[Promotion], asked: bool) -> str:
    """What `promote` did, one line per alias."""
    if not asked:
        return "registry aliases unchanged (promote=false)"
    if not promotions:
        return "no ranked run has a logged model: no alias moved"
    return "\n".join(f"{p.alias}: {p.model_name} version {p.version} (run {p.run_id})"
                     for p in promotions)


def registry_name(run: RunRecord) -> str:
    """The registered model name of a run's model: its `register_as`, else `taxonclip-<model>`
    with every character a model URI cannot hold replaced by `-`."""
    register_as = run.params.get("register_as", "").strip()
    if register_as and register_as.lower() != "none":
        return register_as
    model = re.sub(r"[^A-Za-z0-9_.-]+", "-", run.params.get("model", "model")).strip("-")
    return f"taxonclip-{model}"


def promote(comparison: Comparison) -> list[Promotion]:
    """Set `champion` on the model version of the best run with a logged model and `challenger`
    on the runner-up, registering a run's model where it has no version yet."""
    experiment_ids = sorted({run.experiment_id for run in comparison.runs.values()})
    logged = queries.runs_with_logged_model(experiment_ids)
    candidates = [run_id for run_id in comparison.board.index if run_id in logged][:2]
    promotions = []
    for alias, run_id in zip((CHAMPION, CHALLENGER), candidates):
        name = registry_name(comparison.runs[run_id])
        name, version = models.model_version_for_run(run_id, name)
        models.set_model_alias(name, alias, version)
        promotions.append(Promotion(alias, run_id, name, version))
    return promotions


def make_plots(comparison: Comparison) -> list[Plot]:
    """Every plot of the report: metric by taxa and level, training curves, sweep scatters."""
    plots = [bars_plot(comparison)]
    curves = curves_plot(comparison)
    plots += [curves] if curves is not None else []
    return plots + sweep_plots(comparison)


def png(figure) -> bytes:
    """A matplotlib figure rendered to PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def bars_plot(comparison: Comparison) -> Plot:
    """Grouped bars: the metric in every taxa x level cell, one bar per top run (and the matched
    baseline of the best-ranked run that has one, when it is not among them)."""
    from matplotlib.figure import Figure

    board, cells, config = comparison.board, comparison.cells, comparison.config
    shown = board.head(config.top)
    pair = matched_pair(board)
    if pair is not None and pair[1] not in shown.index:
        shown = pd.concat([shown, board.loc[[pair[1]]]])
    figure = Figure(figsize=(min(PLOT_INCHES, max(6.0, 1.1 * len(cells) + 2)), 4.5),
                    layout="constrained")
    axes = figure.add_subplot()
    width = 0.8 / len(shown)
    for i, (run_id, row) in enumerate(shown.iterrows()):
        positions = [x - 0.4 + width * (i + 0.5) for x in range(len(cells))]
        name = f"{row['model']}, {row['kind']}"
        axes.bar(positions, 100 * row[cells].astype(float).fillna(0.0), width,
                 label=f"#{row['rank']} {short_run(name, run_id)}")
    metric_name = config.metric.rsplit("/", 1)[1]
    axes.set_xticks(range(len(cells)), cells, rotation=30, ha="right")
    axes.set_ylabel(f"{metric_name} (%)")
    axes.set_title(f"{metric_name} by taxa and level, top runs")
    below_axes_legend(figure, len(shown))
    return Plot("metric_by_taxa.png", f"{metric_name} by taxa and level of the top runs",
                png(figure))


def below_axes_legend(figure, entries: int) -> None:
    """The figure's legend under its axes, at the size of the tick labels: outside, it covers
    no bar or line however many runs it names."""
    axes = figure.axes[0]
    figure.legend(*axes.get_legend_handles_labels(), loc="outside lower center",
                  ncols=min(entries, 3))


def curves_plot(comparison: Comparison) -> Plot | None:
    """Training loss by step and the validation metric by epoch of the top fine-tuned runs,
    overlaid."""
    from matplotlib.figure import Figure

    board, config = comparison.board, comparison.config
    tuned = board[board["kind"] != KIND_EVAL].head(config.top)
    if tuned.empty:
        return None
    # per epoch a training logs its validation table (the test table once, at the end)
    metric_key = names.val_metric(*config.metric.split("/"))
    figure = Figure(figsize=(11, 4), layout="constrained")
    loss_axes, metric_axes = figure.subplots(1, 2)
    for run_id, row in tuned.iterrows():
        label = f"#{row['rank']} {short_run(row['run_name'], run_id)}"
        for axes, key in ((loss_axes, names.TRAIN_LOSS), (metric_axes, metric_key)):
            history = metric_history(run_id, key)
            scale = 100 if key == metric_key else 1
            axes.plot([step for step, _ in history], [scale * value for _, value in history],
                      marker=".", label=label)
    loss_axes.set(xlabel="step", ylabel=names.TRAIN_LOSS, title="training loss")
    metric_axes.set(xlabel="epoch", ylabel=f"{metric_key} (%)", title=f"validation {config.metric} by epoch")
    below_axes_legend(figure, len(tuned))  # both axes draw the runs in one order and colours
    return Plot("training_curves.png", "training loss and metric of the top fine-tuned runs",
                png(figure))


def searched_params(run_ids: list[str], runs: dict[str, RunRecord]) -> list[str]:
    """The training parameters whose value differs between these runs."""
    return [name for name in TRAIN_PARAMS
            if len({runs[run_id].params.get(name) for run_id in run_ids}) > 1]


def sweep_plots(comparison: Comparison) -> list[Plot]:
    """Per sweep (trials sharing a parent run), the metric against each searched parameter."""
    board, runs = comparison.board, comparison.runs
    trials = board[(board["kind"] == KIND_TRIAL) & (board["parent_run_id"] != "")]
    plots = []
    for parent_id, group in trials.groupby("parent_run_id", sort=False):
        params = searched_params(list(group.index), runs)
        if params:
            study = runs[group.index[0]].tags.get(names.TAG_STUDY, parent_id[:8])
            metric = comparison.config.metric
            plots.append(sweep_plot(group, params, runs, metric, study, parent_id))
    return plots


def sweep_plot(trials: pd.DataFrame, params: list[str], runs: dict[str, RunRecord],
               metric: str, study: str, parent_id: str) -> Plot:
    """One scatter per searched parameter: its value in each trial against the trial's metric,
    SWEEP_PLOTS_PER_ROW to a row so that the figure keeps to the page's width."""
    from matplotlib.figure import Figure

    columns = min(len(params), SWEEP_PLOTS_PER_ROW)
    rows = math.ceil(len(params) / columns)
    figure = Figure(figsize=(4 * columns, 3.5 * rows), layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False).flatten()
    for axes in grid[len(params):]:
        axes.remove()  # the unfilled places of the last row
    for axes, param in zip(grid, params):
        texts = [runs[run_id].params.get(param, "") for run_id in trials.index]
        scatter_param(axes, texts, (100 * trials[metric].astype(float)).tolist())
        axes.set(xlabel=param, ylabel=f"{metric} (%)")
    figure.suptitle(f"sweep {study} (parent run {parent_id})")
    return Plot(f"sweep_{parent_id[:8]}.png",
                f"{metric} against the searched parameters of sweep {study}", png(figure))


def scatter_param(axes, texts: list[str], metric: list[float]) -> None:
    """Scatter numeric values on a linear axis (log where they span 10x), others as categories."""
    try:
        numbers = [float(text) for text in texts]
    except ValueError:
        categories = sorted(set(texts))
        axes.scatter([categories.index(text) for text in texts], metric)
        axes.set_xticks(range(len(categories)), categories)
        return
    axes.scatter(numbers, metric)
    if min(numbers) > 0 and max(numbers) >= 10 * min(numbers):
        axes.set_xscale("log")


def report_sections(comparison: Comparison, plots: list[Plot],
                    promotions: list[Promotion]) -> list[Section]:
    """The report, in order: summary, leaderboard, best per model, baseline vs fine-tuned,
    missing baselines, plots, promotions, skipped runs."""
    config = comparison.config
    top = comparison.board.head(config.top).reset_index()
    summary = (f"{len(comparison.board)} run(s) from experiment(s) "
               f"{', '.join(comparison.experiments.values())}"
               f"{f' matching {config.filter!r}' if config.filter else ''}, ranked by "
               f"{config.metric} (ties: {config.tie_break}); {len(comparison.skipped)} skipped. "
               f"Gain: the metric minus that of the best-ranked pretrained baseline (an eval run "
               f"of the published weights) with the same {MATCH_TEXT}; a run without one has "
               f"no gain.")
    metric_name = config.metric.rsplit("/", 1)[1]
    sections = [Section("Leaderboard", summary, report_board(top, config)),
                Section(f"Top runs by taxa and level ({metric_name})",
                        table=cells_table(comparison)),
                Section("Best run per model", table=report_board(best_per_model(comparison),
                                                                  config))]
    side = side_by_side(comparison)
    if side is not None:
        table, line = side
        sections.append(Section("Baseline vs fine-tuned", line, display(table)))
    missing = missing_baselines(comparison.board)
    if not missing.empty:
        text = (f"No pretrained baseline has the same {MATCH_TEXT} as these runs, "
                f"so they have no gain; each command makes the one they need.")
        sections.append(Section("Missing baselines", text, display(missing)))
    sections += [Section(plot.title, plot=plot) for plot in plots]
    if promotions:
        sections.append(Section("Registry aliases",
                                table=pd.DataFrame([asdict(p) for p in promotions])))
    if not comparison.skipped.empty:
        sections.append(Section(f"Skipped runs (no readable {names.PER_TAXA_TABLE})",
                                table=comparison.skipped))
    return sections


def to_markdown(title: str, sections: list[Section]) -> str:
    """The report as Markdown, plots linked from `plots/`."""
    parts = [f"# {title}\n", f"{PERCENT_NOTE}\n"]
    for section in sections:
        parts.append(f"## {section.title}\n")
        if section.text:
            parts.append(f"{section.text}\n")
        if section.table is not None:
            parts.append(markdown_grid(section.table))
        if section.plot is not None:
            parts.append(f"![{section.plot.title}](plots/{section.plot.name})\n")
    return "\n".join(parts)


def to_html(title: str, sections: list[Section]) -> str:
    """The report as one HTML file that needs nothing else: inline style, plots as data URIs."""
    body = [f"<h1>{html.escape(title)}</h1>", f'<p class="note">{html.escape(PERCENT_NOTE)}</p>']
    for section in sections:
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.text:
            body.append(f"<p>{html.escape(section.text)}</p>")
        if section.table is not None:
            body.append(html_table(section.table))
        if section.plot is not None:
            data = base64.b64encode(section.plot.png).decode("ascii")
            alt = html.escape(section.plot.title)
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{alt}"></figure>')
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{HTML_STYLE}</style></head>"
            f"<body>\n{chr(10).join(body)}\n</body></html>\n")


def html_table(table: pd.DataFrame) -> str:
    """A table as HTML that fits the page: headings break after "/" and "_", text (left aligned)
    wraps at its spaces and a table still too wide scrolls in its own box."""
    texts = table.astype(object).where(table.notna(), "").astype(str)
    classes = ["" if texts[column].map(is_number).all() else ' class="text"'
               for column in texts.columns]
    head = "".join(f"<th{kind}>{breakable(str(column))}</th>"
                   for kind, column in zip(classes, texts.columns))
    rows = "".join("<tr>" + "".join(f"<td{kind}>{html.escape(value)}</td>"
                                    for kind, value in zip(classes, row)) + "</tr>\n"
                   for row in texts.itertuples(index=False))
    return (f'<div class="table"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{rows}'
            f"</tbody></table></div>")


def is_number(text: str) -> bool:
    """Whether a table cell is a number, or blank or "-" where a number is missing."""
    try:
        float(text)
    except ValueError:
        return text in ("", "-")
    return True


def breakable(text: str) -> str:
    """`text` escaped for HTML, with a line-break opportunity after every "/" and "_"."""
    return re.sub(r"([/_])", r"\1<wbr>", html.escape(text))


def write_report(comparison: Comparison, plots: list[Plot], promotions: list[Promotion],
                 out: Path) -> list[Path]:
    """Write leaderboard.csv, report.md, report.html and plots/*.png under `out`; returns them."""
    (out / "plots").mkdir(parents=True, exist_ok=True)
    written = [out / "leaderboard.csv"]
    written[0].write_text(csv_text(comparison.board.reset_index()), encoding="utf-8")
    for plot in plots:
        path = out / "plots" / plot.name
        path.write_bytes(plot.png)
        written.append(path)
    sections = report_sections(comparison, plots, promotions)
    title = f"taxonclip comparison: {comparison.config.metric}"
    (out / "report.md").write_text(to_markdown(title, sections), encoding="utf-8")
    (out / "report.html").write_text(to_html(title, sections), encoding="utf-8")
    return written + [out / "report.md", out / "report.html"]
