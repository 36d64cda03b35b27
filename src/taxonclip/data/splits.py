"""The seeded train/test split, stratified by species, the official split of a dataset's own
partitions, and the seeded choice of a class subset.

Both draw from one numpy generator per class, seeded by the run's seed and the class name, so a
class's draw does not depend on which other classes or rows the table holds: the same seed gives
the same test images for a class whether the table is shuffled, a subset of classes, or whole.

A table with a `group` column (a specimen, clip or observation id per row) is split by whole
groups instead, so that frames of one clip or photos of one specimen never sit on both sides:
the nearest neighbour of a test frame would otherwise be the same fish a frame later. Its
seeded order is a key per group from the seed and the group's id, so it too does not depend on
row order; a group holding two classes ties their splits together.

The validation rows (`val_size`, a fraction of each class's non-test images) are carved from
the train side once the test rows are drawn, by the same seeded, stratified, group-aware draw on
a stream of its own: the test rows do not depend on `val_size`, and an `eval` (which selects
nothing, and keeps the val rows in its gallery) scores the same table whatever `val_size` is,
while its `eval/split.csv` names the same val rows as a training of the same data parameters.
Training learns from the train rows less the val rows; every choice of a training (the best
epoch, pruning, a sweep's objective) scores the val rows as queries against those rows as the
gallery (`validation_split`), and the test rows are embedded once, by the final evaluation.

The official split (`split=official`) follows the partitions of a `split` column, with
BIOSCAN-5M's retrieval protocol: the gallery is train + key_unseen, the queries test +
test_unseen, training uses train only (key_unseen holds the unseen species' keys, never trained
on), val + val_unseen are the validation queries (against the same gallery), and pretrain and
other_heldout take no part. Queries of the seen partitions (train, val, test) give the table's
`All:seen` rows, the others `All:unseen`.
"""

from __future__ import annotations

import hashlib
import io
import zlib
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from taxonclip.config import DataConfig, check_class_fraction, check_seed, check_test_size
from taxonclip.errors import DataError
from taxonclip.names import GROUP_COLUMN, PARTITION_COLUMN, Levels

GALLERY_PARTITIONS = ("train", "key_unseen")
QUERY_PARTITIONS = ("test", "test_unseen")
VALIDATION_PARTITIONS = ("val", "val_unseen")
TRAINING_PARTITIONS = ("train",)
SEEN_PARTITIONS = ("train", "val", "test")  # the unseen ones hold species never in train

# separate streams for the split, the class choice and the group order, so one seed does not
# correlate them
_SPLIT_STREAM = 1
_CLASS_STREAM = 2
_GROUP_STREAM = 3
_VAL_STREAM = 4  # the val draw among the non-test rows, and its group order
_VAL_GROUP_STREAM = 5
# the roles of eval/split.csv
ROLE_TRAIN, ROLE_VAL, ROLE_TEST = "train", "val", "test"


@dataclass(frozen=True)
class Split:
    """Row positions (sorted) of the train (gallery) and test (query) images of a manifest
    table; `grouped` says whether whole groups (the table's `group` column) were kept on one
    side. `protocol` is `seeded` or `official`; an official split may keep gallery rows out of
    training (`trainable`: the rows training uses; None means all of `train`). `val` holds the
    validation rows: carved from `train` (seeded), or the val partitions (official, outside
    `train`); training never uses them."""

    train: np.ndarray
    test: np.ndarray
    train_only: int
    seed: int
    test_size: float
    grouped: bool = False
    protocol: str = "seeded"
    trainable: np.ndarray | None = None
    val: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    val_size: float = 0.0

    @property
    def training_rows(self) -> np.ndarray:
        """The rows a model may be trained on: never a val or test row."""
        rows = self.train if self.trainable is None else self.trainable
        return np.setdiff1d(rows, self.val)

    def test_ids(self, table: pd.DataFrame) -> list[str]:
        """The `image_id` of every test row, in row order."""
        return table["image_id"].iloc[self.test].tolist()


