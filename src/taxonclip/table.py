"""The per-taxa table: nearest-neighbour scores per (taxa, level), its cells and how it is shown.

The table has one row per (taxa, level), its levels those of the data (`names.Levels`): for a
VLM4Bio table each taxa alone at species and genus level, and `All` at species, genus and taxa
level; for BIOSCAN-5M each order at the ranks below it and `All` at every rank from phylum to
species. A row without a label at a level is left out of that level only. Queries are the test
split, the gallery the train split of the same scope, both from one split shared by every row
(seeded, or the dataset's official partitions, which also give `All:seen`/`All:unseen` rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from taxonclip import knn, names
from taxonclip.data.bioscan import PARTITIONS as BIOSCAN_PARTITIONS
from taxonclip.data.manifest import Manifest
from taxonclip.data.splits import SEEN_PARTITIONS, Split, split_roles
from taxonclip.errors import MetricNotInTable
from taxonclip.formats import PERCENT_NOTE, percent
from taxonclip.names import (ALL_TAXA, COUNT_COLUMNS, GROUP_COLUMN, PARTITION_COLUMN,
                             VLM4BIO_LEVELS, Levels)

TABLE_COLUMNS = ("taxa", "level", *COUNT_COLUMNS, *knn.METRICS)


@dataclass(frozen=True)
class Seen:
    """The classes a model was trained on (a `class_fraction` below 1), at the level of its
    label, or the seen partitions of an official split (`level` is then the partition column):
    the table then gains `All:seen` and `All:unseen` rows."""

    level: str
    classes: frozenset[str]


# an official split's seen queries are those of the partitions whose species train holds
OFFICIAL_SEEN = Seen(PARTITION_COLUMN, frozenset(SEEN_PARTITIONS))


def seen_of_split(split: Split) -> Seen | None:
    """The seen/unseen rows that the split itself defines (an official one), else None."""
    return OFFICIAL_SEEN if split.protocol == "official" else None


@dataclass(frozen=True)
class EvalResult:
    """What one evaluation produced."""

    table: pd.DataFrame
    split: Split
    manifest: Manifest
    embed_seconds: float
    img_per_s: float
    class_texts: pd.DataFrame | None = None  # zero-shot: each level's classes and their texts


def evaluation_table(vectors: torch.Tensor, table: pd.DataFrame, split: Split, *,
                     chunk_size: int, device: torch.device | str = "cpu",
                     seen: Seen | None = None, gallery_vectors: torch.Tensor | None = None,
                     levels: Levels = VLM4BIO_LEVELS) -> pd.DataFrame:
    """The per-taxa table for embeddings whose rows follow `table`: `vectors` as queries and
    `gallery_vectors` (default: `vectors`) as gallery items, at the table's `levels` (each a
    column of `table`).

    With `seen` (training on a fraction of the classes), `All:seen` and `All:unseen` rows
    restrict the queries to test images of classes seen or not seen in training; the gallery
    stays the whole train split.
    """
    both = (vectors, vectors if gallery_vectors is None else gallery_vectors)
    is_train = np.zeros(len(table), bool)
    is_train[split.train] = True
    is_test = np.zeros(len(table), bool)
    is_test[split.test] = True
    is_seen = None if seen is None else table[seen.level].isin(seen.classes).to_numpy()
    rows = []
    for scope, level in table_cells(table["taxa"].unique(), seen is not None, levels):
        gallery, queries = scope_masks(scope, table, is_seen)
        rows.append(_row(scope, level, both, table[level], gallery & is_train, queries & is_test,
                         chunk_size, device))
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def scope_masks(scope: str, table: pd.DataFrame,
                is_seen: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The rows that the gallery and the queries of one table row are drawn from."""
    everything = np.ones(len(table), bool)
    if scope == ALL_TAXA:
        return everything, everything
    if scope == f"{ALL_TAXA}:seen":
        return everything, is_seen
    if scope == f"{ALL_TAXA}:unseen":
        return everything, ~is_seen
    in_taxa = (table["taxa"] == scope).to_numpy()
    return in_taxa, in_taxa


def table_cells(taxa, with_seen: bool,
                levels: Levels = VLM4BIO_LEVELS) -> list[tuple[str, str]]:
    """The (taxa, level) rows of the table, in order: each taxa at the levels within a taxa
    (species and genus for VLM4Bio), `All` at every level, then `All:seen` and `All:unseen` at
    every rank the data has (`levels.labels`: BIOSCAN-5M's from phylum, order included) when
    training used a fraction of the classes or the split is official."""
    cells = [(scope, level) for scope in sorted(taxa) for level in levels.within_taxa]
    cells += [(ALL_TAXA, level) for level in levels.scored]
    if with_seen:
        cells += [(f"{ALL_TAXA}:{name}", level) for name in ("seen", "unseen")
                  for level in levels.labels]
    return cells


