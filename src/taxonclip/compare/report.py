"""The report (CSV, Markdown, self-contained HTML, PNG plots) and the printed leaderboard.

It shows scores in percent with two decimals and fits a 1280 px wide browser window: its tables
name a run by its name and the first digits of its id, and the scores per taxa and level are a
table of their own; leaderboard.csv holds every column, the scores as fractions rounded to six
significant digits (taxonclip.formats).
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from taxonclip import names
from taxonclip.compare.baseline import MATCH_TEXT, matched_pair, missing_baselines
from taxonclip.compare.promote import Promotion
from taxonclip.compare.rank import KEY_PARAMS, KIND_EVAL, KIND_TRIAL, SPLIT_COLUMN, Comparison
from taxonclip.config import CompareConfig
from taxonclip.formats import PERCENT_NOTE, csv_text, markdown_grid, percent
from taxonclip.params import TRAIN_PARAMS
from taxonclip.tracking.queries import RunRecord, metric_history

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


def _rendered(sections: list[Section], heading, text, table, plot) -> list[str]:
    """Each section's parts in one format: its heading, then its text, table and plot where it
    has them, each rendered by the function of that name."""
    parts = []
    for section in sections:
        parts.append(heading(section.title))
        if section.text:
            parts.append(text(section.text))
        if section.table is not None:
            parts.append(table(section.table))
        if section.plot is not None:
            parts.append(plot(section.plot))
    return parts


def to_markdown(title: str, sections: list[Section]) -> str:
    """The report as Markdown, plots linked from `plots/`."""
    parts = [f"# {title}\n", f"{PERCENT_NOTE}\n"]
    parts += _rendered(sections, heading=lambda text: f"## {text}\n", text=lambda text: f"{text}\n",
                       table=markdown_grid, plot=lambda plot: f"![{plot.title}](plots/{plot.name})\n")
    return "\n".join(parts)


def _html_figure(plot) -> str:
    data = base64.b64encode(plot.png).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(plot.title)}"></figure>'


def to_html(title: str, sections: list[Section]) -> str:
    """The report as one HTML file that needs nothing else: inline style, plots as data URIs."""
    body = [f"<h1>{html.escape(title)}</h1>", f'<p class="note">{html.escape(PERCENT_NOTE)}</p>']
    body += _rendered(sections, heading=lambda text: f"<h2>{html.escape(text)}</h2>",
                      text=lambda text: f"<p>{html.escape(text)}</p>", table=html_table,
                      plot=_html_figure)
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
