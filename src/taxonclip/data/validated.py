"""The validated table every reader gives (`Manifest`), the report of how it was read
(`ManifestReport`, built by `report_of` alone) and the checks every reader shares: cleaning a
name, the ranks a name gives, taxa names that would collide, images that cannot be read.

This module imports no reader, so that every reader can build on it.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image

from taxonclip import names
from taxonclip.errors import DataError

COLUMNS = ("image_id", "image_path", "scientific_name", "species", "genus", "taxa")

SHOWN = 5  # paths listed in a message before "and N more"
CHECK_THREADS = 8  # opening image headers is I/O bound, so threads help on network disks

_RANK_ABOVE_GENUS = re.compile(r"(idae|inae|ini|oidea|formes)$")
_EPITHET = re.compile(r"^[a-z][a-z-]*$")
_NOT_AN_EPITHET = frozenset({"sp", "spp", "cf", "aff", "indet"})
# zero-width and bidirectional marks: invisible, yet they make two spellings of one name differ
_INVISIBLE = re.compile("[\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")


@dataclass(frozen=True)
class ManifestReport:
    """What reading a manifest kept, dropped and found wrong. `rows` and the class counts
    describe the kept table; `missing` lists every missing or unreadable image path. For a
    table whose ranks come from rank columns (`ranked`: BIOSCAN-5M, TreeOfLife-10M), a blank
    name is a row without a rank at its taxa level. `format` is the reader that read it and
    `image_package` the BIOSCAN-5M image package its images come from. Built by `report_of`."""

    source: str
    rows: int
    dropped_blank: int
    no_epithet: int
    missing: tuple[str, ...]
    policy: str
    n_species: int = 0
    n_genera: int = 0
    n_taxa: int = 0
    above_genus: int = 0
    dropped_repeated: int = 0
    ranked: bool = False  # the ranks come from rank columns (BIOSCAN-5M), not from the name
    format: str = ""
    image_package: str = ""

    def summary(self) -> str:
        """A few lines for people: counts of rows and classes, dropped rows and missing images."""
        genus_only = self.no_epithet - self.above_genus
        lines = [
            f"manifest: {self.source}" + (f" (format {self.format})" if self.format else ""),
            *([f"image package: {self.image_package}"] if self.image_package else []),
            f"rows: {self.rows}",
            f"species: {self.n_species}, genera: {self.n_genera}, taxa: {self.n_taxa}",
            f"dropped (blank name): {self.dropped_blank}",
            f"dropped (image listed again under the same name): {self.dropped_repeated}",
            f"kept without a species epithet: {self.no_epithet}",
        ]
        if self.ranked:
            lines.append(f"  of them without a genus: {self.above_genus}: each row is scored "
                         f"and trained on at the ranks it has (see per level)")
        else:
            lines += [
                f"  named to genus only (e.g. 'Danaus sp.'): {genus_only}: scored at genus and "
                f"taxa level, trained on with label=genus",
                f"  named above genus (e.g. a family): {self.above_genus}: scored at taxa level "
                f"only, never trained on"]
        lines.append(f"missing or unreadable images: {len(self.missing)} (policy {self.policy})")
        lines += [f"  {path}" for path in self.missing[:SHOWN]]
        if len(self.missing) > SHOWN:
            lines.append(f"  and {len(self.missing) - SHOWN} more")
        return "\n".join(lines)


def report_of(table: pd.DataFrame, source: object, *, policy: str = "error",
              dropped_blank: int = 0, missing: tuple[str, ...] | dict = (),
              dropped_repeated: int = 0, ranked: bool = False, format: str = "",
              image_package: str = "") -> ManifestReport:
    """The report of a kept `table` (the class counts are counted from it) and of what reading
    it dropped: the one place a `ManifestReport` is made from a table."""
    return ManifestReport(
        source=str(source), rows=len(table), dropped_blank=int(dropped_blank),
        no_epithet=int(table["species"].isna().sum()), missing=tuple(missing), policy=policy,
        n_species=int(table["species"].nunique()), n_genera=int(table["genus"].nunique()),
        n_taxa=int(table["taxa"].nunique()), above_genus=int(table["genus"].isna().sum()),
        dropped_repeated=int(dropped_repeated), ranked=ranked, format=format,
        image_package=image_package)


@dataclass(frozen=True)
class Manifest:
    """The validated table (columns `COLUMNS` then any extra ones, index 0..n-1), the report of
    how it was read, the dataset root that `image_id` is relative to, and the levels the table
    has (what it scores and trains on: `names.Levels`). The images of a prepared or sharded
    dataset are samples of its `shards` (see `taxonclip.data.shards`)."""

    table: pd.DataFrame
    report: ManifestReport
    root: Path
    levels: names.Levels = names.VLM4BIO_LEVELS
    shards: tuple[str, ...] = ()  # a sharded dataset's shard URLs (`image_path` is `<url>#<key>`)

    @property
    def n_species(self) -> int:
        """How many distinct species the table holds."""
        return int(self.table["species"].nunique())

    @property
    def n_genera(self) -> int:
        """How many distinct genera the table holds."""
        return int(self.table["genus"].nunique())

    @property
    def n_taxa(self) -> int:
        """How many distinct taxa the table holds."""
        return int(self.table["taxa"].nunique())


def listed(items: list[str]) -> str:
    """The first items, then how many more."""
    shown = ", ".join(items[:SHOWN])
    return shown if len(items) <= SHOWN else f"{shown} and {len(items) - SHOWN} more"


def read_table(file: Path, role: str = "manifest") -> pd.DataFrame:
    try:
        if file.suffix.lower() == ".parquet":
            table = pd.read_parquet(file)
        else:
            table = pd.read_csv(file, dtype=str)
    except Exception as err:  # pandas and pyarrow raise many unrelated types for a broken file
        raise DataError(f"cannot read {role} {file}: {err}") from None
    # row numbers in messages are positions, so a stored index becomes an ordinary column
    return table.reset_index(drop=isinstance(table.index, pd.RangeIndex))


def clean_name(raw: object) -> str | None:
    """A scientific name without padding, invisible marks (zero-width and bidirectional) and with
    inner runs of spaces collapsed; None if blank."""
    if not isinstance(raw, str) and pd.isna(raw):
        return None
    name = " ".join(_INVISIBLE.sub("", str(raw)).split())
    return name or None


def check_taxa_names(taxa: pd.Series, source: object) -> None:
    """Refuse a taxa named like the overall row (`All`, `All:seen`, ...) and two taxa whose
    metric keys are the same (`a/b` and `a_b`): their rows of the table would merge."""
    by_key: dict[str, list[str]] = {}
    for name in sorted(taxa.unique()):
        by_key.setdefault(names.taxa_key(name), []).append(name)
    for key, spelled in by_key.items():
        if key == names.ALL_TAXA or key.startswith(f"{names.ALL_TAXA}:"):
            raise DataError(f"{source}: taxa {spelled[0]!r} takes the name of the table's overall "
                            f"row {names.ALL_TAXA!r}; rename it")
        if len(spelled) > 1:
            raise DataError(f"{source}: taxa {' and '.join(map(repr, spelled))} would share the "
                            f"metric key eval/{key}/...; rename one of them")


def species_of(name: str) -> str | None:
    """The name itself when it has a species epithet (a lowercase second word), else None."""
    return name if _has_epithet(name.split(" ")) else None


def genus_of(name: str) -> str | None:
    """The first word, or None when the name is only a family, subfamily, tribe or order."""
    words = name.split(" ")
    if not _has_epithet(words) and _RANK_ABOVE_GENUS.search(words[0].lower()):
        return None
    return words[0]


def _has_epithet(words: list[str]) -> bool:
    # "Danaus sp." or "Danaus cf. plexippus" name a genus only
    return len(words) > 1 and bool(_EPITHET.match(words[1])) and words[1] not in _NOT_AN_EPITHET


def drop_unreadable(table: pd.DataFrame, missing: str,
                    root: Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """The table without its missing or unreadable images, and those images with the reason;
    under `missing="error"` any such image raises a DataError listing them instead."""
    problems = _unreadable_images(table["image_path"])
    if problems and missing == "error":
        raise DataError(_missing_message(problems, len(table), root))
    return table[~table["image_path"].isin(list(problems))].reset_index(drop=True), problems


def _unreadable_images(paths: pd.Series) -> dict[str, str]:
    """Path -> reason for every image that is absent or whose header PIL cannot read."""
    with ThreadPoolExecutor(CHECK_THREADS) as pool:
        reasons = pool.map(_header_problem, paths)
    return {p: r for p, r in zip(paths, reasons) if r is not None}


def _header_problem(path: str) -> str | None:
    try:
        with Image.open(path) as image:
            return truncation(path, image)
    except FileNotFoundError:
        return "no such file"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return str(err) or type(err).__name__


# how a whole file of each format ends; a file that ends otherwise is decoded to tell a
# truncated one from one with bytes after its end (some cameras append data)
_FILE_ENDS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}


def truncation(path: str, image: Image.Image) -> str | None:
    """Why an image whose header reads is cut short, else None: its file lacks its format's end
    marker and its pixels do not decode. Reads two to eight bytes of a whole file."""
    end = _FILE_ENDS.get(image.format)
    if end is None:
        return None
    with open(path, "rb") as file:
        file.seek(0, os.SEEK_END)
        file.seek(max(0, file.tell() - len(end)))
        if file.read() == end:
            return None
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as err:
        return f"truncated: {err or type(err).__name__}"
    return None


def _missing_message(problems: dict[str, str], rows: int, root: Path) -> str:
    lines = [f"{len(problems)} of {rows} images listed in {root} are missing or unreadable:"]
    lines += [f"  {path}: {reason}" for path, reason in list(problems.items())[:SHOWN]]
    if len(problems) > SHOWN:
        lines.append(f"  and {len(problems) - SHOWN} more")
    lines.append("Fix the paths, or set missing=skip to drop these rows.")
    return "\n".join(lines)
