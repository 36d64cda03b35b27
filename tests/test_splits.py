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
    with pytest.raises(ConfigError, match="seed"):  # config's bound, which numpy's seeding takes
        split_manifest(_table(), 0.2, seed=2**32)
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
    with pytest.raises(ConfigError, match="seed"):
        select_classes(_many_species(4), 0.5, seed=-1)
    with pytest.raises(DataError, match="no row names a species"):
        select_classes(_table({}, genus_only=3), 0.5, seed=0)


# The split of `_table(genus_only=4)` by the algorithm before groups existed, pinned so that a
# table without a group column keeps exactly the split it had.
UNGROUPED_TEST_ROWS = {(0, 0.3): [1, 5, 6, 8, 15, 17, 19, 21, 26, 29],
                       (11, 0.5): [1, 4, 5, 6, 7, 8, 13, 14, 15, 16, 18, 21, 22, 23, 27, 29, 30]}


@pytest.mark.parametrize(("seed", "test_size"), list(UNGROUPED_TEST_ROWS))
def test_without_a_group_column_the_split_is_unchanged(seed, test_size):
    table = _table(genus_only=4)
    split = split_manifest(table, test_size, seed)
    assert split.test.tolist() == UNGROUPED_TEST_ROWS[seed, test_size]
    assert split.train_only == 2 and not split.grouped


def _grouped(clips: list[tuple[str, list[tuple[str, int]]]]) -> pd.DataFrame:
    """A table from (group, [(species, images), ...]) clips; a clip may hold several species."""
    rows = [(f"{group}/{name.replace(' ', '_')}_{i}.png", name, group)
            for group, parts in clips for name, n in parts for i in range(n)]
    ids, names, groups = zip(*rows)
    return pd.DataFrame({"image_id": ids, "scientific_name": names, "species": names,
                         "group": groups})


# uneven groups, a clip holding two species, and a species whose only clip it shares with another
CLIPS = [("clip01", [("Salmo trutta", 9)]), ("clip02", [("Salmo trutta", 1)]),
         ("clip03", [("Salmo trutta", 4), ("Esox lucius", 3)]), ("clip04", [("Salmo trutta", 2)]),
         ("clip05", [("Esox lucius", 6)]), ("clip06", [("Esox lucius", 1)]),
         ("clip07", [("Esox lucius", 2)]), ("clip08", [("Perca fluviatilis", 12)]),
         ("clip09", [("Perca fluviatilis", 3), ("Rutilus rutilus", 5)]),
         ("clip10", [("Perca fluviatilis", 1)]), ("clip11", [("Perca fluviatilis", 5)]),
         ("clip12", [("Tinca tinca", 7)])]


def _sides_of_groups(table: pd.DataFrame, split) -> pd.Series:
    """How many sides (1 or 2) the images of each group sit on."""
    in_test = pd.Series(False, index=table.index)
    in_test.iloc[split.test] = True
    return in_test.groupby(table["group"]).nunique()


@pytest.mark.parametrize("test_size", [0.1, 0.3, 0.5, 0.8])
def test_every_group_sits_on_one_side(test_size):
    table = _grouped(CLIPS)
    labels = stratum(table)
    for seed in range(40):
        split = split_manifest(table, test_size, seed)
        assert split.grouped
        assert (_sides_of_groups(table, split) == 1).all(), seed
        assert sorted(np.concatenate([split.train, split.test]).tolist()) == list(range(len(table)))
        tested = set(labels.iloc[split.test])
        assert tested <= set(labels.iloc[split.train]), seed  # no class is wholly in test


def test_one_image_per_group_meets_the_ungrouped_counts():
    table = _table(genus_only=4).assign(group=lambda t: t["image_id"])
    split = split_manifest(table, 0.3, seed=2)
    labels = stratum(table)
    for label, n in labels.value_counts().items():
        assert sum(labels.iloc[split.test] == label) == _expected_test_count(n, 0.3), label
    assert split.train_only == 2


def _large_grouped_table(seed: int) -> pd.DataFrame:
    """30 species of 40 to 300 images in clips of 1 to 8 frames; one clip in ten also shows 1 to
    4 frames of another species."""
    rng = np.random.default_rng(seed)
    clips, n_species = [], 30
    for s in range(n_species):
        left = int(rng.integers(40, 301))
        while left > 0:
            frames = min(int(rng.integers(1, 9)), left)
            parts = [(f"Genus species{s}", frames)]
            if rng.random() < 0.1:
                parts.append((f"Genus species{(s + 1 + rng.integers(n_species - 1)) % n_species}",
                              int(rng.integers(1, 5))))
            clips.append((f"clip{len(clips):05d}", parts))
            left -= frames
    return _grouped(clips)


@pytest.mark.parametrize("test_size", [0.2, 0.5])
def test_grouped_class_fractions_are_close_to_the_target(test_size):
    # Tolerance: each class's test count is within half its largest group's images of the
    # ungrouped target, and the whole test fraction within 0.01 of test_size.
    for seed in range(3):
        table = _large_grouped_table(seed)
        labels = stratum(table)
        split = split_manifest(table, test_size, seed)
        tested = labels.iloc[split.test].value_counts()
        largest_group = table.groupby([labels, "group"]).size().groupby(level=0).max()
        for label, n in labels.value_counts().items():
            missed = abs(tested.get(label, 0) - _expected_test_count(n, test_size))
            assert missed <= largest_group[label] / 2, (seed, label)
        assert abs(len(split.test) / len(table) - test_size) <= 0.01
        assert (_sides_of_groups(table, split) == 1).all()


def test_grouped_split_ignores_row_order_and_follows_the_seed():
    table = _large_grouped_table(7)
    shuffled = table.sample(frac=1.0, random_state=3).reset_index(drop=True)
    first = split_manifest(table, 0.3, seed=5)
    assert sorted(first.test_ids(table)) == sorted(
        split_manifest(shuffled, 0.3, seed=5).test_ids(shuffled))
    assert np.array_equal(first.test, split_manifest(table, 0.3, seed=5).test)
    assert not np.array_equal(first.test, split_manifest(table, 0.3, seed=6).test)


def test_a_class_in_one_group_stays_in_train():
    # Rutilus rutilus sits only in clip09, which it shares with Perca fluviatilis; Tinca tinca
    # has one clip of its own. Neither can be split, so both clips stay in train.
    table = _grouped(CLIPS)
    for seed in range(20):
        split = split_manifest(table, 0.5, seed)
        tested = set(table["group"].iloc[split.test])
        assert not tested & {"clip09", "clip12"}, seed
        assert split.train_only == 2


def test_an_untested_class_sends_its_smallest_group():
    # The target is 1 image, and either group alone overshoots it by more than it helps, so
    # only the last pass tests the class, with its smaller group.
    table = _grouped([("big", [("Salmo trutta", 6)]), ("small", [("Salmo trutta", 5)])])
    for seed in range(5):
        split = split_manifest(table, 0.1, seed)
        assert set(table["group"].iloc[split.test]) == {"small"}
        assert split.train_only == 0


def test_a_blank_group_is_refused():
    table = _grouped(CLIPS)
    table.loc[3, "group"] = None
    with pytest.raises(DataError, match="'group' is blank in 1 rows"):
        split_manifest(table, 0.3, seed=0)
