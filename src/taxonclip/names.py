"""Metric, artifact and tag names, defined once and sanitised for MLflow."""

from __future__ import annotations

import re

TRAIN_LOSS = "train/loss"
TRAIN_LR = "train/lr"
TRAIN_IMG_PER_S = "train/img_per_s"
EVAL_EMBED_IMG_PER_S = "eval/embed_img_per_s"
EVAL_SECONDS = "eval/seconds"

PER_TAXA_TABLE = "eval/per_taxa.json"
TABLE_CSV = "eval/per_taxa.csv"
TABLE_MARKDOWN = "eval/per_taxa.md"
SPLIT_ARTIFACT = "eval/split.csv"
CHECKPOINT_DIR = "checkpoints"
CENTROIDS = "centroids/centroids.npy"
CENTROID_CLASSES = "centroids/classes.csv"
MODEL_ARTIFACT = "model"

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
TAG_NOTE = "mlflow.note.content"  # the run's description in the MLflow UI
ERROR_ARTIFACT = "error.txt"

ALL_TAXA = "All"
COUNT_COLUMNS = ("n_test", "n_classes", "n_lone")  # the per-taxa table's counts; the rest are scores

_NOT_ALLOWED = re.compile(r"[^A-Za-z0-9_\-. :/]")


def sanitise(part: str) -> str:
    """A string usable inside an MLflow metric key (letters, digits, `_ - . space : /`)."""
    return _NOT_ALLOWED.sub("_", str(part)).strip() or "_"


def table_key(taxa: str, level: str, metric: str) -> str:
    """The name of one cell of the per-taxa table, e.g. `All/species/top1_cos`."""
    return f"{sanitise(taxa).replace('/', '_')}/{level}/{metric}"


def eval_metric(taxa: str, level: str, metric: str) -> str:
    """The MLflow metric key of one table cell, e.g. `eval/All/species/top1_cos`."""
    return f"eval/{table_key(taxa, level, metric)}"
