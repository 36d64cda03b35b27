"""Input checks that refuse, before anything is embedded, a request that cannot give a sound
table: a decoder that cannot read the images, a split with no test image, and text that would
carry the label into a query (with the caption-only gauge that measures what the text knows).

A caption fused into a query (`embedding=text`, `avg`, `concat`) must describe the image, not
name its answer. Two checks stand between a caption and a query:

- The name check (`label_revealing_captions`), at input-check time, needs no model: a caption
  that holds a row's own name at any rank (species, genus, ..., as the data has them), any word
  of its scientific name (the genus alone, the epithet alone), or its common name (a
  `commonName` column, as the Leeds butterflies have), in any case and with any punctuation
  ("DANAUS_PLEXIPPUS", "danaus-plexippus", "D. plexippus"), reveals the label; so does one text
  per species (every image of a species sharing a caption no other species uses).
- The caption-only gauge (`caption_only_scores`) scores the captions alone: a model-free
  nearest neighbour over bag-of-words vectors (TF-IDF of word and character n-grams, fitted on
  the captions without their labels), with the table's own queries, gallery and rows. Every
  text-mode evaluation logs it as the column `caption_only_top1`, so that the table shows what
  the text knows. Captions not made by `taxonclip caption` (whose table carries the column
  `caption_saw_name`: that command records whether a prompt held a name, and refuses a file
  whose query rows saw one) are refused in query-side modes when the captions alone find the
  label more often than the model's images alone on the same rows, by more than the gauge's
  own sampling noise (`caption_gauge_refusal`),
  catching what no list of names can: a code, a nickname, a wording that varies per image.

`allow_label_text=true` lets such captions in; the run is then tagged, and its numbers measure
the text's knowledge of the label.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np
import pandas as pd

from taxonclip import names
from taxonclip.config import EvalConfig
from taxonclip.data.manifest import Manifest
from taxonclip.data.splits import QUERY_PARTITIONS, Split
from taxonclip.errors import ConfigError, DataError
from taxonclip.names import GROUP_COLUMN, PARTITION_COLUMN

QUERY_TEXT_EMBEDDINGS = ("text", "avg", "concat")  # the modes that put a caption into a query
GALLERY_TEXT_EMBEDDINGS = ("gallery_avg",)  # captions on the gallery side only
TEXT_EMBEDDINGS = (*QUERY_TEXT_EMBEDDINGS, *GALLERY_TEXT_EMBEDDINGS)
# the column with which `taxonclip caption` marks its captions (and whether a prompt held a name)
CAPTION_PROVENANCE_COLUMN = names.CAPTION_SAW_NAME
COMMON_NAME_COLUMNS = ("commonName", "common_name", "vernacularName", "vernacular_name")
RANK_COLUMNS = tuple(level for level in names.KNOWN_LEVELS if level != "taxa")
MIN_WORD = 3  # shorter words of a scientific name ("f.", "sp") name nothing
# words of a scientific name that are no name: qualifiers of an open nomenclature
NOT_NAMES = frozenset({"sp", "spp", "cf", "aff", "var", "subsp", "ssp", "nr", "indet"})
MAX_FEATURES = 2048  # per vectoriser: the gauge's vectors stay small whatever the vocabulary


def normalised_text(text: object) -> str:
    """Lower case, accents dropped, every run of characters other than letters and digits one
    space, padded by a space at each end: names are then found as whole words."""
    plain = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode("ascii")
    return f" {' '.join(re.split(r'[^a-z0-9]+', plain.lower())).strip()} "


def row_names(row: pd.Series, rank_columns: list[str], common_column: str | None) -> set[str]:
    """Every spelling of a row's label that a caption may not hold, normalised: each rank's
    name, the scientific name and each of its words, the common name, and each multi-word name
    also run together ("danausplexippus")."""
    whole = [row[column] for column in (*rank_columns, "scientific_name")
             if column in row.index and pd.notna(row[column])]
    if common_column is not None and pd.notna(row[common_column]):
        whole.append(row[common_column])
    found = set()
    for name in whole:
        words = normalised_text(name).split()
        if words:
            found.add(" ".join(words))
            found.add("".join(words))
    for word in normalised_text(row.get("scientific_name", "")).split():
        if len(word) >= MIN_WORD and word not in NOT_NAMES:
            found.add(word)
    # a short single word ("a", "ab") is found in too many honest captions to name anything
    return {name for name in found if " " in name or len(name) >= MIN_WORD}


def naming_rows(table: pd.DataFrame) -> list[tuple[int, str]]:
    """The rows whose caption names the row's own label, with the name found."""
    ranks = [column for column in RANK_COLUMNS if column in table.columns]
    common = next((column for column in COMMON_NAME_COLUMNS if column in table.columns), None)
    found = []
    for position, (_, row) in enumerate(table.iterrows()):
        text = normalised_text(row["caption"]) if pd.notna(row["caption"]) else " "
        hits = sorted(name for name in row_names(row, ranks, common) if f" {name} " in text)
        if hits:
            found.append((position, hits[0]))
    return found


