"""Check a split for leakage: byte-identical images and groups that reach both sides.

A test image whose copy, or whose neighbouring frame of the same clip, is in train finds that
image as its nearest neighbour, so accuracy measures recall of the training set rather than
identification. `audit_split` finds the identical files (by the sha256 of their bytes), the ones
on both sides of the split or under different names, and, where the table has a `group` column,
the groups that hold several names or reach both sides.
"""

from __future__ import annotations

import hashlib
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd

from taxonclip.data.validated import CHECK_THREADS, SHOWN, Manifest
from taxonclip.data.splits import Split, level_summary
from taxonclip.names import GROUP_COLUMN, SOURCE_DIGEST_COLUMN

_CHUNK = 1 << 20  # bytes read at a time, so a large image is never held whole for its hash

_WHY = ("A test image whose copy, or another frame of its clip, is in train finds that image as "
        "its nearest neighbour,\nso accuracy is inflated.")
_FIX = ("Fix: set group_column to a specimen, clip or observation id, so the split keeps each "
        "on one side,\nor remove the copies.")


@dataclass(frozen=True)
class SplitAudit:
    """What `audit_split` found. Each set of byte-identical files is the sorted `image_id`s of
    its copies; `cross_split` and `cross_name` are the sets with copies on both sides of the
    split and under different scientific names. `mixed_groups` and `straddling_groups` are the
    ids of groups holding more than one scientific name and with images on both sides; both are
    empty, with `has_groups` false, when the table has no `group` column. `unreadable` lists the
    images whose file could not be read, which are left out of the duplicate check."""

    images: int
    duplicates: tuple[tuple[str, ...], ...]
    cross_split: tuple[tuple[str, ...], ...]
    cross_name: tuple[tuple[str, ...], ...]
    unreadable: tuple[str, ...]
    has_groups: bool = False
    mixed_groups: tuple[str, ...] = ()
    straddling_groups: tuple[str, ...] = ()

    @property
    def leaks(self) -> bool:
        """Whether anything in test has a copy or a group mate in train."""
        return bool(self.cross_split or self.straddling_groups)

    def summary(self) -> str:
        """A few lines for people: counts with a few examples each, and what to do about a leak."""
        lines = [f"images checked: {self.images} ({len(self.unreadable)} unreadable, skipped)"]
        lines += _listed_lines("sets of byte-identical images", _joined(self.duplicates))
        lines += _listed_lines("of them with a copy in train and one in test",
                               _joined(self.cross_split))
        lines += _listed_lines("of them under different names", _joined(self.cross_name))
        if self.has_groups:
            lines += _listed_lines("groups holding more than one name", self.mixed_groups)
            lines += _listed_lines("groups with images in train and in test",
                                   self.straddling_groups)
        else:
            lines.append("groups: not checked (set group_column to a specimen, clip or observation id)")
        if self.cross_name:
            lines.append("A file under two names is mislabelled under at least one of them.")
        if self.leaks:
            lines += [_WHY, _FIX]
        return "\n".join(lines)


def data_report(manifest: Manifest, split: Split, caption_note: str = "",
                subset_note: str = "") -> tuple[str, SplitAudit]:
    """What `data check` prints and every run logs: the manifest's summary, a note on the subset
    of it that the rest describes (if any), what each level scores and trains on, a note on the
    captions, and the leakage audit (also returned)."""
    audit = audit_split(manifest.table, split)
    parts = [manifest.report.summary(), subset_note,
             level_summary(manifest.table, split, manifest.levels),
             caption_note,
             audit.summary()]
    return "\n".join(part for part in parts if part), audit


def report_for_run(manifest: Manifest, split: Split) -> str:
    """The data report a run logs; a split that leaks is also said in one line on stderr."""
    report, audit = data_report(manifest, split)
    if audit.leaks:
        print(f"warning: {len(audit.cross_split)} set(s) of identical images and "
              f"{len(audit.straddling_groups)} group(s) lie on both sides of the split, which "
              f"inflates accuracy; `taxonclip data check` lists them", file=sys.stderr)
    return report


