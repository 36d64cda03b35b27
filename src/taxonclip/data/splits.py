"""The seeded train/test split, stratified by species, and the seeded choice of a class subset.

Both draw from one numpy generator per class, seeded by the run's seed and the class name, so a
class's draw does not depend on which other classes or rows the table holds: the same seed gives
the same test images for a class whether the table is shuffled, a subset of classes, or whole.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from taxonclip.errors import ConfigError, DataError

# separate streams for the split and the class choice, so one seed does not correlate them
_SPLIT_STREAM = 1
_CLASS_STREAM = 2


@dataclass(frozen=True)
class Split:
    """Row positions (sorted) of the train and test images of a manifest table."""

    train: np.ndarray
    test: np.ndarray
    train_only: int
    seed: int
    test_size: float

    def test_ids(self, table: pd.DataFrame) -> list[str]:
        """The `image_id` of every test row, in row order."""
        return table["image_id"].iloc[self.test].tolist()


def stratum(table: pd.DataFrame) -> pd.Series:
    """The stratification label of each row: its species, or its scientific name where the row
    has no species (a genus- or family-only name is then a class of its own)."""
    return table["species"].fillna(table["scientific_name"])


def split_manifest(table: pd.DataFrame, test_size: float, seed: int) -> Split:
    """Split per class: a class of n >= 2 images sends round(n * test_size) of them (rounded half
    up, at least 1 and at most n - 1) to test; a class of one image stays in train and is counted
    in `train_only`."""
    if not 0.0 < test_size < 1.0:
        raise ConfigError(f"parameter 'test_size' must be in (0, 1), got {test_size}")
    _check_seed(seed)
    if table.empty:
        raise DataError("cannot split an empty manifest")
    labels = stratum(table).to_numpy()
    ids = table["image_id"].to_numpy()
    test: list[np.ndarray] = []
    train_only = 0
    for label in sorted(set(labels)):
        rows = np.flatnonzero(labels == label)
        if len(rows) < 2:
            train_only += 1
            continue
        rows = rows[np.argsort(ids[rows], kind="stable")]  # row order must not matter
        n_test = min(max(int(np.floor(len(rows) * test_size + 0.5)), 1), len(rows) - 1)
        test.append(_class_rng(seed, _SPLIT_STREAM, label).permutation(rows)[:n_test])
    test_rows = np.sort(np.concatenate(test)) if test else np.empty(0, dtype=np.int64)
    train_rows = np.setdiff1d(np.arange(len(table)), test_rows)
    return Split(train=train_rows, test=test_rows, train_only=train_only, seed=seed,
                 test_size=test_size)


def select_classes(table: pd.DataFrame, fraction: float, seed: int) -> list[str]:
    """A seeded random subset of the species (round(fraction * n) of them, at least one), sorted.

    Each species gets a seeded random key and the smallest keys are kept, so for one seed a
    smaller fraction keeps a subset of what a larger one keeps."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"parameter 'class_fraction' must be in (0, 1], got {fraction}")
    _check_seed(seed)
    species = sorted(table["species"].dropna().unique())
    if not species:
        raise DataError("no row names a species, so there are no classes to select from")
    n_kept = max(1, int(np.floor(len(species) * fraction + 0.5)))
    keys = [_class_rng(seed, _CLASS_STREAM, name).random() for name in species]
    kept = np.argsort(keys, kind="stable")[:n_kept]
    return sorted(species[i] for i in kept)


def _class_rng(seed: int, stream: int, label: str) -> np.random.Generator:
    return np.random.default_rng([seed, stream, zlib.crc32(label.encode("utf-8"))])


def _check_seed(seed: int) -> None:
    if seed < 0:
        raise ConfigError(f"parameter 'seed' must be at least 0, got {seed}")