def label_revealing_captions(table: pd.DataFrame) -> str | None:
    """Why the captions of `table` reveal each row's label, or None when they do not.

    A caption reveals the label when it holds one of the row's own names (see `row_names`), or
    when it is one text per name: every image of a name (of two or more images) shares a
    caption that no other name uses, so the caption is a function of the label rather than a
    description of the image."""
    naming = naming_rows(table)
    if naming:
        position, name = naming[0]
        caption = str(table["caption"].iloc[position])
        return (f"names the image's own label in {len(naming)} of {len(table)} rows (e.g. row "
                f"{position + 1}: {name!r} in {caption[:80]!r})")
    captions = table["caption"].fillna("").astype(str)
    names_ = table["scientific_name"]
    per_name = pd.DataFrame({"name": names_, "caption": captions})
    sizes = per_name.groupby("name")["caption"].agg(["size", "nunique"])
    names_per_caption = per_name.groupby("caption")["name"].nunique()
    shared = per_name.drop_duplicates("name").set_index("name")["caption"]
    constant = sizes[(sizes["size"] > 1) & (sizes["nunique"] == 1)].index
    unique_to_name = [name for name in constant if names_per_caption[shared[name]] == 1]
    if unique_to_name:
        return (f"is one text per species for {len(unique_to_name)} of {int((sizes['size'] > 1).sum())} "
                f"species of two or more images (e.g. every {unique_to_name[0]!r} image has "
                f"the same caption, used by no other species)")
    return None


def made_by_caption_command(table: pd.DataFrame) -> bool:
    """Whether the captions come from `taxonclip caption` (which records their provenance)."""
    return CAPTION_PROVENANCE_COLUMN in table.columns


def check_no_label_in_queries(manifest, embedding: str, allow_label_text: bool) -> None:
    """Refuse an embedding that would fuse a label-revealing caption into the queries (unless
    `allow_label_text`); of the captions of `taxonclip caption`, those of rows whose prompt held no
    name are checked (the others are gallery rows by design)."""
    table = manifest.table
    if embedding not in QUERY_TEXT_EMBEDDINGS or "caption" not in table.columns or allow_label_text:
        return
    if made_by_caption_command(table):  # rows captioned with their name are gallery rows by design
        table = table[~table[CAPTION_PROVENANCE_COLUMN].to_numpy(bool)]
    reason = label_revealing_captions(table)
    if reason is not None:
        raise DataError(
            f"embedding={embedding} would put each test image's caption into its query, and the "
            f"captions of {manifest.report.source} reveal the label: the caption {reason}. A query "
            f"would then carry its own answer and score near 100% with any weights. Use "
            f"embedding=gallery_avg (gallery images averaged with their caption, queries visual "
            f"only) or embedding=visual; text, avg and concat need captions written from each "
            f"image (taxonclip caption), or allow_label_text=true to measure the text itself.")


def caption_vectors(captions: list[str]):
    """Each caption as a bag-of-words vector: TF-IDF of word 1-2-grams and of character 3-5-grams
    (within words), each L2-normalised, side by side; a float32 tensor, one row per caption.
    Fitted on these captions alone, with no label."""
    import torch
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts = [normalised_text(text).strip() or "_" for text in captions]
    parts = []
    for options in ({"analyzer": "word", "ngram_range": (1, 2), "token_pattern": r"\S+"},
                    {"analyzer": "char_wb", "ngram_range": (3, 5)}):
        try:
            parts.append(TfidfVectorizer(max_features=MAX_FEATURES, **options).fit_transform(texts))
        except ValueError:  # no term at all (every caption blank)
            continue
    if not parts:
        return torch.zeros((len(texts), 1))
    return torch.from_numpy(np.asarray(hstack(parts).todense(), dtype=np.float32))


