"""The per-taxa table as a run logs it: its scores as metrics, the counts of its overall rows as
parameters, and its Markdown artifact."""

from __future__ import annotations

import pandas as pd

from taxonclip import names
from taxonclip.formats import PERCENT_NOTE, markdown_grid, percent


def table_metrics(table: pd.DataFrame, key=names.eval_metric) -> dict[str, float]:
    """The scores of a per-taxa table as metrics, keyed `eval/<taxa>/<level>/<score>` (or by
    `key`: `names.val_metric` for a training's validation); the counts (`n_test`, ...) are no
    curve: see `table_counts`."""
    scores = table.drop(columns=["taxa", "level", *names.COUNT_COLUMNS],
                        errors="ignore").select_dtypes("number")
    return {key(row.taxa, row.level, column): float(getattr(row, column))
            for row in table.itertuples(index=False) for column in scores.columns
            if pd.notna(getattr(row, column))}


def table_counts(table: pd.DataFrame, key=names.eval_metric) -> dict[str, int]:
    """The counts of the overall rows (`All`, `All:seen`, ...) as parameters, keyed like the
    metrics (`eval/All/species/n_test`): they are the same at every epoch, and the counts of
    every row are in the table."""
    overall = table[table["taxa"].astype(str).str.startswith(names.ALL_TAXA)]
    return {key(row.taxa, row.level, column): int(getattr(row, column))
            for row in overall.itertuples(index=False) for column in names.COUNT_COLUMNS
            if column in table.columns and pd.notna(getattr(row, column))}


def markdown_table(table: pd.DataFrame) -> str:
    """The per-taxa table in GitHub Markdown: the scores in percent with two decimals, then the
    counts, as two tables narrow enough that a viewer shows every header in full."""
    scores = [c for c in table.columns if c not in ("taxa", "level", *names.COUNT_COLUMNS)]
    counts = [c for c in names.COUNT_COLUMNS if c in table.columns]
    shown = table.copy()
    for column in scores:
        shown[column] = shown[column].map(percent)
    shown.insert(0, "taxa/level", shown["taxa"].astype(str) + "/" + shown["level"].astype(str))
    return (f"Scores, {PERCENT_NOTE}:\n\n{markdown_grid(shown[['taxa/level', *scores]])}\n"
            f"Counts: scored test images, classes, test images whose label has no train image:"
            f"\n\n{markdown_grid(shown[['taxa/level', *counts]])}")
