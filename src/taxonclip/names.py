"""Metric, artifact and tag names, defined once and sanitised for MLflow."""

from __future__ import annotations

import re
from dataclasses import dataclass

TRAIN_LOSS = "train/loss"
TRAIN_LR = "train/lr"
TRAIN_IMG_PER_S = "train/img_per_s"
EVAL_EMBED_IMG_PER_S = "eval/embed_img_per_s"
EVAL_SECONDS = "eval/seconds"

PER_TAXA_TABLE = "eval/per_taxa.json"
TABLE_CSV = "eval/per_taxa.csv"
TABLE_MARKDOWN = "eval/per_taxa.md"
SPLIT_ARTIFACT = "eval/split.csv"
ZERO_SHOT_TEXTS = "eval/zero_shot_texts.csv"  # each level's classes and the texts of their prototypes
DATA_SUMMARY = "data/summary.txt"
CHECKPOINT_DIR = "checkpoints"
CENTROIDS = "centroids/centroids.npy"
CENTROID_CLASSES = "centroids/classes.csv"
MODEL_ARTIFACT = "model"

CLUSTER_COUNT = "clusters/count"  # label=cluster: the k of the k-means
CLUSTER_KMEANS_SECONDS = "clusters/kmeans_seconds"
CLUSTER_ASSIGNMENT = "clusters/assignment.csv"  # each training image's cluster


def cluster_purity(score: str, level: str) -> str:
    """The metric of the clusters' agreement with a rank: `clusters/nmi_species`, `clusters/ari_genus`."""
    return f"clusters/{score}_{level}"


TAG_ENTRY = "taxonclip.entry"
TAG_TRIAL = "taxonclip.trial"
TAG_STUDY = "taxonclip.study"
TAG_BEST_CHILD = "taxonclip.best_run_id"
TAG_EMBEDDINGS = "taxonclip.embeddings"
TAG_STORAGE = "taxonclip.storage"
TAG_METRIC = "taxonclip.metric"
TAG_DIRECTION = "taxonclip.direction"
TAG_ERROR = "taxonclip.error"
TAG_RESUMED_INTO = "taxonclip.resumed_into"
TAG_KILLED_REASON = "taxonclip.killed_reason"  # why a run a dead process left RUNNING was ended KILLED
TAG_HEARTBEAT = "taxonclip.heartbeat"  # a running sweep's last sign of life (UTC, ISO 8601)
TAG_NOTE = "mlflow.note.content"  # the run's description in the MLflow UI
ERROR_ARTIFACT = "error.txt"

ALL_TAXA = "All"
LEVELS = ("species", "genus", "taxa")  # the levels of a VLM4Bio table (and of any generic manifest)
# BIOSCAN-5M's rank columns, high to low as its metadata orders them
BIOSCAN_RANKS = ("phylum", "class", "order", "family", "subfamily", "genus", "species")
# every level a table can have: the <level> of a metric key and the possible training labels
KNOWN_LEVELS = (*LEVELS, *(rank for rank in BIOSCAN_RANKS if rank not in LEVELS))
COUNT_COLUMNS = ("n_test", "n_classes", "n_lone")  # the per-taxa table's counts; the rest are scores
SCORES = ("top1_cos", "top5_cos", "mean_cos", "top1_l2", "mean_l2", "macro_top1_cos", "map_at_r")
# zero-shot accuracy by class texts (`eval zero_shot=true`): a column of the table beside SCORES
ZERO_SHOT_SCORES = ("zs_top1", "zs_top5")
# The cell that picks the best checkpoint, that sweeps optimise and that compare ranks by, unless
# a run names another; and the cell that breaks compare's ties.
HEADLINE_METRIC = f"{ALL_TAXA}/species/top1_cos"
TIE_BREAK_METRIC = f"{ALL_TAXA}/species/mean_cos"

_NOT_ALLOWED = re.compile(r"[^A-Za-z0-9_\-. :/]")


def sanitise(part: str) -> str:
    """A string usable inside an MLflow metric key (letters, digits, `_ - . space : /`)."""
    return _NOT_ALLOWED.sub("_", str(part)).strip() or "_"


def taxa_key(taxa: str) -> str:
    """How a taxa is spelled inside metric keys: sanitised, without `/`."""
    return sanitise(taxa).replace("/", "_")


def table_key(taxa: str, level: str, metric: str) -> str:
    """The name of one cell of the per-taxa table, e.g. `All/species/top1_cos`."""
    return f"{taxa_key(taxa)}/{level}/{metric}"


def eval_metric(taxa: str, level: str, metric: str) -> str:
    """The MLflow metric key of one table cell, e.g. `eval/All/species/top1_cos`."""
    return f"eval/{table_key(taxa, level, metric)}"


def is_table_key(key: object) -> bool:
    """Whether `key` has the form `<taxa>/<level>/<score>` of a per-taxa table cell."""
    parts = key.split("/") if isinstance(key, str) else []
    return (len(parts) == 3 and parts[0].strip() != "" and parts[1] in KNOWN_LEVELS
            and parts[2] in (*SCORES, *ZERO_SHOT_SCORES))


@dataclass(frozen=True)
class Levels:
    """The levels of one table, the one source of what it scores and trains on: `scored`, in
    the table's order, are its rows for `All` (each a column of the table); `within_taxa` are the
    finer ones, scored per taxa and for `All:seen`/`All:unseen`; `labels` are those `label=` may
    train on (every rank; not the `taxa` column, which is no rank)."""

    scored: tuple[str, ...]
    within_taxa: tuple[str, ...]

    @property
    def labels(self) -> tuple[str, ...]:
        """The levels a model can be trained to tell apart."""
        return tuple(level for level in self.scored if level != "taxa")


VLM4BIO_LEVELS = Levels(scored=LEVELS, within_taxa=("species", "genus"))
# a BIOSCAN-5M table's taxa are its orders, so the per-taxa rows score the ranks below order
BIOSCAN_LEVELS = Levels(scored=BIOSCAN_RANKS,
                        within_taxa=BIOSCAN_RANKS[BIOSCAN_RANKS.index("order") + 1:])

# `taxonclip caption`'s artifacts
CAPTION_ARTIFACT_DIR = "caption"
CAPTION_SETTINGS = "caption/settings.json"
CAPTION_SAMPLE = "caption/sample.json"
CAPTION_EMPTY = "caption/empty.csv"
CAPTION_UNDECODABLE = "caption/undecodable.csv"
