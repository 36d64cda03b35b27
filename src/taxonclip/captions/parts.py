"""The captions folder: `settings.json` (what every caption in it was made with), `parts/` (part
files of at most `part_size` rows, each written whole or not at all) and `captions.parquet`, the
merge of the parts.

A part is written to a temporary name and renamed, so a kill leaves either the whole part or
none of it: at most the rows of the part being filled are lost, and a rerun captions them again.
Each share (a torchrun rank, a SLURM array task) writes its own parts, `part-<share>-<n>.parquet`,
so shares never write the same file. The merged file carries, as parquet metadata under
`taxonclip.captions`, the settings and the split that decided which rows saw a name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from taxonclip.diskio import atomic_path, write_bytes
from taxonclip.errors import ConfigError, DataError

CAPTIONS_FILE = "captions.parquet"
SETTINGS_FILE = "settings.json"
PARTS = "parts"
METADATA_KEY = b"taxonclip.captions"
# the columns of the merged file (the contract with eval and train), then what the parts add
COLUMNS = ("image_id", "caption", "template", "model", "revision", "saw_name")
PART_COLUMNS = (*COLUMNS, "prompt", "tokens", "status")
OK, EMPTY, UNDECODABLE = "ok", "empty", "undecodable"  # a part row's status
_PART = re.compile(r"^part-(\d+)-(\d+)\.parquet$")


def check_settings(out: Path, settings: dict) -> None:
    """Record `settings` in `out` (new), or check they are those it holds: captions of other
    settings are refused, naming what differs, rather than mixed into one file."""
    out.mkdir(parents=True, exist_ok=True)
    file = out / SETTINGS_FILE
    if not file.exists():
        _write_text_atomic(file, json.dumps(settings, indent=2, sort_keys=True))
        return
    try:
        held = json.loads(file.read_text())
    except ValueError as err:
        raise DataError(f"{file} is not readable JSON ({err}); it records what the captions in "
                        f"{out} were made with: use another out folder") from None
    differing = sorted(key for key in {*held, *settings} if held.get(key) != settings.get(key))
    if differing:
        shown = "; ".join(f"{key}: {held.get(key)!r} there, {settings.get(key)!r} now"
                          for key in differing)
        raise ConfigError(f"{out} holds captions made with other settings ({shown}); use another "
                          f"out folder, or the same settings to go on")


def read_settings(out: Path) -> dict:
    """The settings `out` was made with (a DataError when there are none)."""
    file = out / SETTINGS_FILE
    if not file.is_file():
        raise DataError(f"{out} holds no captions ({SETTINGS_FILE} is absent): caption into it "
                        f"first")
    return json.loads(file.read_text())


def read_parts(out: Path) -> pd.DataFrame:
    """Every row of every part file of `out` (a part that cannot be read is an error naming it:
    parts are renamed into place whole, so a broken one was damaged afterwards)."""
    frames = []
    for file in part_files(out):
        try:
            frames.append(pd.read_parquet(file))
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise DataError(f"cannot read part file {file}: {err}; delete it to caption its "
                            f"rows again") from None
    if not frames:
        return pd.DataFrame({column: pd.Series(dtype=object) for column in PART_COLUMNS})
    return pd.concat(frames, ignore_index=True)


def part_files(out: Path) -> list[Path]:
    """The finished part files of `out`, by share and number."""
    folder = out / PARTS
    if not folder.is_dir():
        return []
    found = [(tuple(map(int, m.groups())), p) for p in folder.iterdir()
             if (m := _PART.match(p.name))]
    return [path for _, path in sorted(found)]


class PartWriter:
    """Writes the rows of one share as numbered part files, `part_size` rows at a time."""

    def __init__(self, out: Path, share: int, part_size: int) -> None:
        self.folder = out / PARTS
        self.folder.mkdir(parents=True, exist_ok=True)
        self.share, self.part_size = share, part_size
        numbers = [int(m.group(2)) for p in self.folder.iterdir()
                   if (m := _PART.match(p.name)) and int(m.group(1)) == share]
        self.next_number = max(numbers, default=-1) + 1
        self.buffer: list[dict] = []
        self.written = 0

    def add(self, rows: list[dict]) -> None:
        """Queue rows; every full part is written at once."""
        self.buffer.extend(rows)
        while len(self.buffer) >= self.part_size:
            self._write(self.buffer[:self.part_size])
            self.buffer = self.buffer[self.part_size:]

    def flush(self) -> None:
        """Write what is queued as one (shorter) part."""
        if self.buffer:
            self._write(self.buffer)
            self.buffer = []

    def _write(self, rows: list[dict]) -> None:
        frame = pd.DataFrame(rows, columns=list(PART_COLUMNS))
        target = self.folder / f"part-{self.share:05d}-{self.next_number:06d}.parquet"
        with atomic_path(target, what="a captions part") as partial:
            frame.to_parquet(partial, index=False)
        self.next_number += 1
        self.written += len(rows)


def merge(out: Path, metadata: dict, order: list[str]) -> pd.DataFrame:
    """Merge the parts of `out` into `captions.parquet` (written atomically), rows in the order
    of `order` (the job's image ids), with `metadata` as its `taxonclip.captions` JSON; rows of
    undecodable images stay out. Returns the merged table."""
    parts = read_parts(out).drop_duplicates("image_id")
    kept = parts[parts["status"] != UNDECODABLE]
    position = {image_id: i for i, image_id in enumerate(order)}
    kept = kept.assign(_order=kept["image_id"].map(position)).sort_values("_order", kind="stable")
    frame = kept[list(COLUMNS) + ["prompt", "tokens"]].reset_index(drop=True)
    frame["saw_name"] = frame["saw_name"].astype(bool)
    frame["tokens"] = frame["tokens"].astype("int64")
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    target = out / CAPTIONS_FILE
    with atomic_path(target, what="the captions file") as partial:
        pq.write_table(table, partial)
    return frame


def read_metadata(file: Path) -> dict | None:
    """The `taxonclip.captions` metadata of a captions file, None when it has none."""
    if file.suffix.lower() != ".parquet":
        return None
    raw = (pq.read_schema(file).metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else None


def _write_text_atomic(file: Path, text: str) -> None:
    write_bytes(file, text.encode())