def check_metric_cell(key: str, taxa, with_seen: bool, levels: Levels = VLM4BIO_LEVELS) -> None:
    """Raise MetricNotInTable unless `key` (`<taxa>/<level>/<score>`) names a cell that the
    table of these taxa and levels will have."""
    available = [names.table_key(scope, level, "")
                 for scope, level in table_cells(taxa, with_seen, levels)]
    if key.rsplit("/", 1)[0] + "/" not in available:
        shown = ", ".join(cell.rstrip("/") for cell in available)
        raise MetricNotInTable(f"metric {key!r}: the evaluation table has no such row "
                               f"(rows: {shown})")


def table_cell(table: pd.DataFrame, key: str) -> float:
    """The cell `<taxa>/<level>/<score>` of a per-taxa table (NaN where it is empty)."""
    score = key.rsplit("/", 1)[1]
    for row in table.itertuples(index=False):
        if names.table_key(row.taxa, row.level, score) == key:
            return float(getattr(row, score))
    cells = ", ".join(f"{row.taxa}/{row.level}" for row in table.itertuples(index=False))
    raise MetricNotInTable(f"metric {key!r}: the evaluation table has no such row (rows: {cells})")


def _row(scope: str, level: str, vectors: tuple[torch.Tensor, torch.Tensor], labels: pd.Series,
         gallery: np.ndarray, queries: np.ndarray, chunk_size: int, device) -> dict:
    query_vectors, gallery_vectors = vectors
    known = labels.notna().to_numpy()
    codes = torch.as_tensor(pd.factorize(labels)[0], dtype=torch.long)
    gallery, queries = np.flatnonzero(gallery & known), np.flatnonzero(queries & known)
    if len(gallery) == 0:  # no gallery image named at this level (genus-only rows at species)
        return {"taxa": scope, "level": level, "n_test": len(queries), "n_classes": 0,
                "n_lone": len(queries), **dict.fromkeys(knn.METRICS, float("nan"))}
    # rows of the (memory-mapped) embeddings, read a chunk at a time: never a copy of the store
    result = knn.knn_metrics(query_vectors, codes[queries], gallery_vectors, codes[gallery],
                             chunk_size=chunk_size, device=device,
                             query_rows=torch.from_numpy(queries), gallery_rows=torch.from_numpy(gallery))
    return {"taxa": scope, "level": level, "n_test": result.n_test, "n_classes": result.n_classes,
            "n_lone": result.n_lone, **result.metrics}


def scored_note(table: pd.DataFrame, split: Split) -> str:
    """Which rows a table scored: under an official split the data's own partitions of its
    queries and gallery (in the data's order of partitions), else the seeded test split."""
    if split.protocol != "official" or PARTITION_COLUMN not in table.columns:
        return (f"queries: the seeded test split ({len(split.test)} rows, test_size "
                f"{split.test_size:g}, seed {split.seed}); gallery: the rest")
    partitions = table[PARTITION_COLUMN].astype(str)
    known = {name: i for i, name in enumerate(BIOSCAN_PARTITIONS)}

    def named(rows: np.ndarray) -> str:
        found = sorted(set(partitions.iloc[rows]), key=lambda p: (known.get(p, len(known)), p))
        return " + ".join(found) or "none"

    return (f"queries: {named(split.test)} ({len(split.test)} rows); gallery: "
            f"{named(split.train)} ({len(split.train)} rows); the data's own partitions")


def split_csv(result: EvalResult) -> str:
    """The split as CSV (`image_id,split`, the role of each row train, val or test, and `group`
    when the split kept groups together), so any row of the table can be reproduced."""
    table = result.manifest.table
    order, roles = split_roles(result.split)
    frame = table.iloc[order][["image_id"]].assign(split=roles)
    if GROUP_COLUMN in table.columns:
        frame[GROUP_COLUMN] = table[GROUP_COLUMN].iloc[order].to_numpy()
    return frame.to_csv(index=False)


def format_table(table: pd.DataFrame) -> str:
    """The table aligned for a terminal, accuracies as percentages with two decimals, and a
    line that says so."""
    shown = table.copy()
    for column in [c for c in (*knn.METRICS, *names.ZERO_SHOT_SCORES, names.CAPTION_ONLY_TOP1)
                   if c in shown.columns]:
        shown[column] = shown[column].map(percent)
    return f"{shown.to_string(index=False)}\n({PERCENT_NOTE})"
