"""Zero-shot classification by class texts (CLIP's and BioCLIP's protocol): each class of a level
is the mean of the normalised text embeddings of its templated names, and each test image is
labelled by the class whose prototype is nearest to its visual embedding.

A class's texts at a level are "a photo of {name}." and, below the taxa level, "a photo of
{taxa} {name}."; at species level also "a photo of {common name}." where the data has one
common name per species (a `commonName` column, as the Leeds butterflies have), and the species'
caption where the captions are one text per species (`captions=`). The candidates of a table row
are the classes of its scope: those of its taxa for a per-taxa row, every class of the level for
the `All` rows. The texts of every class are kept, so the record says what the numbers mean.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from taxonclip import names
from taxonclip.config import EvalConfig
from taxonclip.data.splits import Split
from taxonclip.embed import embed_texts
from taxonclip.errors import ModelError
from taxonclip.names import Levels
from taxonclip.table import Seen, scope_masks

NAME_TEMPLATE = "a photo of {name}."
TAXA_TEMPLATE = "a photo of {taxa} {name}."
COMMON_NAME_COLUMNS = ("commonName", "common_name", "vernacularName", "vernacular_name")
TOP_K = 5


def class_texts(table: pd.DataFrame, level: str) -> dict[str, list[str]]:
    """Each class of `level` in `table` and its texts (see the module docstring)."""
    rows = table[table[level].notna()]
    taxa = rows.groupby(level)["taxa"].first()
    common = _one_per_class(rows, level, next((c for c in COMMON_NAME_COLUMNS if c in rows), None))
    captions = _one_per_class(rows, level, "caption" if "caption" in rows else None)
    texts = {}
    for name in sorted(taxa.index):
        own = [NAME_TEMPLATE.format(name=name)]
        if level != "taxa":
            own.append(TAXA_TEMPLATE.format(taxa=taxa[name], name=name))
        if level == "species" and name in common:
            own.append(NAME_TEMPLATE.format(name=common[name]))
        if level == "species" and name in captions:
            own.append(captions[name])
        texts[name] = own
    return texts


def _one_per_class(rows: pd.DataFrame, level: str, column: str | None) -> dict[str, str]:
    """The value of `column` for each class that has exactly one (blank values aside)."""
    if column is None:
        return {}
    values = rows[[level, column]].dropna()
    values = values[values[column].astype(str).str.strip() != ""]
    single = values.groupby(level)[column].nunique() == 1
    return values.drop_duplicates(level).set_index(level)[column][single].astype(str).to_dict()


def prototypes(text_embeddings: torch.Tensor, owners: np.ndarray, classes: int) -> torch.Tensor:
    """Per class, the normalised mean of its normalised text embeddings (`owners`: the class of
    each text)."""
    unit = F.normalize(text_embeddings.float(), dim=1)
    owner_ids = torch.tensor(owners, dtype=torch.int64)  # a copy: pandas' arrays are read-only
    sums = unit.new_zeros(classes, unit.shape[1]).index_add_(0, owner_ids, unit)
    return F.normalize(sums, dim=1)


def zero_shot_hits(queries: torch.Tensor, labels: torch.Tensor, class_prototypes: torch.Tensor,
                   candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether each query's class is the nearest candidate prototype by cosine (top-1), and among
    the `TOP_K` nearest (top-5); `labels` and `candidates` index the rows of `class_prototypes`.
    Ties go to the lower class index."""
    similarity = F.normalize(queries.float(), dim=1) @ class_prototypes[candidates].T
    k = min(TOP_K, len(candidates))
    # a stable sort, so that equal similarities rank by class index as documented
    order = similarity.sort(dim=1, descending=True, stable=True).indices[:, :k]
    ranked = candidates[order]
    hits = ranked == labels[:, None]
    return hits[:, 0], hits.any(dim=1)


def check_zero_shot(encoder: torch.nn.Module, config: EvalConfig) -> None:
    """Refuse zero-shot scoring with a model that has no text tower."""
    if config.zero_shot and not encoder.has_text:
        raise ModelError(f"zero_shot=true needs class texts embedded by a text tower, and model "
                         f"{encoder.spec.name} has none (UNICOM models are image encoders only); "
                         f"use a CLIP model or leave zero_shot out")


def zero_shot_texts(table: pd.DataFrame, levels: Levels) -> pd.DataFrame:
    """Every class of every scored level and its texts: columns level, class, text."""
    rows = [(level, name, text) for level in levels.scored
            for name, texts in class_texts(table, level).items() for text in texts]
    return pd.DataFrame(rows, columns=["level", "class", "text"])


def level_prototypes(encoder, texts: pd.DataFrame, batch_size: int,
                     device: torch.device) -> dict[str, tuple[torch.Tensor, dict[str, int]]]:
    """Per level: the prototype of each class (rows in class order) and each class's row."""
    embedded = embed_texts(encoder, texts["text"].tolist(), batch_size=batch_size, device=device)
    by_level = {}
    for level, group in texts.groupby("level", sort=False):
        index = {name: i for i, name in enumerate(dict.fromkeys(group["class"]))}
        owners = group["class"].map(index).to_numpy()
        # copied: pandas hands out read-only arrays, which torch warns about when it wraps them
        rows = torch.tensor(group.index.to_numpy())
        by_level[level] = (prototypes(embedded[rows], owners, len(index)), index)
    return by_level


def zero_shot_table(table: pd.DataFrame, queries: torch.Tensor, rows: pd.DataFrame, split: Split,
                    prototypes: dict, seen: Seen | None) -> pd.DataFrame:
    """The per-taxa `table` with `zs_top1` and `zs_top5`: the test images of each row's scope
    labelled by the nearest class text among the classes of that scope."""
    is_test = np.zeros(len(rows), bool)
    is_test[split.test] = True
    is_seen = None if seen is None else rows[seen.level].isin(seen.classes).to_numpy()
    scores = []
    for scope, level in zip(table["taxa"], table["level"]):
        class_prototypes, index = prototypes[level]
        in_scope, query_scope = scope_masks(scope, rows, is_seen)
        labelled = rows[level].notna().to_numpy()
        picked = np.flatnonzero(query_scope & is_test & labelled)
        candidates = torch.tensor(sorted(index[name] for name in rows[level][in_scope & labelled].unique()))
        labels = torch.tensor([index[name] for name in rows[level].iloc[picked]], dtype=torch.long)
        top1, top5 = zero_shot_hits(queries[picked], labels, class_prototypes, candidates)
        scores.append((_mean_hit(top1), _mean_hit(top5)))
    return table.assign(**dict(zip(names.ZERO_SHOT_SCORES, map(list, zip(*scores)))))


def _mean_hit(hits: torch.Tensor) -> float:
    return float(hits.double().mean()) if len(hits) else float("nan")
