"""TreeOfLife-10M: its WebDataset shards read directly (local paths, brace patterns, or any URL
webdataset opens), with no prepare step; see `taxonclip.data.treeoflife` for the key layout.

The table is built in one pass over the shards, with each image's sha256 (which the duplicate
audit and the embedding cache compare, as they do a prepared folder's). A sample's ranks come from its `taxonTag.txt`
(which names each rank it gives) where it has one, else from `taxonomic_name.txt` read as the
ranks from kingdom down; both must agree. A missing rank leaves the row out of that rank only;
the species is `<genus> <epithet>` where both are known. Levels: kingdom to species; the taxa
are the kingdoms, so the per-taxa rows score phylum to species; a sample without a kingdom is
dropped and counted as blank.

Gallery and queries: `queries=` names held-out shards (their rows get the partition `test`, the
others `train`, for `split=official`); without it each row's group is its shard, so the seeded
split keeps whole shards on one side. `text_key=` puts each sample's own text of that key
(`sci`, `taxon`, `taxonTag`, ...) in the `caption` column, which zero-shot adds to each
species' texts and the caption embeddings read.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from taxonclip import names
from taxonclip.config import check_text_key
from taxonclip.data import shards, treeoflife
from taxonclip.data.readers.base import Reader, ReadOptions
from taxonclip.data.validated import COLUMNS, Manifest, check_taxa_names, clean_name, report_of
from taxonclip.errors import ConfigError, DataError

NAME = "treeoflife"
TAXA_RANK = "kingdom"
HONOURED = frozenset({"missing", "text_key", "queries"})
GALLERY_PARTITION, QUERY_PARTITION = "train", "test"


def detect(data: str) -> bool:
    """Shards whose first sample has TreeOfLife-10M's `taxonomic_name.txt`."""
    return (shards.is_shard_url(data)
            and treeoflife.TAXONOMIC_KEY in shards.first_sample_keys(data))


def read(data: str, options: ReadOptions) -> Manifest:
    """The validated table of the shards `data` (and the query shards `options.queries`)."""
    text_key = _text_key(options.text_key)
    urls = shards.expand_urls(data)
    query_urls = shards.expand_urls(options.queries) if options.queries else []
    if set(urls) & set(query_urls):
        raise ConfigError(f"parameter 'queries' names shards that data also names: "
                          f"{sorted(set(urls) & set(query_urls))[0]} ...; the queries are held out")
    every = [*urls, *query_urls]
    rows, problems = [], {}
    for sample in shards.iter_samples(every):
        row = _row(sample, text_key)
        if treeoflife.IMAGE_KEY not in sample:
            problems[row["image_path"]] = f"no {treeoflife.IMAGE_KEY!r} key"
            continue
        rows.append(row)
    if problems and options.missing == "error":
        first = next(iter(problems))
        raise DataError(f"{len(problems)} samples of {data} have no image: {first} has no "
                        f"{treeoflife.IMAGE_KEY!r} key (set missing=skip to leave them out)")
    if not rows:
        raise DataError(f"the shards {every[0]} ... hold no sample with an image")
    table = pd.DataFrame(rows)
    index = {url: i for i, url in enumerate(every)}
    table[names.SHARD_COLUMN] = table.pop("url").map(index)
    return _manifest(table, data, every, len(urls), options, problems)


def _text_key(name: str | None) -> str | None:
    if name is None:
        return None
    name = name.removesuffix(".txt")
    check_text_key(name)  # read_manifest takes it without a DataConfig
    return treeoflife.TEXT_KEYS[name]


def _row(sample: dict, text_key: str | None) -> dict:
    """One sample's row: its ranks, names, text and where it is. (webdataset gives a sample's
    file keys in lower case: `taxonTag.txt` is read as `taxontag.txt`.)"""
    url, key = sample["__url__"], sample["__key__"]
    where = f"sample {key!r} of shard {url}"
    for needed in (treeoflife.TAXONOMIC_KEY, *([text_key] if text_key else [])):
        if needed.lower() not in sample:
            present = ", ".join(k for k in sample if not k.startswith("__"))
            raise DataError(f"{where} has no {needed!r} (it has {present})")
    texts = {}
    for name in (*treeoflife.NAME_KEYS, treeoflife.TAGGED_KEY, *([text_key] if text_key else [])):
        if name.lower() in sample:
            texts[name] = clean_name(sample[name.lower()].decode("utf-8", errors="replace"))
    ranks = parse_ranks(texts.get(treeoflife.TAXONOMIC_KEY), texts.get(treeoflife.TAGGED_KEY),
                        where)
    row = {**ranks, "url": url, names.KEY_COLUMN: key,
           "image_path": shards.sample_locator(url, key),
           "scientific_name": texts.get(treeoflife.SCIENTIFIC_KEY),
           "common_name": texts.get(treeoflife.COMMON_KEY)}
    if treeoflife.IMAGE_KEY in sample:  # the duplicate audit and the embedding cache compare them
        row[names.SOURCE_DIGEST_COLUMN] = hashlib.sha256(sample[treeoflife.IMAGE_KEY]).hexdigest()
    if text_key:
        row["caption"] = texts.get(text_key)
    return row


