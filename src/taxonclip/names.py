"""Metric, artifact and tag names, defined once and sanitised for MLflow."""

from __future__ import annotations

import re
from dataclasses import dataclass

TRAIN_LOSS = "train/loss"
TRAIN_LR = "train/lr"
TRAIN_IMG_PER_S = "train/img_per_s"
EVAL_EMBED_IMG_PER_S = "eval/embed_img_per_s"
EVAL_SECONDS = "eval/seconds"
VAL_EMBED_IMG_PER_S = "val/embed_img_per_s"  # a training's per-epoch validation

PER_TAXA_TABLE = "eval/per_taxa.json"
TABLE_CSV = "eval/per_taxa.csv"
TABLE_MARKDOWN = "eval/per_taxa.md"
SPLIT_ARTIFACT = "eval/split.csv"
VAL_TABLE_CSV = "val/per_taxa.csv"  # a training's validation table of its selected epoch
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
TAG_SCORED = "taxonclip.scored"  # which rows a final table scored: queries and gallery
TAG_STORAGE = "taxonclip.storage"
TAG_METRIC = "taxonclip.metric"
TAG_DIRECTION = "taxonclip.direction"
TAG_ERROR = "taxonclip.error"
TAG_RESUMED_INTO = "taxonclip.resumed_into"
TAG_KILLED_REASON = "taxonclip.killed_reason"  # why a run a dead process left RUNNING was ended KILLED
TAG_STOPPED_REASON = "taxonclip.stopped_reason"  # why a resumable run stopped (a full disk)
TAG_HEARTBEAT = "taxonclip.heartbeat"  # a running sweep's last sign of life (UTC, ISO 8601)
TAG_SPLIT_FINGERPRINT = "taxonclip.split_fingerprint"  # sha256 of eval/split.csv (rows, roles)
TAG_ALLOW_LABEL_TEXT = "taxonclip.allow_label_text"  # captions let into queries unchecked
TAG_SELECTED_EPOCH = "taxonclip.selected_epoch"  # the epoch whose weights are a training's model
SHORT_FINGERPRINT = 8  # hex digits of a split fingerprint that tables show
TAG_NOTE = "mlflow.note.content"  # the run's description in the MLflow UI
ERROR_ARTIFACT = "error.txt"

# Columns of the manifest table that one module writes and others read
GROUP_COLUMN = "group"  # a specimen, clip or observation per row: a split keeps each on one side
# a dataset's own partition of each row: BIOSCAN-5M's metadata column, which its reader keeps as
# it is, and TreeOfLife-10M's data and query shards
PARTITION_COLUMN = "split"
SHARD_COLUMN = "shard"  # a sharded table's index into the manifest's shard URLs
KEY_COLUMN = "key"  # a sample's key inside its shard
SOURCE_DIGEST_COLUMN = "source_sha256"  # sha256 of a sharded sample's image bytes

ALL_TAXA = "All"
LEVELS = ("species", "genus", "taxa")  # the levels of a VLM4Bio table (and of any generic manifest)
# BIOSCAN-5M's rank columns, high to low as its metadata orders them
BIOSCAN_RANKS = ("phylum", "class", "order", "family", "subfamily", "genus", "species")
# BIOSCAN-5M's BIN (its dna_bin column): the species proxy of specimens without a species name
BIOSCAN_BIN = "dna_bin"
# TreeOfLife-10M's ranks, high to low as its taxonomic names give them
TREEOFLIFE_RANKS = ("kingdom", "phylum", "class", "order", "family", "genus", "species")
# every level a table can have: the <level> of a metric key and the possible training labels
KNOWN_LEVELS = tuple(dict.fromkeys((*LEVELS, *BIOSCAN_RANKS, BIOSCAN_BIN, *TREEOFLIFE_RANKS)))
COUNT_COLUMNS = ("n_test", "n_classes", "n_lone")  # the per-taxa table's counts; the rest are scores
# micro top-1/3/5 and macro (the mean over classes of each class's accuracy) top-1/5, as CLIBD reports
SCORES = ("top1_cos", "top5_cos", "mean_cos", "top1_l2", "mean_l2", "macro_top1_cos", "map_at_r",
          "top3_cos", "macro_top5_cos")
# zero-shot accuracy by class texts (`eval zero_shot=true`): a column of the table beside SCORES
ZERO_SHOT_SCORES = ("zs_top1", "zs_top5")
# the captions alone, a model-free bag-of-words nearest neighbour (taxonclip.checks): what the
# text of a text-mode evaluation knows of the label, a column of the table beside SCORES
CAPTION_ONLY_TOP1 = "caption_only_top1"
# the prefixes of the metric keys: a run's result on the test split, and a training's per-epoch
# validation (its choices read only these)
EVAL_PREFIX = "eval"
VAL_PREFIX = "val"
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


def val_metric(taxa: str, level: str, metric: str) -> str:
    """The MLflow metric key of one cell of a training's per-epoch validation table, e.g.
    `val/All/species/top1_cos`: the val rows as queries, never the test split."""
    return f"{VAL_PREFIX}/{table_key(taxa, level, metric)}"


def is_table_key(key: object) -> bool:
    """Whether `key` has the form `<taxa>/<level>/<score>` of a per-taxa table cell."""
    parts = key.split("/") if isinstance(key, str) else []
    return (len(parts) == 3 and parts[0].strip() != "" and parts[1] in KNOWN_LEVELS
            and parts[2] in (*SCORES, *ZERO_SHOT_SCORES, CAPTION_ONLY_TOP1))


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
BIOSCAN_LEVELS = Levels(scored=(*BIOSCAN_RANKS, BIOSCAN_BIN),
                        within_taxa=(*BIOSCAN_RANKS[BIOSCAN_RANKS.index("order") + 1:], BIOSCAN_BIN))
# a TreeOfLife-10M table's taxa are its kingdoms, so the per-taxa rows score the ranks below
TREEOFLIFE_LEVELS = Levels(scored=TREEOFLIFE_RANKS, within_taxa=TREEOFLIFE_RANKS[1:])

# the table column of captions read from a `taxonclip caption` file: that row's prompt held a name
CAPTION_SAW_NAME = "caption_saw_name"
# `taxonclip caption`'s artifacts
CAPTION_ARTIFACT_DIR = "caption"
CAPTION_SETTINGS = "caption/settings.json"
CAPTION_SAMPLE = "caption/sample.json"
CAPTION_EMPTY = "caption/empty.csv"
CAPTION_UNDECODABLE = "caption/undecodable.csv"