def make_split(table: pd.DataFrame, data: DataConfig) -> Split:
    """The split that `data.split` names: seeded (`split_manifest`, with `data.val_size` of the
    non-test rows as validation rows) or official."""
    if data.split == "official":
        return official_split(table)
    return with_validation(table, split_manifest(table, data.test_size, data.seed), data.val_size)


def with_validation(table: pd.DataFrame, split: Split, val_size: float) -> Split:
    """`split` with `val_size` of its train rows, per class (or by whole groups), drawn as the
    test rows were but on a stream of their own, as validation rows (none at 0)."""
    if val_size == 0 or len(split.train) == 0:  # DataConfig checked val_size
        return split
    side = table.iloc[split.train].reset_index(drop=True)
    if split.grouped:
        rows, _ = _grouped_test_rows(side, val_size, split.seed, _VAL_GROUP_STREAM)
    else:
        rows, _ = _stratified_test_rows(side, val_size, split.seed, _VAL_STREAM)
    return replace(split, val=split.train[rows], val_size=val_size)


def validation_split(split: Split) -> tuple[np.ndarray, Split]:
    """What a training's validation scores, as rows of the table and a split of those rows: the
    val rows as queries, the other gallery rows (never a val or test row) as the gallery. The
    caller keeps only the returned rows, so that no test image is embedded."""
    gallery = np.setdiff1d(split.train, split.val)
    rows = np.union1d(gallery, split.val)
    position = {row: i for i, row in enumerate(rows.tolist())}
    renumber = lambda part: np.array([position[r] for r in part.tolist()], dtype=np.int64)  # noqa: E731
    return rows, replace(split, train=renumber(gallery), test=renumber(split.val), trainable=None,
                         val=np.empty(0, dtype=np.int64))


def split_roles(split: Split) -> tuple[np.ndarray, list[str]]:
    """The rows of the split and the role of each (train, val, test), in eval/split.csv's order:
    the gallery rows that are no val row, then the val rows, then the test rows."""
    train = np.setdiff1d(split.train, split.val)
    order = np.concatenate([train, split.val, split.test]).astype(np.int64)
    roles = ([ROLE_TRAIN] * len(train) + [ROLE_VAL] * len(split.val)
             + [ROLE_TEST] * len(split.test))
    return order, roles


# the data parameters that make one split differ from another, in the order run names show them
SPLIT_NAME_FIELDS = ("split", "group_column", "test_size", "val_size", "seed", "class_fraction")


def split_name_parts(data: DataConfig) -> list[str]:
    """`name=value` for each parameter of SPLIT_NAME_FIELDS that differs from its default, so
    that runs on different splits have different names."""
    default = DataConfig()
    return [f"{name}={getattr(data, name):g}" if isinstance(getattr(data, name), float)
            else f"{name}={getattr(data, name)}"
            for name in SPLIT_NAME_FIELDS if getattr(data, name) != getattr(default, name)]


def split_fingerprint(split_csv_text: str) -> str:
    """The sha256 of a split as eval/split.csv writes it, over its rows (image_id and role)
    sorted, so that it names the split whatever order the manifest's rows came in."""
    lines = split_csv_text.strip().splitlines()
    header = lines[0].split(",") if lines else []
    if "image_id" not in header or "split" not in header:
        raise DataError("a split CSV needs the columns image_id and split")
    frame = pd.read_csv(io.StringIO(split_csv_text), dtype=str,
                        keep_default_na=False)[["image_id", "split"]]
    rows = sorted(f"{i}\t{r}" for i, r in zip(frame["image_id"], frame["split"]))
    return hashlib.sha256("\n".join(rows).encode("utf-8")).hexdigest()


