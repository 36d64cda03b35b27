"""How numbers are shown: one way everywhere.

Metrics and CSV artifacts hold fractions (0.8523); what a person reads (the console, the
Markdown table, the report) shows percentages with two decimals (85.23) and says so. CSV
files are rounded to CSV_DIGITS significant digits, more than any accuracy of a test set of
under a million images can use.
"""

from __future__ import annotations

import math

import pandas as pd

CSV_DIGITS = 6
PERCENT_NOTE = "accuracies in percent (two decimals); metrics and CSV files hold fractions"


def percent(value: object) -> str:
    """A fraction as a percentage with two decimals ("85.23"); "-" where there is none."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{100 * float(value):.2f}"


def rounded(value: float, digits: int = CSV_DIGITS) -> float:
    """`value` rounded to `digits` significant digits (0, nan and infinities unchanged)."""
    if not math.isfinite(value) or value == 0:
        return value
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


def csv_text(frame: pd.DataFrame) -> str:
    """`frame` as CSV with its header row, floats rounded to CSV_DIGITS significant digits."""
    shown = frame.copy()
    for column in shown.columns:
        if pd.api.types.is_float_dtype(shown[column]):
            shown[column] = shown[column].map(rounded)
    return shown.to_csv(index=False)


def markdown_grid(table: pd.DataFrame) -> str:
    """`table` in GitHub Markdown, every cell as its text; blank where a value is missing."""
    texts = table.astype(object).where(table.notna(), "").astype(str)
    lines = ["| " + " | ".join(map(str, texts.columns)) + " |", "|" + "---|" * len(texts.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in texts.itertuples(index=False)]
    return "\n".join(lines) + "\n"
