"""Which rows may see their name, and the prompt of every row.

Under `name_in_prompt=gallery` a row may see its name only if it is never a query: not a test
row and not a validation row of the split that eval and train make from the same data
parameters (the same seeded splitter), whether the table is whole (train) or cut to a
`class_fraction` of its species (eval). Every other row, and every row under
`name_in_prompt=none`, is asked the template's name-free text.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from taxonclip.captions.templates import Template
from taxonclip.config import DataConfig
from taxonclip.data.splits import make_split
from taxonclip.data.subset import class_subset
from taxonclip.errors import ConfigError, TaxonclipError

# the data parameters that decide the split
SPLIT_KEYS = ("split", "seed", "test_size", "group_column", "val_size")


@dataclass(frozen=True)
class Prompts:
    """Per row of the table: its prompt, its template's name, and whether the prompt holds a
    rank name."""

    text: list[str]
    template: list[str]
    saw_name: np.ndarray


def split_parameters(data: DataConfig) -> dict:
    """The parameters of the split that decides which rows are queries."""
    return {key: getattr(data, key) for key in SPLIT_KEYS}


def query_rows(table: pd.DataFrame, data: DataConfig) -> np.ndarray:
    """Positions of the rows that are queries (test or validation) under the split of eval or
    of train made from `data`."""
    queries = _queries(table, data)
    subset = class_subset(table, data, "species")
    if subset is not None:  # eval splits the kept species' rows alone
        kept = np.flatnonzero(subset.rows)
        subset = table.iloc[kept].reset_index(drop=True)
        queries = np.union1d(queries, kept[_queries(subset, data)])
    return queries


def _queries(table: pd.DataFrame, data: DataConfig) -> np.ndarray:
    split = make_split(table, data)
    # a training's validation rows are queries too (its choices score them)
    return np.union1d(split.test, split.val).astype(int)


def build_prompts(table: pd.DataFrame, template: Template, name_in_prompt: str,
                  data: DataConfig) -> Prompts:
    """The prompt of every row. A template that names the label needs name_in_prompt=gallery
    and a split to tell queries from gallery rows; either missing is refused."""
    plain = template.without_name or template
    if not template.names_label:
        return Prompts([plain.text] * len(table), [plain.name] * len(table),
                       np.zeros(len(table), bool))
    if name_in_prompt != "gallery":
        raise ConfigError(f"template {template.name!r} writes {', '.join(template.fields)} into "
                          f"the prompt; with name_in_prompt={name_in_prompt} no prompt may hold a "
                          f"name: use a template without fields (describe), or "
                          f"name_in_prompt=gallery for the rows that are never queries")
    try:
        queries = query_rows(table, data)
    except TaxonclipError as err:
        raise ConfigError(f"name_in_prompt=gallery names only the rows that are never queries, "
                          f"which needs the split that eval and train will use; this data has "
                          f"none ({err})") from None
    may = np.ones(len(table), bool)
    may[queries] = False
    rows = table.to_dict("records")
    missing = [i for i in np.flatnonzero(may) if any(not rows[i].get(f) for f in template.fields)]
    may[missing] = False  # a row without the rank asked for gets the plain prompt
    text = [template.fill(row) if ok else plain.text for row, ok in zip(rows, may)]
    names = [template.name if ok else plain.name for ok in may]
    return Prompts(text, names, may)