def official_split(table: pd.DataFrame) -> Split:
    """The split of the table's own partitions (the `split` column): gallery, queries and
    training rows as the module docstring says."""
    if PARTITION_COLUMN not in table.columns:
        raise DataError(f"split=official needs a {PARTITION_COLUMN!r} column naming each row's "
                        f"partition (as BIOSCAN-5M has); the table has "
                        f"{', '.join(map(str, table.columns))}; use split=seeded")
    from taxonclip.data.bioscan import check_partitions  # BIOSCAN-5M names the partitions

    check_partitions(table[PARTITION_COLUMN], f"the {PARTITION_COLUMN!r} column")
    partition = table[PARTITION_COLUMN]
    rows_of = lambda names: np.flatnonzero(partition.isin(names).to_numpy())  # noqa: E731
    return Split(train=rows_of(GALLERY_PARTITIONS), test=rows_of(QUERY_PARTITIONS), train_only=0,
                 seed=0, test_size=0.0, protocol="official",
                 trainable=rows_of(TRAINING_PARTITIONS), val=rows_of(VALIDATION_PARTITIONS))


def stratum(table: pd.DataFrame) -> pd.Series:
    """The stratification label of each row: its species, or its scientific name where the row
    has no species (a genus- or family-only name is then a class of its own)."""
    return table["species"].fillna(table["scientific_name"])


def split_manifest(table: pd.DataFrame, test_size: float, seed: int) -> Split:
    """Split per class: a class of n >= 2 images sends round(n * test_size) of them (rounded half
    up, at least 1 and at most n - 1) to test; a class of one image stays in train and is counted
    in `train_only`.

    With a `group` column every group goes whole to one side (see `_grouped_test_rows`): the
    per-class counts are then targets met as closely as the group sizes allow, a class whose
    images all sit in one group cannot be split and stays in train, and `train_only` counts
    every class left without a test image."""
    check_test_size(test_size)  # a public entry point, which bench scripts call without a config
    check_seed(seed)
    if table.empty:
        raise DataError("cannot split an empty manifest")
    grouped = GROUP_COLUMN in table.columns
    if grouped:
        test_rows, train_only = _grouped_test_rows(table, test_size, seed)
    else:
        test_rows, train_only = _stratified_test_rows(table, test_size, seed)
    train_rows = np.setdiff1d(np.arange(len(table)), test_rows)
    return Split(train=train_rows, test=test_rows, train_only=train_only, seed=seed,
                 test_size=test_size, grouped=grouped)


def _stratified_test_rows(table: pd.DataFrame, test_size: float, seed: int,
                          stream: int = _SPLIT_STREAM) -> tuple[np.ndarray, int]:
    """The sorted test rows of a seeded draw of images per class, and the number of classes
    too small to split."""
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
        n_test = _test_count(len(rows), test_size)
        test.append(_class_rng(seed, stream, label).permutation(rows)[:n_test])
    test_rows = np.sort(np.concatenate(test)) if test else np.empty(0, dtype=np.int64)
    return test_rows, train_only


def _test_count(n: int, test_size: float) -> int:
    """How many of a class's n >= 2 images go to test: round(n * test_size) half up, at least 1,
    at most n - 1."""
    return min(max(int(np.floor(n * test_size + 0.5)), 1), n - 1)


@dataclass
class _GroupTally:
    """The groups of a table as integer codes with the (class code, images) pairs each holds,
    and which groups are in test so far with the test images per class that makes."""

    members: list[list[tuple[int, int]]]
    group_sizes: list[int]
    class_sizes: list[int]
    targets: list[int]
    test_counts: list[int]
    in_test: np.ndarray

    def can_move(self, group: int) -> bool:
        """Whether the group may change sides: a group may always return to train, and may go
        to test when each class it holds keeps a train image."""
        return bool(self.in_test[group]) or all(
            self.test_counts[c] + k < self.class_sizes[c] for c, k in self.members[group])

    def move_helps(self, group: int) -> bool:
        """Whether moving the group to the other side lowers the summed distance, in images, of
        the per-class test counts from their targets."""
        sign = -1 if self.in_test[group] else 1
        change = 0
        for c, k in self.members[group]:
            now = self.test_counts[c] - self.targets[c]
            change += abs(now + sign * k) - abs(now)
        return change < 0

    def move(self, group: int) -> None:
        """Move the group to the other side."""
        sign = -1 if self.in_test[group] else 1
        for c, k in self.members[group]:
            self.test_counts[c] += sign * k
        self.in_test[group] = not self.in_test[group]


