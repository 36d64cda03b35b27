"""Read image manifests into one validated table: one row per image with its absolute path, its
cleaned scientific name and the species, genus and taxa levels derived from it.

Six layouts are accepted:

- a VLM4Bio folder: `<root>/<Group>/metadata/*.csv` with images in `<root>/<Group>/images/`; the
  taxa of a row is its group folder's name (or the `taxa=` argument). When a group holds several
  CSV files they are read together and an image listed in more than one of them counts once
  (first file by name wins).
- a single `.csv` or `.parquet` manifest. Image paths are relative to the manifest's folder, or
  else to its `images/` subfolder (whichever holds more of the listed files). The taxa comes
  from the `taxa=` argument, else a `taxa` column, else the manifest folder's name. A manifest
  inside a `<Group>/metadata/` folder is read as one VLM4Bio group.
- a folder holding one `metadata.csv`, `manifest.csv`, `metadata.parquet` or `manifest.parquet`.
- BIOSCAN-5M: its metadata file, or a folder holding it, with its images in the official layout
  (read by `taxonclip.data.bioscan`; its levels are the ranks phylum to species).
- a folder written by `taxonclip data prepare`, or a WebDataset shard URL pattern (both read by
  `taxonclip.data.prepare`; the images are then samples of the shards).

`image_id` is the image's path relative to the dataset root (the VLM4Bio folder or the manifest's
folder): unique and stable, it keys the saved split and embedding caches. Columns other than the
image, name and taxa ones are kept, except those named like a column of `COLUMNS`, which the
table derives itself. With `group_column`, a column `group` holds each row's group (a specimen,
clip or observation id; a blank group is the row's own image), which the split keeps on one side.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
from PIL import Image

from taxonclip import names
from taxonclip.config import MISSING_POLICIES, SYNTHETIC, DataConfig
from taxonclip.data.splits import GROUP_COLUMN
from taxonclip.data.synthetic import default_dataset
from taxonclip.errors import ConfigError, DataError

COLUMNS = ("image_id", "image_path", "scientific_name", "species", "genus", "taxa")

IMAGE_COLUMNS = ("fileNameAsDelivered", "image_path", "file_name", "file_path", "image", "path")
NAME_COLUMNS = ("scientificName", "scientific_name")
TAXA_COLUMNS = ("taxa", "taxon")
CAPTION_COLUMNS = ("caption", "description", "text")
MANIFEST_FILES = ("metadata.csv", "manifest.csv", "metadata.parquet", "manifest.parquet")
MANIFEST_SUFFIXES = (".csv", ".parquet")
IMAGE_FOLDER = "images"
VLM4BIO_METADATA = "metadata"

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
    BIOSCAN-5M table (`ranked`), a blank name is a row without an order."""

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

    def summary(self) -> str:
        """A few lines for people: counts of rows and classes, dropped rows and missing images."""
        genus_only = self.no_epithet - self.above_genus
        lines = [
            f"manifest: {self.source}",
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


@dataclass(frozen=True)
class _Columns:
    """The manifest columns a user named (None: found by their usual names, or absent)."""

    image: str | None
    name: str | None
    caption: str | None
    group: str | None


@dataclass(frozen=True)
class _Source:
    """One manifest file, the folders its image paths may be relative to, its VLM4Bio group (the
    taxa of all its rows) if it is in one, and its folder's name (the taxa when nothing else is)."""

    file: Path
    image_dirs: tuple[Path, ...]
    group: str | None
    folder_name: str


def load_manifest(config: DataConfig) -> Manifest:
    """Read the manifest named by `config.data` (`synthetic` means the generated default set),
    with the captions of `config.captions` when given (`caption_column` then names their column
    in that file rather than in the manifest)."""
    data = default_dataset() if config.data == SYNTHETIC else config.data
    manifest = read_manifest(data, image_column=config.image_column, name_column=config.name_column,
                             taxa=config.taxa, missing=config.missing,
                             caption_column=None if config.captions else config.caption_column,
                             group_column=config.group_column)
    if config.captions:
        return with_captions(manifest, Path(config.captions).expanduser(), config.caption_column)
    return manifest


def with_captions(manifest: Manifest, file: Path, caption_column: str | None = None) -> Manifest:
    """The manifest with a `caption` per row from `file`, a CSV or parquet table of one text per
    scientific name (such as field-guide descriptions of each species), replacing any caption the
    manifest had. Every name in the manifest needs one; names are matched after cleaning. A file
    with an `image_id` column (as `taxonclip caption` writes) gives each image its own caption
    instead (`taxonclip.captions.keyed`)."""
    from taxonclip.captions.keyed import is_keyed, join_by_image

    if file.is_file() and is_keyed(file):
        return join_by_image(manifest, file, caption_column)
    captions = manifest.table["scientific_name"].map(_captions_by_name(file, caption_column))
    uncaptioned = sorted(manifest.table.loc[captions.isna(), "scientific_name"].unique())
    if uncaptioned:
        raise DataError(f"{file}: no caption for {len(uncaptioned)} of "
                        f"{manifest.table['scientific_name'].nunique()} names in the manifest: "
                        f"{_listed(uncaptioned)}")
    return replace(manifest, table=manifest.table.assign(caption=captions.astype(str)))


def _captions_by_name(file: Path, caption_column: str | None) -> pd.Series:
    """Caption text indexed by cleaned scientific name; a name given two texts is an error."""
    if not file.is_file():
        raise DataError(f"captions file {file} does not exist")
    raw = _read_table(file, role="captions file")
    name_col = _pick_column(raw, None, NAME_COLUMNS, "name", file, settable=False)
    text_col = _pick_column(raw, caption_column, CAPTION_COLUMNS, "caption", file)
    texts = pd.DataFrame({"name": raw[name_col].map(clean_name), "text": raw[text_col]}).dropna()
    conflicting = texts.groupby("name")["text"].nunique().loc[lambda counts: counts > 1]
    if not conflicting.empty:
        raise DataError(f"{file}: different captions for the same name: "
                        f"{_listed(list(conflicting.index))}")
    return texts.drop_duplicates("name").set_index("name")["text"]


def _listed(names: list[str]) -> str:
    """The first names, then how many more."""
    shown = ", ".join(names[:SHOWN])
    return shown if len(names) <= SHOWN else f"{shown} and {len(names) - SHOWN} more"


def read_manifest(path: str | Path, image_column: str | None = None, name_column: str | None = None,
                  taxa: str | None = None, missing: str = "error",
                  caption_column: str | None = None, group_column: str | None = None) -> Manifest:
    """Read and validate a VLM4Bio folder, a CSV or parquet manifest, or a folder holding one.

    Column names default to the VLM4Bio ones (`fileNameAsDelivered`, `scientificName`) and also
    accept `image_path`/`file_name`-style and `scientific_name` names; `taxa` sets one taxa for
    every row. Rows with a blank name are dropped and counted. Missing or unreadable images raise
    `DataError` under `missing="error"` and are dropped and listed under `missing="skip"`. A
    `caption_column` is renamed `caption`; without one, a `caption` column is kept as it is. A
    `group_column` becomes the column `group`. Taxa names that would share a metric key, or take
    the overall row's name, are refused.
    """
    if missing not in MISSING_POLICIES:
        raise ConfigError(f"parameter 'missing' is {missing!r}; "
                          f"choose one of {', '.join(MISSING_POLICIES)}")
    from taxonclip.data import bioscan, prepare, shards  # they build on this module's checks

    if shards.is_shard_url(str(path)):
        return prepare.read_shard_urls(str(path), taxa)
    if shards.prepared_file(Path(path).expanduser()) is not None:
        return prepare.read_prepared(Path(os.path.abspath(Path(path).expanduser())), missing)
    unfinished = prepare.unfinished_message(Path(os.path.abspath(Path(path).expanduser())))
    if unfinished:
        raise DataError(unfinished)
    metadata = bioscan.metadata_file(Path(path).expanduser())
    if metadata is not None:
        return bioscan.read_bioscan(metadata, missing)
    root, sources = _find_sources(Path(path).expanduser())
    frames, dropped_blank = [], 0
    for source in sources:
        frame, blank = _read_source(source, _Columns(image_column, name_column, caption_column,
                                                     group_column), taxa)
        frames.append(frame)
        dropped_blank += blank
    table = pd.concat(frames, ignore_index=True)
    if table.empty and not dropped_blank:
        where = sources[0].file if len(sources) == 1 else f"the {len(sources)} manifests of {root}"
        raise DataError(f"no rows in {where}: a header and no image listed under it")
    table["image_id"] = [_image_id(p, root) for p in table["image_path"]]
    if group_column:
        table[GROUP_COLUMN] = table[GROUP_COLUMN].fillna(table["image_id"])
    listed = len(table)
    table = _drop_repeated_images(table, root)
    dropped_repeated = listed - len(table)
    check_taxa_names(table["taxa"], root)
    table, problems = drop_unreadable(table, missing, root)
    if table.empty:
        raise DataError(f"no usable rows in {root}: {dropped_blank} with a blank name, "
                        f"{len(problems)} with a missing or unreadable image")
    table = table[list(COLUMNS) + [c for c in table.columns if c not in COLUMNS]]
    report = ManifestReport(
        source=str(root if len(sources) > 1 else sources[0].file), rows=len(table),
        dropped_blank=dropped_blank, no_epithet=int(table["species"].isna().sum()),
        missing=tuple(problems), policy=missing, n_species=int(table["species"].nunique()),
        n_genera=int(table["genus"].nunique()), n_taxa=int(table["taxa"].nunique()),
        above_genus=int(table["genus"].isna().sum()), dropped_repeated=dropped_repeated)
    return Manifest(table=table, report=report, root=root)


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


def _find_sources(path: Path) -> tuple[Path, list[_Source]]:
    """The dataset root and its manifest files."""
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    path = Path(os.path.abspath(path))
    if path.is_file():
        return _single_file(path)
    found = [path / name for name in MANIFEST_FILES if (path / name).is_file()]
    if len(found) > 1:
        raise DataError(f"{path} holds several manifests ({', '.join(f.name for f in found)}); "
                        "pass the path of the one to use")
    if found:
        return _single_file(found[0])
    groups = sorted(d for d in path.iterdir() if d.is_dir() and _group_files(d))
    if not groups:
        raise DataError(f"no manifest in {path}: expected one of {', '.join(MANIFEST_FILES)}, or "
                        f"VLM4Bio group folders <Group>/{VLM4BIO_METADATA}/*.csv")
    sources = [_Source(f, (g / IMAGE_FOLDER, g), g.name, g.name)
               for g in groups for f in _group_files(g)]
    return path, sources


def _single_file(file: Path) -> tuple[Path, list[_Source]]:
    if file.suffix.lower() not in MANIFEST_SUFFIXES:
        raise DataError(f"{file} is not a manifest: expected a .csv or .parquet file")
    folder = file.parent
    if folder.name == VLM4BIO_METADATA:
        group = folder.parent
        return group.parent, [_Source(file, (group / IMAGE_FOLDER, group), group.name, group.name)]
    return folder, [_Source(file, (folder, folder / IMAGE_FOLDER), None, folder.name)]


def _group_files(group: Path) -> list[Path]:
    return sorted((group / VLM4BIO_METADATA).glob("*.csv"))


def _read_source(source: _Source, columns: _Columns,
                 taxa: str | None) -> tuple[pd.DataFrame, int]:
    """One manifest file as a table with the columns of `COLUMNS` (but `image_id`), its group
    when asked for, its extra columns, and the number of rows dropped for a blank name."""
    raw = _read_table(source.file)
    image_col = _pick_column(raw, columns.image, IMAGE_COLUMNS, "image", source.file)
    name_col = _pick_column(raw, columns.name, NAME_COLUMNS, "name", source.file)
    caption_col = (_pick_column(raw, columns.caption, (), "caption", source.file)
                   if columns.caption else None)
    group_col = (_pick_column(raw, columns.group, (), "group", source.file)
                 if columns.group else None)
    fixed_taxa = taxa or source.group
    taxa_col = None if fixed_taxa else _find_column(raw, TAXA_COLUMNS)
    names = raw[name_col].map(clean_name)
    kept = raw[names.notna()]
    files = [_image_file(value, source.file, row, image_col)
             for row, value in kept[image_col].items()]
    base = _image_base(files, source.image_dirs)
    frame = _extra_columns(kept, (image_col, name_col, taxa_col), caption_col, group_col).assign(
        image_path=[os.path.abspath(base / f) for f in files],
        scientific_name=names[names.notna()].to_numpy(),
        species=[species_of(n) for n in names.dropna()],
        genus=[genus_of(n) for n in names.dropna()],
        taxa=_taxa_values(kept, taxa_col, fixed_taxa or source.folder_name, source.file))
    return frame.reset_index(drop=True), int(names.isna().sum())


def _extra_columns(kept: pd.DataFrame, used: tuple[str | None, ...], caption_col: str | None,
                   group_col: str | None) -> pd.DataFrame:
    """The columns carried along unchanged: all but those read into `COLUMNS` or replaced by
    them, with the caption column renamed `caption` and the group column `group` (a column
    already named `group` is not one unless `group_column` names it)."""
    derived = (*COLUMNS, GROUP_COLUMN)
    frame = kept.drop(columns=[c for c in kept.columns if c in used or c in derived])
    if caption_col is not None:
        frame = frame.drop(columns=[caption_col], errors="ignore").assign(caption=kept[caption_col])
    if group_col is not None:
        frame = frame.drop(columns=[group_col], errors="ignore").assign(
            **{GROUP_COLUMN: kept[group_col].map(clean_name)})
    return frame


def _read_table(file: Path, role: str = "manifest") -> pd.DataFrame:
    try:
        if file.suffix.lower() == ".parquet":
            table = pd.read_parquet(file)
        else:
            table = pd.read_csv(file, dtype=str)
    except Exception as err:  # pandas and pyarrow raise many unrelated types for a broken file
        raise DataError(f"cannot read {role} {file}: {err}") from None
    # row numbers in messages are positions, so a stored index becomes an ordinary column
    return table.reset_index(drop=isinstance(table.index, pd.RangeIndex))


def _pick_column(frame: pd.DataFrame, requested: str | None, candidates: tuple[str, ...],
                 role: str, file: Path, settable: bool = True) -> str:
    """The column asked for, else the first default candidate present (ignoring case and _);
    `settable` says whether a `<role>_column` parameter can name another one."""
    existing = ", ".join(map(str, frame.columns))
    if requested is not None:
        if requested in frame.columns:
            return requested
        raise DataError(f"{file}: no column {requested!r} (set as the {role} column); "
                        f"the columns are: {existing}")
    found = _find_column(frame, candidates)
    if found is None:
        alternative = f" (or set {role}_column)" if settable else ""
        raise DataError(f"{file}: no {role} column: expected one of {', '.join(candidates)}"
                        f"{alternative}; the columns are: {existing}")
    return found


def _find_column(frame: pd.DataFrame, candidates: tuple[str, ...]) -> str | None:
    by_key = {_column_key(c): c for c in frame.columns}
    return next((by_key[_column_key(c)] for c in candidates if _column_key(c) in by_key), None)


def _column_key(column: object) -> str:
    return re.sub(r"[^a-z0-9]", "", str(column).lower())


def _image_file(value: object, file: Path, row: int, column: str) -> str:
    text = clean_name(value)
    if text is None:
        raise DataError(f"{file}, row {_row_number(row)}: column {column!r} is blank")
    return text


def _image_base(files: list[str], candidates: tuple[Path, ...]) -> Path:
    """The candidate folder that holds the most of the first listed files (first wins a tie)."""
    sample = files[:100]
    return max(candidates, key=lambda folder: sum((folder / f).is_file() for f in sample))


def _taxa_values(kept: pd.DataFrame, taxa_col: str | None, default: str, file: Path) -> list[str]:
    if taxa_col is None:
        return [default] * len(kept)
    values = kept[taxa_col].map(clean_name)
    if values.isna().any():
        row = int(values.index[values.isna()][0])
        raise DataError(f"{file}, row {_row_number(row)}: column {taxa_col!r} is blank "
                        "(fill it, or set one taxa for every row)")
    return values.tolist()


def _row_number(index: int) -> int:
    """Rows are counted from 1, the header excluded."""
    return index + 1


def _image_id(image_path: str, root: Path) -> str:
    path = Path(image_path)
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()


def _drop_repeated_images(table: pd.DataFrame, root: Path) -> pd.DataFrame:
    """Keep the first row of an image listed more than once; refuse one listed under two names."""
    repeated = table[table.duplicated("image_id", keep=False)]
    conflicting = repeated.groupby("image_id")["scientific_name"].nunique()
    conflicting = conflicting[conflicting > 1]
    if not conflicting.empty:
        raise DataError(f"{root}: {len(conflicting)} images are listed under different names: "
                        f"{_listed(list(conflicting.index))}")
    return table.drop_duplicates("image_id").reset_index(drop=True)


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
        with Image.open(path):
            return None
    except FileNotFoundError:
        return "no such file"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return str(err) or type(err).__name__


def _missing_message(problems: dict[str, str], rows: int, root: Path) -> str:
    lines = [f"{len(problems)} of {rows} images listed in {root} are missing or unreadable:"]
    lines += [f"  {path}: {reason}" for path, reason in list(problems.items())[:SHOWN]]
    if len(problems) > SHOWN:
        lines.append(f"  and {len(problems) - SHOWN} more")
    lines.append("Fix the paths, or set missing=skip to drop these rows.")
    return "\n".join(lines)