def parse_ranks(taxonomic: str | None, tagged: str | None, where: str) -> dict[str, str | None]:
    """The ranks kingdom to species (species as `<genus> <epithet>`) of a sample's
    `taxonomic_name.txt` and, where it has one, its `taxonTag.txt`; a malformed or
    disagreeing pair is a DataError naming `where` and the key."""
    words = (taxonomic or "").split(" ")
    if not taxonomic or len(words) > len(treeoflife.RANKS):
        raise DataError(f"{where}: {treeoflife.TAXONOMIC_KEY!r} is {taxonomic!r}, not the ranks "
                        f"kingdom to species separated by spaces (at most "
                        f"{len(treeoflife.RANKS)} words)")
    ranks = dict(zip(treeoflife.RANKS, words))
    if tagged:
        ranks = _tagged_ranks(tagged, where)
        if " ".join(ranks.values()) != taxonomic:
            raise DataError(f"{where}: {treeoflife.TAGGED_KEY!r} ({tagged!r}) and "
                            f"{treeoflife.TAXONOMIC_KEY!r} ({taxonomic!r}) name different ranks")
    out: dict[str, str | None] = {rank: ranks.get(rank) for rank in treeoflife.RANKS}
    epithet = out["species"]
    out["species"] = f"{out['genus']} {epithet}" if epithet and out["genus"] else None
    return out


def _tagged_ranks(tagged: str, where: str) -> dict[str, str]:
    """`a photo of kingdom Animalia phylum Chordata ...` as {rank: name}, ranks in order."""
    body = tagged.removeprefix(treeoflife.PHOTO_PREFIX).removesuffix(treeoflife.PHOTO_END)
    words = body.split(" ")
    pairs = list(zip(words[::2], words[1::2]))
    ranks = [rank for rank, _ in pairs]
    order = [r for r in treeoflife.RANKS if r in ranks]
    if len(words) % 2 or not pairs or ranks != order or len(set(ranks)) != len(ranks):
        raise DataError(f"{where}: {treeoflife.TAGGED_KEY!r} is {tagged!r}, not 'a photo of' "
                        f"then rank-name pairs from kingdom to species")
    return dict(pairs)


def _manifest(table: pd.DataFrame, data: str, urls: list[str], n_gallery: int,
              options: ReadOptions, problems: dict[str, str]) -> Manifest:
    """The validated table of the rows read, with their partition or shard group."""
    repeated = table[names.KEY_COLUMN][table[names.KEY_COLUMN].duplicated()]
    if not repeated.empty:
        key = repeated.iloc[0]
        where = table.loc[table[names.KEY_COLUMN] == key, names.SHARD_COLUMN].map(urls.__getitem__)
        raise DataError(f"sample key {key!r} is in more than one shard ({', '.join(where)}): "
                        f"a key names one image")
    blank = table[TAXA_RANK].isna()
    table = table[~blank].reset_index(drop=True)
    if table.empty:
        raise DataError(f"no sample of {data} names a kingdom in {treeoflife.TAXONOMIC_KEY!r}")
    table["scientific_name"] = table["scientific_name"].fillna(
        table[list(reversed(treeoflife.RANKS))].bfill(axis=1).iloc[:, 0])
    table["image_id"] = table[names.KEY_COLUMN]
    table["taxa"] = table[TAXA_RANK]
    if options.queries:
        table[names.PARTITION_COLUMN] = [GALLERY_PARTITION if s < n_gallery else QUERY_PARTITION
                                   for s in table[names.SHARD_COLUMN]]
    else:
        table[names.GROUP_COLUMN] = table[names.SHARD_COLUMN].map(lambda s: urls[s])
    check_taxa_names(table["taxa"], data)
    table = table[list(COLUMNS) + [c for c in table.columns if c not in COLUMNS]]
    report = report_of(table, data, policy=options.missing, dropped_blank=int(blank.sum()),
                       missing=tuple(problems), ranked=True, format=NAME)
    return Manifest(table=table, report=report, root=Path("."), levels=names.TREEOFLIFE_LEVELS,
                    shards=tuple(urls))


READER = Reader(NAME, "TreeOfLife-10M", detect, read, HONOURED, treeoflife.write_fixture)
