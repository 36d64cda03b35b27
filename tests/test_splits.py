"""The stratified split and the class choice, checked against counts computed by plain loops."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from taxonclip.data.splits import select_classes, split_manifest, stratum
from taxonclip.errors import ConfigError, DataError

CLASS_SIZES = {"Danaus plexippus": 1, "Pieris rapae": 2, "Vanessa cardui": 3, "Vanessa atalanta": 5,
               "Papilio cresphontes": 10, "Junonia coenia": 7, "Lycaena phlaeas": 1}


def _table(sizes: dict[str, int] = CLASS_SIZES, genus_only: int = 0) -> pd.DataFrame:
    rows = [(f"{name.replace(' ', '_')}_{i}.png", name, name) for name, n in sizes.items()
            for i in range(n)]
    rows += [(f"genus_only_{i}.png", "Danaus", None) for i in range(genus_only)]
    ids, names, species = zip(*rows)
    return pd.DataFrame({"image_id": ids, "scientific_name": names, "species": species})


def _expected_test_count(n: int, test_size: float) -> int:
    if n < 2:
        return 0
    rounded = math.floor(n * test_size + 0.5)
    return min(max(rounded, 1), n - 1)


@pytest.mark.parametrize("test_size", [0.1, 0.2, 0.5, 0.9])
def test_per_class_counts(test_size):
    table = _table(genus_only=4)
    split = split_manifest(table, test_size, seed=0)
    labels = stratum(table)
    for label, n in labels.value_counts().items():
        in_test = sum(labels.iloc[i] == label for i in split.test)
        assert in_test == _expected_test_count(n, test_size), label
    assert split.train_only == sum(1 for n in CLASS_SIZES.values() if n == 1)
    assert sorted(np.concatenate([split.train, split.test]).tolist()) == list(range(len(table)))
    assert list(split.train) == sorted(split.train) and list(split.test) == sorted(split.test)


def test_singletons_stay_in_train():
    table = _table()
    split = split_manifest(table, 0.5, seed=3)
    singles = [i for i, name in enumerate(table["species"]) if CLASS_SIZES[name] == 1]
    assert set(singles) <= set(split.train.tolist())
    assert split.train_only == 2


def test_genus_only_rows_form_their_own_stratum():
    table = _table(genus_only=3)
    assert stratum(table).iloc[-1] == "Danaus"
    assert stratum(table).iloc[0] == "Danaus plexippus"


def test_same_seed_same_split_different_seed_differs():
    table = _table()
    first, again = split_manifest(table, 0.3, seed=7), split_manifest(table, 0.3, seed=7)
    assert np.array_equal(first.test, again.test) and np.array_equal(first.train, again.train)
    others = [split_manifest(table, 0.3, seed=s).test for s in range(8, 12)]
    assert any(not np.array_equal(first.test, other) for other in others)


def test_row_order_does_not_change_the_test_images():
    table = _table()
    shuffled = table.sample(frac=1.0, random_state=1).reset_index(drop=True)
    assert sorted(split_manifest(table, 0.3, 5).test_ids(table)) == sorted(
        split_manifest(shuffled, 0.3, 5).test_ids(shuffled))


def test_test_ids_are_the_image_ids_of_test_rows():
    table = _table()
    split = split_manifest(table, 0.3, seed=0)
    assert split.test_ids(table) == [table["image_id"][i] for i in split.test]
    assert (split.seed, split.test_size) == (0, 0.3)


def test_bad_split_parameters():
    with pytest.raises(ConfigError, match="test_size"):
        split_manifest(_table(), 1.0, seed=0)
    with pytest.raises(ConfigError, match="seed"):
        split_manifest(_table(), 0.2, seed=-1)
    with pytest.raises(DataError, match="empty"):
        split_manifest(_table().iloc[:0], 0.2, seed=0)


def _many_species(n: int) -> pd.DataFrame:
    return _table({f"Genus{i // 3} species{i}": 2 for i in range(n)}, genus_only=2)


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.25, 0.5, 1.0])
def test_class_fraction_size(fraction):
    table = _many_species(40)
    kept = select_classes(table, fraction, seed=0)
    assert len(kept) == max(1, math.floor(40 * fraction + 0.5))
    assert kept == sorted(kept) and set(kept) <= set(table["species"].dropna())


def test_class_fraction_is_seeded_and_nested():
    table = _many_species(40)
    assert select_classes(table, 0.25, seed=4) == select_classes(table, 0.25, seed=4)
    assert any(select_classes(table, 0.25, seed=4) != select_classes(table, 0.25, seed=s)
               for s in range(5, 9))
    assert set(select_classes(table, 0.1, seed=4)) <= set(select_classes(table, 0.5, seed=4))


def test_class_fraction_errors():
    with pytest.raises(ConfigError, match="class_fraction"):
        select_classes(_many_species(4), 0.0, seed=0)
    with pytest.raises(DataError, match="no row names a species"):
        select_classes(_table({}, genus_only=3), 0.5, seed=0)
