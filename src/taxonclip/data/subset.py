"""The seeded subset of classes that `class_fraction` keeps, for train and eval alike: training
learns the kept classes (at its label's level) and scores every class, seen and unseen; an
evaluation of that fraction scores the rows of the kept species alone
(`evaluation.with_class_fraction`), and so does the split that decides which rows a caption
prompt may name. All draw the subset here, so the same (fraction, seed) keeps the same classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from taxonclip.config import DataConfig
from taxonclip.data.splits import select_classes


@dataclass(frozen=True)
class ClassSubset:
    """The classes kept at `level`, and for each row of the table whether it holds one."""

    level: str
    classes: frozenset[str]
    rows: np.ndarray


def class_subset(table: pd.DataFrame, data: DataConfig, level: str) -> ClassSubset | None:
    """The classes at `level` that `data.class_fraction` keeps (seeded by `data.seed`, see
    `select_classes`) and the rows that hold one; None at 1, where every class is kept."""
    if data.class_fraction >= 1.0:
        return None
    classes = select_classes(table, data.class_fraction, data.seed, level)
    return ClassSubset(level, frozenset(classes), table[level].isin(classes).to_numpy())
