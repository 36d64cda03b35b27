"""The `compare` command: rank every run that carries a per-taxa table, write the report,
promote the best.

Runs come from the chosen MLflow experiments (default: every active one), narrowed by an optional
MLflow search filter: pretrained baselines (`eval` runs), fine-tuned runs (`train`) and sweep
trials alike. Compare runs and sweep parent runs (their trials are ranked themselves) are left
out; any other run without a readable table is listed as skipped. How runs are ranked is
`rank.py`'s, their baselines and gains `baseline.py`'s, the report `report.py`'s and the registry
aliases `promote.py`'s. The report is written under `out` and logged as artifacts of a `compare`
run.
"""

from __future__ import annotations

from pathlib import Path

from taxonclip import names
from taxonclip.compare.baseline import add_gains
from taxonclip.compare.promote import format_promotions, promote
from taxonclip.compare.rank import (LEFT_OUT_ENTRIES, Comparison, check_key, rank,
                                    skipped_frame, table_values)
from taxonclip.compare.report import (display, format_board, format_missing, format_skipped,
                                      make_plots, side_by_side, write_report)
from taxonclip.config import COMPARE_PARAMS, CompareConfig, to_params
from taxonclip.errors import TrackingError
from taxonclip.formats import PERCENT_NOTE
from taxonclip.tracking import queries
from taxonclip.tracking.runs import tracked_run


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
