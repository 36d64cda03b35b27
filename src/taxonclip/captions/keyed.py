"""Captions keyed by image, as eval and train read them (`captions=<file>` with an `image_id`
column): each row of the manifest gets its own image's caption.

A file written by `taxonclip caption` also says which rows' prompts held a name (`saw_name`)
and under which split that was allowed; the table then gets `caption_saw_name`, and
`check_caption_split` refuses a file in which a query row of this run's split saw a name, or
one made under another split.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from taxonclip.captions.parts import read_metadata
from taxonclip.captions.prompts import split_parameters
from taxonclip.data.validated import listed
from taxonclip import names
from taxonclip.errors import DataError

KEY = "image_id"
SAW_NAME = names.CAPTION_SAW_NAME  # the table's column: that row's caption prompt held a rank name


def is_keyed(file: Path) -> bool:
    """Whether a captions file is keyed by image (has an `image_id` column)."""
    try:
        if file.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            return KEY in pq.read_schema(file).names
        return KEY in pd.read_csv(file, nrows=0).columns
    except Exception:  # unreadable: the per-name reader gives the message
        return False


def join_by_image(manifest, file: Path, caption_column: str | None = None):
    """The manifest with each row's caption from `file`, matched by image id; with a file of
    `taxonclip caption`, also `caption_saw_name`. An image of the manifest without a caption,
    or one given two, is refused, naming them."""
    table = pd.read_parquet(file) if file.suffix.lower() == ".parquet" else pd.read_csv(
        file, dtype={KEY: str})
    column = caption_column or "caption"
    if column not in table.columns:
        raise DataError(f"captions file {file}: no column {column!r} beside {KEY!r}; the columns "
                        f"are {', '.join(map(str, table.columns))}")
    repeated = table.loc[table[KEY].duplicated(), KEY].unique().tolist()
    if repeated:
        raise DataError(f"captions file {file}: images captioned twice: {listed(repeated)}")
    by_id = table.set_index(KEY)
    ids = manifest.table[KEY]
    absent = ids[~ids.isin(by_id.index)].tolist()
    if absent:
        raise DataError(f"captions file {file} has no caption for {len(absent)} of {len(ids)} "
                        f"images of {manifest.report.source}: {listed(absent)} (caption them "
                        f"into the same out folder: a rerun adds only what is missing)")
    columns = {"caption": ids.map(by_id[column]).fillna("").astype(str).to_numpy()}
    if "saw_name" in by_id.columns and read_metadata(file) is not None:
        columns[SAW_NAME] = ids.map(by_id["saw_name"]).astype(bool).to_numpy()
    return replace(manifest, table=manifest.table.assign(**columns))


def check_caption_split(table: pd.DataFrame, split, data) -> None:
    """Refuse captions in which a query row (test or validation) of `split` saw its name, and
    captions whose names were placed under another split than `data`'s, naming both."""
    if SAW_NAME not in table.columns or not data.captions:
        return
    file = Path(data.captions).expanduser()
    saw = table[SAW_NAME].to_numpy(bool)
    if saw.any():
        made = (read_metadata(file) or {}).get("split", {})
        now = split_parameters(data)
        differing = sorted(key for key in now if made.get(key) != now[key])
        if differing:
            raise DataError(f"captions file {file} placed names in prompts under the split "
                            f"{_spelled(made)}, and this run splits by {_spelled(now)} (differing: "
                            f"{', '.join(differing)}): its gallery rows may be this run's queries; "
                            f"caption again with this split, or run with that one")
    queries = np.union1d(split.test, split.val).astype(int)
    leaked = queries[saw[queries]]
    if len(leaked):
        ids = table["image_id"].iloc[leaked].tolist()
        raise DataError(f"captions file {file}: {len(leaked)} query image(s) of this run's split "
                        f"were captioned with their name in the prompt: {listed(ids)}; their "
                        f"captions carry the label into the query")


def _spelled(split: dict) -> str:
    return ", ".join(f"{key}={split.get(key)}" for key in sorted(split))