def caption_only_scores(table: pd.DataFrame, alone: pd.DataFrame) -> list[float]:
    """`caption_only_top1` of each row of the per-taxa `table`: the `top1_cos` of the same cell
    of `alone`, the table that the nearest-neighbour protocol gives the captions' bag-of-words
    vectors (`caption_vectors`) on the same queries and gallery."""
    by_cell = {(t, lv): value for t, lv, value in zip(alone["taxa"], alone["level"],
                                                       alone["top1_cos"])}
    return [by_cell.get((t, lv), float("nan")) for t, lv in zip(table["taxa"], table["level"])]


def caption_gauge_refusal(table: pd.DataFrame, visual: pd.DataFrame, embedding: str,
                          source: object, levels) -> str | None:
    """Why captions must not enter the queries: the captions alone (`caption_only_top1`) find
    the label of more queries than the images alone (`visual`, the same model's visual table on
    the same rows) at some `All` row of the levels within a taxa; None when they do not.

    "More" means by more than two standard errors of the caption-only accuracy over the row's
    queries (binomial): on a few queries, captions near chance are not refused for beating an
    image figure that is near chance too, while captions that know the label (near 100%, a
    standard error near 0) are refused against any image figure below theirs."""
    for level in levels.within_taxa:
        text, image = _all_cell(table, level, names.CAPTION_ONLY_TOP1), _all_cell(visual, level,
                                                                                   "top1_cos")
        queries = max(_all_cell(table, level, "n_test"), 1.0)
        noise = 2 * np.sqrt(text * (1 - text) / queries) if np.isfinite(text) else 0.0
        if np.isfinite(text) and np.isfinite(image) and text > image + noise:
            return (f"embedding={embedding}: the captions of {source} alone find the {level} of "
                    f"{100 * text:.2f}% of the queries ({names.CAPTION_ONLY_TOP1}, a bag-of-words "
                    f"nearest neighbour with no model), the images alone {100 * image:.2f}% "
                    f"(top1_cos of the visual embedding, same model and rows): the text carries "
                    f"the label, and a query fused with it would score the text. Use "
                    f"embedding=gallery_avg or visual, captions made by `taxonclip caption`, or "
                    f"allow_label_text=true to measure the text itself")
    return None


def _all_cell(table: pd.DataFrame, level: str, column: str) -> float:
    cell = table[(table["taxa"] == names.ALL_TAXA) & (table["level"] == level)]
    return float(cell[column].iloc[0]) if len(cell) and column in cell else float("nan")


def caption_note(manifest: Manifest) -> str:
    """A line on the captions for `data check`: which embeddings they serve."""
    if "caption" not in manifest.table.columns:
        return "captions: none (embedding=visual only)"
    reason = label_revealing_captions(manifest.table)
    if reason is None:
        return "captions: written per image (every embedding may use them)"
    return (f"captions: reveal the label (the caption {reason}): embedding=gallery_avg only; "
            f"text, avg and concat are refused")


def check_decoder(manifest: Manifest, decode: str) -> None:
    """Refuse decode=device for images that are files: it reads prepared shards."""
    if decode == "device" and not manifest.shards:
        raise ConfigError(f"decode=device decodes the JPEGs of prepared shards on the model's "
                          f"device; {manifest.report.source} is image files: prepare it first "
                          f"(taxonclip data prepare ... --out DIR, then data=DIR), or use "
                          f"decode=workers")


def check_has_test_images(manifest: Manifest, split: Split) -> None:
    """Refuse a split that gives the table no test image to score."""
    if len(split.test) == 0 and split.protocol == "official":
        raise DataError(f"{manifest.report.source}: no row of the query partitions "
                        f"({', '.join(QUERY_PARTITIONS)}) in column {PARTITION_COLUMN!r}")
    if len(split.test) == 0:
        grouped = " or one group" if GROUP_COLUMN in manifest.table.columns else ""
        raise DataError(f"{manifest.report.source}: the split has no test image to score: every "
                        f"class of its {len(manifest.table)} rows has a single image{grouped}, "
                        f"and a class needs one image in train and one in test")


def gauges_captions(manifest: Manifest, config: EvalConfig) -> bool:
    """Whether the caption gauge may refuse this evaluation's captions: query-side text, not
    from `taxonclip caption`, and not allowed by `allow_label_text`."""
    return (config.embedding in QUERY_TEXT_EMBEDDINGS and not config.allow_label_text
            and "caption" in manifest.table.columns
            and not made_by_caption_command(manifest.table))