def _grouped_test_rows(table: pd.DataFrame, test_size: float, seed: int,
                       stream: int = _GROUP_STREAM) -> tuple[np.ndarray, int]:
    """The sorted test rows of a split by whole groups, and the number of classes without a
    test image.

    Each class of n images in at least two groups gets the target count of the ungrouped split;
    a class in a single group gets 0. All groups start in train. Passes over the groups in a
    seeded random order (a key per group from the seed and the group's id, so row order does not
    change it) move a group to the other side whenever that lowers the summed distance, in
    images, of the per-class test counts from their targets, never leaving a class without a
    train image; they stop when a pass moves nothing. A group holding several classes counts
    for each of them. Last, each class that can be split but has no test image sends its
    smallest group that keeps every class it holds a train image (fewest images, then the
    seeded order), so such a class is tested wherever its groups allow it."""
    _, class_of_row = np.unique(stratum(table).to_numpy(), return_inverse=True)
    group_names, group_of_row = np.unique(_group_ids(table), return_inverse=True)
    tally = _tally(class_of_row, group_of_row, test_size)
    order = _group_order(group_names, seed, stream)
    _move_groups_towards_targets(tally, order)
    _give_untested_classes_a_group(tally, order)
    test_rows = np.flatnonzero(tally.in_test[group_of_row])
    return test_rows, sum(1 for count in tally.test_counts if count == 0)


def _group_ids(table: pd.DataFrame) -> np.ndarray:
    """The group of each row as text; a blank one is refused, as it would join unrelated rows."""
    blank = table[GROUP_COLUMN].isna()
    if blank.any():
        raise DataError(f"column {GROUP_COLUMN!r} is blank in {int(blank.sum())} rows "
                        "(give each row a group, or its own image_id)")
    return table[GROUP_COLUMN].astype(str).to_numpy()


def _tally(class_of_row: np.ndarray, group_of_row: np.ndarray, test_size: float) -> _GroupTally:
    """Images per (group, class) pair, per group and per class, each class's target, and every
    group in train."""
    pairs, counts = np.unique(np.stack([group_of_row, class_of_row], axis=1), axis=0,
                              return_counts=True)
    starts = np.flatnonzero(np.diff(pairs[:, 0], prepend=-1))  # pairs are sorted by group
    members = [list(zip(cls.tolist(), k.tolist())) for cls, k in
               zip(np.split(pairs[:, 1], starts[1:]), np.split(counts, starts[1:]))]
    class_sizes = np.bincount(class_of_row).tolist()
    groups_per_class = np.bincount(pairs[:, 1], minlength=len(class_sizes)).tolist()
    targets = [_test_count(n, test_size) if g >= 2 else 0
               for n, g in zip(class_sizes, groups_per_class)]
    return _GroupTally(members=members, group_sizes=np.bincount(group_of_row).tolist(),
                       class_sizes=class_sizes, targets=targets,
                       test_counts=[0] * len(class_sizes),
                       in_test=np.zeros(len(members), dtype=bool))


def _group_order(group_names: np.ndarray, seed: int, stream: int = _GROUP_STREAM) -> np.ndarray:
    """Group codes in a seeded random order; the names are sorted, so equal keys keep name order."""
    keys = [_class_rng(seed, stream, name).random() for name in group_names]
    return np.argsort(keys, kind="stable")