def audit_split(table: pd.DataFrame, split: Split) -> SplitAudit:
    """Find the byte-identical images of `table` and, where it has a `group` column, its mixed
    and straddling groups, with the sides of `split` (row positions into `table`)."""
    in_test = np.zeros(len(table), dtype=bool)
    in_test[split.test] = True
    in_train = np.zeros(len(table), dtype=bool)
    in_train[split.train] = True
    digests = _image_digests(table)
    ids = table["image_id"].astype(str).to_numpy()
    names = table["scientific_name"].to_numpy()
    sets = _identical_sets(digests)
    has_groups = GROUP_COLUMN in table.columns
    return SplitAudit(
        images=len(table),
        duplicates=_as_ids(sets, ids),
        cross_split=_as_ids([s for s in sets if in_train[s].any() and in_test[s].any()], ids),
        cross_name=_as_ids([s for s in sets if len(set(names[s])) > 1], ids),
        unreadable=tuple(ids[np.array([d is None for d in digests], dtype=bool)]),
        has_groups=has_groups,
        mixed_groups=_mixed_groups(table) if has_groups else (),
        straddling_groups=_straddling_groups(table, in_train, in_test) if has_groups else ())


def _image_digests(table: pd.DataFrame) -> list[str | None]:
    """The sha256 of each row's image: recorded when the data was prepared (of the source image,
    so that two copies stay identical after resizing), else read from its file."""
    if SOURCE_DIGEST_COLUMN in table.columns:
        return table[SOURCE_DIGEST_COLUMN].tolist()
    return _file_digests(table["image_path"].tolist())


def _file_digests(paths: list[str]) -> list[str | None]:
    """The sha256 of each file's bytes, or None for a file that cannot be read."""
    with ThreadPoolExecutor(CHECK_THREADS) as pool:
        return list(pool.map(_file_digest, paths))


def _file_digest(path: str) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            while chunk := file.read(_CHUNK):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def _identical_sets(digests: list[str | None]) -> list[np.ndarray]:
    """Row positions of each set of two or more readable files with the same digest."""
    rows_by_digest: dict[str, list[int]] = {}
    for row, digest in enumerate(digests):
        if digest is not None:
            rows_by_digest.setdefault(digest, []).append(row)
    return [np.array(rows) for rows in rows_by_digest.values() if len(rows) > 1]


def _as_ids(sets: list[np.ndarray], ids: np.ndarray) -> tuple[tuple[str, ...], ...]:
    """Each set as its sorted image ids, the sets in order of their first id."""
    return tuple(sorted(tuple(sorted(ids[rows])) for rows in sets))


def _mixed_groups(table: pd.DataFrame) -> tuple[str, ...]:
    """The sorted ids of groups whose images carry more than one scientific name."""
    names_per_group = table.groupby(table[GROUP_COLUMN].astype(str))["scientific_name"].nunique()
    return tuple(sorted(names_per_group.index[names_per_group > 1]))


def _straddling_groups(table: pd.DataFrame, in_train: np.ndarray,
                       in_test: np.ndarray) -> tuple[str, ...]:
    """The sorted ids of groups with an image in train and another in test."""
    sides = pd.DataFrame({"train": in_train, "test": in_test}).groupby(
        table[GROUP_COLUMN].astype(str).to_numpy()).any()
    return tuple(sorted(sides.index[sides["train"] & sides["test"]]))


def _joined(sets: tuple[tuple[str, ...], ...]) -> list[str]:
    """Each set of identical images as one line, its copies joined by ' = '."""
    return [" = ".join(ids) for ids in sets]


def _listed_lines(label: str, items: tuple[str, ...] | list[str]) -> list[str]:
    """'label: count', then up to `SHOWN` items indented under it and how many more there are."""
    lines = [f"{label}: {len(items)}"]
    lines += [f"  {item}" for item in items[:SHOWN]]
    if len(items) > SHOWN:
        lines.append(f"  and {len(items) - SHOWN} more")
    return lines