def _move_groups_towards_targets(tally: _GroupTally, order: np.ndarray) -> None:
    """Pass over the groups, moving each whose move brings the test counts closer to the
    targets, until a pass moves none; each move lowers a whole-number distance, so this ends."""
    moved = True
    while moved:
        moved = False
        for group in order:
            if tally.can_move(group) and tally.move_helps(group):
                tally.move(group)
                moved = True


def _give_untested_classes_a_group(tally: _GroupTally, order: np.ndarray) -> None:
    """Send to test, for each splittable class without a test image, its smallest group that
    keeps every class it holds a train image."""
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    holding: list[list[int]] = [[] for _ in tally.class_sizes]
    for group, members in enumerate(tally.members):
        for c, _ in members:
            holding[c].append(group)
    for c, target in enumerate(tally.targets):
        if target == 0 or tally.test_counts[c] > 0:
            continue
        candidates = [g for g in holding[c] if tally.can_move(g)]
        if candidates:
            tally.move(min(candidates, key=lambda g: (tally.group_sizes[g], rank[g])))


def select_classes(table: pd.DataFrame, fraction: float, seed: int,
                   level: str = "species") -> list[str]:
    """A seeded random subset of the classes at `level` (round(fraction * n) of them, at least
    one), sorted.

    Each class gets a seeded random key and the smallest keys are kept, so for one seed a
    smaller fraction keeps a subset of what a larger one keeps."""
    check_class_fraction(fraction)  # a public entry point, which tests call without a config
    check_seed(seed)
    classes = sorted(table[level].dropna().unique())
    if not classes:
        raise DataError(f"no row names a {level}, so there are no classes to select from")
    n_kept = max(1, int(np.floor(len(classes) * fraction + 0.5)))
    keys = [_class_rng(seed, _CLASS_STREAM, name).random() for name in classes]
    kept = np.argsort(keys, kind="stable")[:n_kept]
    return sorted(classes[i] for i in kept)


def _class_rng(seed: int, stream: int, label: str) -> np.random.Generator:
    return np.random.default_rng([seed, stream, zlib.crc32(label.encode("utf-8"))])


def level_summary(table: pd.DataFrame, split: Split, levels: Levels) -> str:
    """What each level of the table scores and trains on: its classes, and its labelled rows in
    train (what `label=<level>` trains on) and in test (what the table scores, but for lone
    queries, whose class has no train image). A row without a level's label counts only at the
    levels it has."""
    lines = ["per level: classes, labelled rows in train (label=<level> trains on them), in val "
             "(a training's choices score them) and in test (scored)"]
    for level in levels.scored:
        labels = table[level]
        train = labels.iloc[split.training_rows].dropna()
        val = labels.iloc[split.val].dropna()
        test = labels.iloc[split.test].dropna()
        lone = int((~test.isin(set(labels.iloc[split.train].dropna()))).sum())
        role = "" if level in levels.labels else "; a scored level, not a training label"
        lines.append(f"  {level}: {labels.nunique()} classes, {int(labels.notna().sum())} rows: "
                     f"{len(train)} train, {len(val)} val, {len(test)} test ({lone} lone{role})")
    lines.append(_split_line(split))
    return "\n".join(lines)


def _split_line(split: Split) -> str:
    """How the split was made, in one line."""
    if split.protocol == "official":
        return (f"split: official partitions: gallery {' + '.join(GALLERY_PARTITIONS)} "
                f"({len(split.train)} rows), queries {' + '.join(QUERY_PARTITIONS)} "
                f"({len(split.test)} rows), training {' + '.join(TRAINING_PARTITIONS)} "
                f"({len(split.training_rows)} rows), validation "
                f"{' + '.join(VALIDATION_PARTITIONS)} ({len(split.val)} rows)")
    return (f"split: seed {split.seed}, test_size {split.test_size}, val_size {split.val_size}, "
            f"{'groups kept on one side' if split.grouped else 'no groups'}; "
            f"{split.train_only} classes too small to split stay in train")
