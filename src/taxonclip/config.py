"""Typed configuration: the one place where loose parameters (CLI flags, MLproject parameters,
sweep suggestions) become dataclasses. Everything below the entry points takes these types."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from collections.abc import Mapping
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

from taxonclip import names
from taxonclip.errors import ConfigError

SYNTHETIC = "synthetic"
# visual: images on both sides; text, avg, concat: each image's caption (alone, averaged with the
# image, or beside it) on both sides; gallery_avg: gallery images averaged with their caption,
# queries visual only (the one fusion that is sound with one caption per species)
EMBEDDINGS = ("visual", "text", "avg", "concat", "gallery_avg")
MISSING_POLICIES = ("error", "skip")
# workers: PIL decodes in the DataLoader workers; device: torchvision decodes on the model's device
# (nvJPEG on CUDA) and transforms there, for prepared shards
DECODERS = ("workers", "device")
# every rank a table can have; which of them a dataset has is checked against its manifest
# (`check_label`), since only the data knows its ranks
# cluster: k-means clusters of the starting model's embeddings (UNICOM's cluster discrimination)
CLUSTER_LABEL = "cluster"
LABELS = (*(level for level in names.KNOWN_LEVELS if level != "taxa"), CLUSTER_LABEL)
# seeded: the seeded stratified split of `splits.split_manifest`; official: the dataset's own
# partitions (a `split` column, as BIOSCAN-5M has; see `splits.official_split`)
SPLITS = ("seeded", "official")
# which epoch's weights a training keeps as its model: the best by the validation metric, or last
SELECTIONS = ("best", "last")
# the dataset formats of data.readers.registry (auto: the first whose reader detects the data);
# names only here, since the registry imports pandas (tests/test_readers.py checks they match)
DATA_FORMATS = ("auto", "prepared", "treeoflife", "bioscan5m", "vlm4bio", "manifest")
# BIOSCAN-5M's image packages, as its owners name them (data.bioscan.IMAGE_PACKAGES)
BIOSCAN_IMAGE_PACKAGES = ("cropped_256", "original_256", "cropped", "original_full")
# TreeOfLife-10M's per-sample texts (data.treeoflife.TEXT_KEYS)
TREEOFLIFE_TEXT_KEYS = ("sci", "com", "taxon", "taxonTag", "sci_com", "taxon_com", "taxonTag_com")
# numpy's legacy seeding (np.random.seed) takes 0 .. 2**32 - 1
MAX_SEED = 2**32 - 1
# The scale s of the margin loss lies in (0, 128]: UNICOM trains with 32, ArcFace with 64; a
# much larger scale saturates the softmax (a one-hot output, no useful gradient), so it is a typo.
MAX_MARGIN_SCALE = 128.0
# Registered model names: MLflow refuses `/` and `:`; our registry queries quote names in filter
# strings ('...'), and `models:/<name>@<alias>` splits a name at `@`.
MODEL_NAME_FORBIDDEN = "/:'\"`@"
MAX_MODEL_NAME = 256  # the registry's name column holds 256 characters


def cache_dir() -> Path:
    """Folder for generated data and cached embeddings: `$TAXONCLIP_CACHE` or ~/.cache/taxonclip."""
    return Path(os.environ.get("TAXONCLIP_CACHE", Path.home() / ".cache" / "taxonclip"))


def _described(default: Any, help: str, choices: tuple[str, ...] = ()) -> Any:
    """A dataclass field with its default and what `taxonclip <command> --help` says of it: one
    line, and the fixed set of values it takes (none where it takes any value of its type)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class DataConfig:
    """Where the images are, how to read the manifest, and how to split it."""

    data: str = _described(
        SYNTHETIC, "the dataset: a VLM4Bio folder, a manifest CSV/parquet (or a folder holding "
                   "one), BIOSCAN-5M (its bioscan5m folder or metadata), a folder of `data "
                   "prepare`, TreeOfLife-10M or prepared WebDataset shards (a path, brace pattern "
                   "or URL), or synthetic (the generated specimens)")
    image_column: str | None = _described(
        None, "manifest column of the image paths (none: the first of fileNameAsDelivered, "
              "image_path, file_name, file_path, image, path)")
    name_column: str | None = _described(
        None, "manifest column of the scientific names (none: scientificName or scientific_name)")
    taxa: str | None = _described(
        None, "one taxa name for every row (none: the manifest's taxa column, else its VLM4Bio "
              "group folder, else the manifest's folder name)")
    caption_column: str | None = _described(
        None, "column of the captions: in the manifest, or in the captions file when captions is "
              "set (none: caption, and in a captions file also description or text)")
    captions: str | None = _described(
        None, "CSV or parquet file of one caption per scientific name (e.g. field-guide "
              "descriptions) for the text embeddings")
    group_column: str | None = _described(
        None, "manifest column of a group id (specimen, clip, observation): every image of a "
              "group lands on the same side of the split")
    missing: str = _described(
        "error", "what a missing or unreadable image does: error stops, listing them; skip "
                 "leaves it out, counted", MISSING_POLICIES)
    test_size: float = _described(
        0.2, "fraction of each species' images held out as test queries, in (0, 1); "
             "split=seeded only")
    seed: int = _described(
        0, f"seed of every random draw: the split, the class subset, weights=none's init, and "
           f"training's data order, augmentation, centre sampling and k-means (0 .. {MAX_SEED})")
    class_fraction: float = _described(
        1.0, "fraction of the classes kept, a seeded subset, in (0, 1]: train learns only them "
             "and the rest are unseen at test time (All:seen, All:unseen rows); eval scores only "
             "them")
    split: str = _described(
        "seeded", "seeded: a seeded train/test split stratified by species; official: the data's "
                  "own partitions (its split column, as BIOSCAN-5M has)", SPLITS)
    val_size: float = _described(
        0.1, "fraction of each species' non-test images held out as validation queries, in "
             "[0, 1): a training's best epoch, pruning and sweep objective score them, and it "
             "never trains on them; eval keeps them in its gallery (its table does not depend "
             "on val_size). split=seeded only; split=official validates on val + val_unseen")
    format: str = _described(
        "auto", "the dataset's format (auto: found from the data)", DATA_FORMATS)
    image_package: str | None = _described(
        None, "BIOSCAN-5M: the image package to read (none: the first present of "
              f"{', '.join(BIOSCAN_IMAGE_PACKAGES)})", BIOSCAN_IMAGE_PACKAGES)
    text_key: str | None = _described(
        None, "TreeOfLife-10M: the per-sample text that becomes each row's caption (zero-shot "
              "adds it to each species' texts)", TREEOFLIFE_TEXT_KEYS)
    queries: str | None = _described(
        None, "TreeOfLife-10M: held-out shards (a path or brace pattern) that are the queries, the "
              "data's shards the gallery; needs split=official (none: a seeded split by shard)")

    def __post_init__(self) -> None:
        _check_choice("missing", self.missing, MISSING_POLICIES)
        _check_choice("split", self.split, SPLITS)
        _check_choice("format", self.format, DATA_FORMATS)
        for name, value, choices in (("image_package", self.image_package, BIOSCAN_IMAGE_PACKAGES),
                                     ("text_key", self.text_key, TREEOFLIFE_TEXT_KEYS)):
            if value is not None:
                _check_choice(name, value, choices)
        if self.queries is not None and self.split != "official":
            raise ConfigError("parameter 'queries' names held-out query shards, which the "
                              "official split scores (gallery: the data's shards); set "
                              "split=official, or leave queries out for a seeded split by shard")
        if self.split == "official" and self.class_fraction < 1.0:
            raise ConfigError("parameters 'split'=official and 'class_fraction' below 1 both "
                              "choose the seen classes (the official partitions hold unseen "
                              "species already); use one of them")
        _check_range("test_size", self.test_size, 0.0, 1.0, low_open=True, high_open=True)
        _check_range("class_fraction", self.class_fraction, 0.0, 1.0, low_open=True)
        _check_range("seed", self.seed, 0, MAX_SEED)
        _check_range("val_size", self.val_size, 0.0, 1.0, high_open=True)


@dataclass(frozen=True)
class ModelConfig:
    """Which backbone: a registry name (`taxonclip models`) or `runs:/`/`models:/` URI, and its weights:
    `pretrained` (the source's own weights), `none` (random init) or a file path."""

    name: str = _described(
        "tiny", "the encoder: a registry name (taxonclip models), open_clip:<architecture>, or a "
                "logged model runs:/<run_id>/model or models:/<name>@<alias>")
    weights: str = _described(
        "pretrained", "pretrained (the published weights; tiny: a fixed init), none (a random init "
                      "drawn from seed), a weights file or checkpoint, a logged model runs:/... of "
                      "the same architecture, or hf-hub:<org>/<name> for open_clip")


@dataclass(frozen=True)
class LossConfig:
    """CombinedMarginLoss and PartialFC: s·(cos(m1·θ+m2) − m3), filter τ, sampled centres."""

    s: float = _described(32.0, f"scale s of the cosine logits, in (0, {MAX_MARGIN_SCALE:g}] "
                                f"(UNICOM: 32, ArcFace: 64)")
    m1: float = _described(1.0, "multiplicative angle margin m1 (only 1 is supported)")
    m2: float = _described(0.3, "ArcFace additive angle margin m2 (radians), in [0, π)")
    m3: float = _described(0.0, "CosFace additive cosine margin m3, at least 0 (not with "
                                "margin_m2)")
    filter: float = _described(0.0, "cosine threshold τ in [0, 1): non-target cosines above it "
                                    "count as 0, without gradient (0: off)")
    sample_rate: float = _described(
        1.0, "PartialFC: fraction of the class centres in each step's softmax, in (0, 1]: every "
             "class of the batch, plus random others up to the fraction (1: all)")

    def __post_init__(self) -> None:
        check_margins(self.s, self.m1, self.m2, self.m3, self.filter)
        check_sample_rate(self.sample_rate)


# what `device` and `decode` mean is the same for eval and train
_DEVICE_HELP = "where the model runs: auto (CUDA where present, else the CPU), cpu, cuda or cuda:N"
_ALLOW_LABEL_TEXT_HELP = (
    "let captions that may carry the label into a query (they name a row's species, genus, "
    "epithet or common name, or score better alone than the images do) into text, avg and "
    "concat; logged as a tag, the numbers then measure the text's knowledge of the label")
_DECODE_HELP = ("where images are decoded: workers (PIL, in the DataLoader workers) or device "
                "(prepared shards' JPEGs on the model's device, nvJPEG on CUDA)")


@dataclass(frozen=True)
class EvalConfig:
    """Nearest-neighbour evaluation of one model on one dataset."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    embedding: str = _described(
        "visual", "what is compared: visual (images), text (captions), avg or concat (image and "
                  "caption fused), gallery_avg (gallery images fused with their caption, queries "
                  "visual)", EMBEDDINGS)
    batch_size: int = _described(256, "images (or captions) embedded per forward pass")
    workers: int = _described(2, "DataLoader worker processes that decode the images (0: the "
                                 "main process)")
    # the one default of knn.knn_metrics's chunk_size: on CPUs, blocks of 512 x some thousand
    # gallery items stay in the processor's cache between the passes over them, and measured
    # faster than larger chunks; on GPUs the time per chunk is small either way
    chunk_size: int = _described(512, "test queries scored against the whole gallery at once "
                                      "(memory and speed, not the metrics)")
    cache_embeddings: bool = _described(
        True, "reuse the embeddings of the same weights, images and captions from "
              "~/.cache/taxonclip/embeddings")
    device: str = _described("auto", _DEVICE_HELP)
    decode: str = _described("workers", _DECODE_HELP, DECODERS)
    zero_shot: bool = _described(
        False, "also score zs_top1 and zs_top5: each test image labelled by the nearest class "
               "text embedding (BioCLIP's protocol; needs a text tower)")
    allow_label_text: bool = _described(
        False, _ALLOW_LABEL_TEXT_HELP)

    def __post_init__(self) -> None:
        _check_choice("embedding", self.embedding, EMBEDDINGS)
        _check_choice("decode", self.decode, DECODERS)
        if self.zero_shot and self.embedding in ("text", "avg", "concat"):
            raise ConfigError(f"zero_shot=true labels visual queries by class texts; "
                              f"embedding={self.embedding} puts text into the queries: use "
                              f"embedding=visual or gallery_avg")
        _check_positive("batch_size", self.batch_size)
        _check_positive("chunk_size", self.chunk_size)
        _check_at_least("workers", self.workers, 0)


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning with the margin loss over PartialFC class centres, then evaluation."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    label: str = _described(
        "species", "the classes trained on: the names at a rank the data has, or cluster (k-means "
                   "clusters of the starting model's embeddings, UNICOM's cluster "
                   "discrimination)", LABELS)
    clusters: float = _described(
        0.1, "label=cluster: how many clusters, a fraction of the species (at most 1) or a count")
    epochs: int = _described(32, "passes over the training images")
    batch_size: int = _described(128, "images per micro-batch per process (also the evaluation's "
                                      "batch)")
    grad_accum: int = _described(1, "micro-batches per optimiser step (a step follows the mean "
                                    "loss of grad_accum x batch_size images)")
    lr: float = _described(1e-5, "peak learning rate of the backbone (AdamW; OneCycleLR warms up "
                                 "to it, then anneals)")
    lr_pfc_weight: float = _described(10.0, "learning-rate multiplier of the PartialFC class "
                                            "centres (their peak rate is lr x lr_pfc_weight)")
    weight_decay: float = _described(0.0, "AdamW's decoupled weight decay, of the backbone and "
                                           "the centres")
    grad_clip: float = _described(0.0, "largest L2 norm of the backbone's gradients; a larger one "
                                       "is scaled down to it (0: no clipping)")
    workers: int = _described(2, "DataLoader worker processes per training process (0: the "
                                 "main process); from shards they also shape the batches")
    eval_every: int = _described(1, "evaluate every this many epochs (and after the last)")
    keep_checkpoints: int = _described(2, "checkpoints of the last epochs kept in the run, besides "
                                          "the best one")
    resume: str | None = _described(None, "run id of an unfinished train run to continue from its "
                                          "last checkpoint, with its own parameters")
    register_as: str | None = _described(None, "register the final model under this name in the "
                                                "MLflow model registry")
    embedding: str = _described(
        "visual", "what each evaluation compares (as eval's embedding; text ones need captions)",
        EMBEDDINGS)
    metric: str = _described(names.HEADLINE_METRIC, "the cell <taxa>/<level>/<score> of the "
                                                    "validation table that picks the best "
                                                    "checkpoint")
    device: str = _described("auto", _DEVICE_HELP)
    compile: bool = _described(False, "compile the encoder with torch.compile: faster steps on a "
                                      "GPU, after a compilation pause")
    decode: str = _described("workers", _DECODE_HELP, DECODERS)
    select: str = _described(
        "best", "which epoch's weights are the run's model, scored once on the test split at the "
                "end: best (the best validation metric) or last", SELECTIONS)
    allow_label_text: bool = _described(False, _ALLOW_LABEL_TEXT_HELP)

    def __post_init__(self) -> None:
        _check_choice("label", self.label, LABELS)
        _check_choice("select", self.select, SELECTIONS)
        if self.select == "best" and self.data.split == "seeded" and self.data.val_size == 0:
            raise ConfigError("parameter 'select'=best picks the epoch by its validation metric, "
                              "and 'val_size' is 0 (no validation rows): give val_size (e.g. "
                              "0.1) or select=last")
        _check_choice("embedding", self.embedding, EMBEDDINGS)
        _check_choice("decode", self.decode, DECODERS)
        _check_finite("clusters", self.clusters, 0.0, inclusive=False)
        if self.clusters > 1 and not float(self.clusters).is_integer():
            raise ConfigError(f"parameter 'clusters' is {self.clusters}: a fraction of the "
                              f"species lies in (0, 1], a count is a whole number")
        check_table_key("metric", self.metric)
        if self.metric.rsplit("/", 1)[-1] in names.ZERO_SHOT_SCORES:
            raise ConfigError(f"parameter 'metric' is {self.metric!r}: training evaluates by nearest "
                              f"neighbours; zero-shot scores come from `eval --zero_shot true`")
        for name in ("epochs", "batch_size", "grad_accum", "eval_every", "keep_checkpoints"):
            _check_positive(name, getattr(self, name))
        _check_at_least("workers", self.workers, 0)
        _check_finite("lr", self.lr, 0.0, inclusive=False)
        _check_finite("lr_pfc_weight", self.lr_pfc_weight, 0.0, inclusive=False)
        _check_finite("weight_decay", self.weight_decay, 0.0)
        _check_finite("grad_clip", self.grad_clip, 0.0)  # 0: no clipping
        if self.register_as is not None:
            check_model_name("register_as", self.register_as)

    def eval_config(self) -> EvalConfig:
        """The evaluation run after each `eval_every` epochs: same data, split and batch size."""
        return EvalConfig(data=self.data, model=self.model, embedding=self.embedding,
                          batch_size=self.batch_size, workers=self.workers, cache_embeddings=False,
                          device=self.device, decode=self.decode,
                          allow_label_text=self.allow_label_text)


@dataclass(frozen=True)
class PrepareConfig:
    """`data prepare`: the source dataset (read and checked as `data check` reads it), the folder
    to write, and how: the short side of the resized images, their format and quality, rows per
    shard, and encoding processes (0: one per core)."""

    data: DataConfig = field(default_factory=DataConfig)
    out: str = _described("", "folder to write: new, empty, or an earlier prepare of the same "
                              "source to finish")
    # the largest input of the registry's models (ViT-L/14@336px)
    size: int = _described(336, "short side in pixels of the written images, or model names whose "
                                "largest input it is (ViT-B/32,ViT-L/14@336px); smaller images "
                                "keep their bytes")
    # the keys of data.prepare.IMAGE_FORMATS, which imports PIL (tests/test_config.py checks them)
    image_format: str = _described("jpeg", "encoding of the resized images", ("jpeg", "webp"))
    quality: int = _described(95, "JPEG or WebP quality of the resized images, 1 to 100")
    shard_size: int = _described(1000, "rows per shard")
    workers: int = _described(0, "encoding processes (0: one per core)")

    def __post_init__(self) -> None:
        _check_at_least("workers", self.workers, 0)


@dataclass(frozen=True)
class SweepConfig:
    """An Optuna study over training parameters, read from a `sweeps/*.yaml` file."""

    sweep: str = _described("sweeps/margin_lr.yaml", "the sweep file: study name, metric, "
                                                     "sampler, pruner, fixed and searched "
                                                     "training parameters")
    n_trials: int = _described(20, "trials this invocation runs (a continued study keeps its "
                                   "earlier ones)")
    timeout: float | None = _described(None, "seconds after which no new trial starts (none: no "
                                             "limit)")
    storage: str | None = _described(
        None, "Optuna storage: sqlite:///FILE, postgresql://USER@HOST/DB, mysql://..., or "
              "journal:FILE (none: optuna.db beside a SQLite MLflow store, else in the working "
              "folder)")
    study_name: str | None = _described(None, "the study to create or continue (none: the sweep "
                                              "file's name)")
    overrides: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_positive("n_trials", self.n_trials)
        if self.timeout is not None:
            _check_finite("timeout", self.timeout, 0.0, inclusive=False)


@dataclass(frozen=True)
class CompareConfig:
    """Which runs to rank, by what, and whether to move the registry aliases."""

    experiments: str | None = _described(None, "MLflow experiments, comma-separated names or ids "
                                               "(none: every active one)")
    filter: str | None = _described(None, "MLflow search filter on the runs, e.g. "
                                          "\"params.model = 'ViT-B/32'\"")
    metric: str = _described(names.HEADLINE_METRIC, "the table cell <taxa>/<level>/<score> that "
                                                    "runs are ranked by, higher first")
    tie_break: str = _described(names.TIE_BREAK_METRIC, "the table cell that breaks ties of metric "
                                                        "(then the newer run wins)")
    top: int = _described(10, "runs shown in the leaderboard and the plots")
    promote: bool = _described(False, "move the registry alias champion to the best run's model "
                                      "version, challenger to the runner-up")
    out: str = _described("reports/compare", "folder of the report (CSV, Markdown, HTML, plots)")

    def __post_init__(self) -> None:
        check_table_key("metric", self.metric)
        check_table_key("tie_break", self.tie_break)
        _check_positive("top", self.top)


# none: no prompt holds a rank name; gallery: a template's rank names fill the prompts of rows that
# are never queries under the split eval and train use (taxonclip.captions.templates)
NAME_IN_PROMPT = ("none", "gallery")
# auto: bfloat16 on CUDA, float32 on the CPU
CAPTION_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class CaptionConfig:
    """`taxonclip caption`: one caption per image of `data` from an image-text-to-text model,
    written as part files under `out` and merged into `out/captions.parquet`."""

    data: DataConfig = field(default_factory=DataConfig)
    out: str | None = _described(
        None, "folder of the captions: part files in parts/, merged into captions.parquet "
              "(required; a rerun into it with the same settings captions only what is missing)")
    model: str = _described(
        "tiny", "the captioner: tiny (a tiny random model built in code: nonsense captions, for "
                "trying the command), or an image-text-to-text model: a local folder, or a "
                "Hugging Face id found in $HF_HUB_CACHE (transformers:<folder or id> says so "
                "explicitly)")
    template: str = _described(
        "describe", "the prompt: a template's name in the templates file")
    templates: str | None = _described(
        None, "YAML file of named prompt templates (none: the shipped captions/templates.yaml)")
    name_in_prompt: str = _described(
        "none", "none: no prompt holds a name; gallery: a template's {scientific_name} (or any "
                "rank) is filled only for rows that are never queries under the split (seed, "
                "test_size, split, group_column) that eval and train use", NAME_IN_PROMPT)
    trust_remote_code: bool = _described(
        False, "let transformers run the model folder's own Python code (models not native to "
               "transformers, such as InternVL2); only for code you trust")
    batch_size: int = _described(16, "images captioned per generate call")
    max_new_tokens: int = _described(100, "longest caption in tokens (greedy decoding)")
    part_size: int = _described(256, "captions per part file: a kill loses at most one part")
    workers: int = _described(2, "DataLoader worker processes that decode the images (0: the "
                                 "main process)")
    dtype: str = _described("auto", "the model's weights and compute: auto is bfloat16 on CUDA, "
                                    "float32 on the CPU", CAPTION_DTYPES)
    device: str = _described("auto", _DEVICE_HELP)
    progress_every: int = _described(10, "off a terminal, one progress line every this many "
                                         "batches")
    merge_only: bool = _described(
        False, "caption nothing: merge the part files of every share into captions.parquet (the "
               "last step of a SLURM array) and log the run")

    def __post_init__(self) -> None:
        _check_choice("name_in_prompt", self.name_in_prompt, NAME_IN_PROMPT)
        _check_choice("dtype", self.dtype, CAPTION_DTYPES)
        if not self.model.strip():
            raise ConfigError("parameter 'model' needs a value: tiny, or a model folder or id")
        for name in ("batch_size", "max_new_tokens", "part_size", "progress_every"):
            _check_positive(name, getattr(self, name))
        _check_at_least("workers", self.workers, 0)

    def out_folder(self) -> Path:
        """The output folder; a job cannot run without one (a default has none, for --help)."""
        if self.out is None or not self.out.strip():
            raise ConfigError("parameter 'out' is required: the folder that will hold "
                              "captions.parquet and its parts/")
        return Path(self.out).expanduser().resolve()


def flat_fields(config: Any, prefix: str = "") -> dict[str, Any]:
    """The config as a flat dict `{"data.seed": 0, ...}` (nested dataclasses joined by dots)."""
    flat: dict[str, Any] = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            flat.update(flat_fields(value, f"{prefix}{f.name}."))
        else:
            flat[f"{prefix}{f.name}"] = value
    return flat


def description(cls: type, path: str) -> tuple[str, tuple[str, ...]]:
    """The one-line description of the field at the dotted `path` of `cls` (`loss.m2`: field m2
    of `cls.loss`) and its fixed set of values, as `_described` declares them ("" and () for a
    field declared without)."""
    owner, leaf = _owner(cls, path)
    metadata = next(f for f in fields(owner) if f.name == leaf).metadata
    return metadata.get("help", ""), metadata.get("choices", ())


def field_type(cls: type, path: str) -> type:
    """The declared type of the field at the dotted `path` of `cls`, without Optional."""
    owner, leaf = _owner(cls, path)
    return _without_none(get_type_hints(owner)[leaf])[0]


def _owner(cls: type, path: str) -> tuple[type, str]:
    """The dataclass that holds the field at the dotted `path` of `cls`, and the field's name."""
    *parents, leaf = path.split(".")
    for parent in parents:
        cls = get_type_hints(cls)[parent]
    return cls, leaf


def _without_none(hint: Any) -> tuple[Any, bool]:
    """The type of a hint without Optional (`int | None` -> int), and whether it was optional;
    the configs' unions are all `T | None`."""
    if get_origin(hint) not in (Union, UnionType):
        return hint, False
    return next(arg for arg in get_args(hint) if arg is not type(None)), True


def coerce(cls: type, name: str, raw: Any) -> Any:
    """Turn the string `raw` into the declared type of field `name` of dataclass `cls`
    ("none" or "" gives None where the field is optional)."""
    hints = get_type_hints(cls)
    if name not in hints:
        raise ConfigError(f"unknown parameter {name!r} for {cls.__name__}")
    base, optional = _without_none(hints[name])
    unset = raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "none", "null"))
    if unset and optional:
        return None
    if unset and (raw is None or base is not str or not raw.strip()):
        raise ConfigError(f"parameter {name!r} needs a value")
    if base not in (bool, int, float):
        return raw
    # A sweep file gives YAML values (16.5 for an int field, true for a float one): spelled out,
    # they go through the same parsing as a command line, so 16.0 is 16 and 16.5 is refused.
    raw = raw if isinstance(raw, str) else str(raw)
    try:
        if base is bool:
            return _parse_bool(raw)
        if base is int:
            return int(float(raw)) if float(raw).is_integer() else int(raw)
        return float(raw)
    except ValueError:
        kind = {bool: "true or false", int: "an integer", float: "a number"}[base]
        raise ConfigError(f"parameter {name!r}: {raw!r} is not {kind}") from None


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError(raw)


def check_margins(s: float, m1: float, m2: float, m3: float, filter: float) -> None:
    """The margin loss parameters CombinedMarginLoss supports: s in (0, MAX_MARGIN_SCALE], m1 = 1,
    ArcFace m2 in [0, π) or CosFace m3 >= 0 and finite (not both), filter in [0, 1)."""
    if not 0 < s <= MAX_MARGIN_SCALE:
        raise ConfigError(f"parameter 'margin_s' (the loss's scale 's') must be in (0, "
                          f"{MAX_MARGIN_SCALE:g}], got {s}")
    if m1 != 1.0:
        raise ConfigError(f"parameter 'margin_m1'={m1} is not supported: use margin_m1=1 with "
                          "margin_m2 (ArcFace) or margin_m3 (CosFace)")
    if not 0 <= m2 < math.pi:
        raise ConfigError(f"parameter 'margin_m2' (ArcFace angle margin) must be in [0, π), "
                          f"got {m2}")
    if not (m3 >= 0 and math.isfinite(m3)):
        raise ConfigError(f"parameter 'margin_m3' (CosFace margin) must be a finite number at "
                          f"least 0, got {m3}")
    if m2 > 0 and m3 > 0:
        raise ConfigError(f"parameters 'margin_m2'={m2} and 'margin_m3'={m3} cannot both be "
                          "set: choose ArcFace (margin_m2) or CosFace (margin_m3)")
    if not 0 <= filter < 1:
        raise ConfigError(f"parameter 'margin_filter' (cosine threshold) must be in [0, 1), "
                          f"got {filter}")


def check_sample_rate(sample_rate: float) -> None:
    """PartialFC's fraction of the class centres in each step's softmax: in (0, 1]."""
    _check_range("sample_rate", sample_rate, 0.0, 1.0, low_open=True)


def check_label(label: str, levels: names.Levels, source: object) -> None:
    """Raise ConfigError unless the data read from `source` has the rank `label` to train on."""
    if label not in (*levels.labels, CLUSTER_LABEL):
        raise ConfigError(f"parameter 'label' is {label!r}, but {source} has the ranks "
                          f"{', '.join(levels.labels)}; choose one of them (or cluster)")


def check_table_key(name: str, key: str) -> None:
    """Raise ConfigError unless `key` names a per-taxa table cell `<taxa>/<level>/<score>`."""
    if not names.is_table_key(key):
        raise ConfigError(f"parameter {name!r} is {key!r}; use <taxa>/<level>/<score> with <level> "
                          f"one of {', '.join(names.KNOWN_LEVELS)} and <score> one of "
                          f"{', '.join((*names.SCORES, *names.ZERO_SHOT_SCORES))}, e.g. "
                          f"{names.HEADLINE_METRIC}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"parameter {name!r} is {value!r}; choose one of {', '.join(choices)}")


def check_model_name(name: str, value: str) -> None:
    """Raise ConfigError unless `value` can name a registered model: not blank, at most
    MAX_MODEL_NAME characters, none of MODEL_NAME_FORBIDDEN, and not `.` nor starting with `..`
    (MLflow treats a name as a path, and refuses one that would resolve to another)."""
    bad = sorted(set(value) & set(MODEL_NAME_FORBIDDEN))
    if not value.strip() or value == "." or value.startswith(".."):
        problem = "is blank or only dots" if not value.strip(". ") else "starts with '..'"
    elif bad:
        problem = f"holds {' '.join(bad)}, which the model registry cannot take"
    elif len(value) > MAX_MODEL_NAME:
        problem = f"is {len(value)} characters long (at most {MAX_MODEL_NAME})"
    else:
        return
    raise ConfigError(f"parameter {name!r} is {value!r}: a registered model name that {problem}; "
                      f"use letters, digits, spaces, '-', '_' and '.'")


def _check_positive(name: str, value: int) -> None:
    _check_at_least(name, value, 1)


def _check_at_least(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ConfigError(f"parameter {name!r} must be at least {minimum}, got {value}")


def _check_finite(name: str, value: float, minimum: float, inclusive: bool = True) -> None:
    """Refuse nan, an infinity, and a value below `minimum` (or at it, unless `inclusive`)."""
    above = value >= minimum if inclusive else value > minimum
    if not (math.isfinite(value) and above):
        bound = f"at least {minimum:g}" if inclusive else f"above {minimum:g}"
        raise ConfigError(f"parameter {name!r} must be a finite number {bound}, got {value}")


def _check_range(name: str, value: float, low: float, high: float,
                 low_open: bool = False, high_open: bool = False) -> None:
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if math.isnan(value) or too_low or too_high:  # nan compares false with every bound
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ConfigError(f"parameter {name!r} must be in {lo}{low}, {high}{hi}, got {value}")


# Entry-point parameter name -> dotted field path. The names are those of the MLproject entry
# points and the `taxonclip` commands; the paths say where each lands in the typed config.
DATA_PARAMS = {
    "data": "data.data", "seed": "data.seed", "test_size": "data.test_size",
    "class_fraction": "data.class_fraction", "missing": "data.missing",
    "image_column": "data.image_column", "name_column": "data.name_column",
    "taxa": "data.taxa", "caption_column": "data.caption_column", "captions": "data.captions",
    "group_column": "data.group_column", "split": "data.split", "val_size": "data.val_size",
    "format": "data.format", "image_package": "data.image_package", "text_key": "data.text_key",
    "queries": "data.queries",
}
EVAL_PARAMS = {
    "model": "model.name", "weights": "model.weights", **DATA_PARAMS,
    "embedding": "embedding", "batch_size": "batch_size", "workers": "workers",
    "chunk_size": "chunk_size", "device": "device", "decode": "decode", "zero_shot": "zero_shot",
    "allow_label_text": "allow_label_text",
}
TRAIN_PARAMS = {
    "model": "model.name", "weights": "model.weights", **DATA_PARAMS,
    "label": "label", "clusters": "clusters", "epochs": "epochs", "batch_size": "batch_size",
    "grad_accum": "grad_accum",
    "lr": "lr", "lr_pfc_weight": "lr_pfc_weight", "weight_decay": "weight_decay",
    "grad_clip": "grad_clip", "margin_s": "loss.s", "margin_m1": "loss.m1", "margin_m2": "loss.m2",
    "margin_m3": "loss.m3", "margin_filter": "loss.filter", "sample_rate": "loss.sample_rate",
    "workers": "workers", "eval_every": "eval_every", "keep_checkpoints": "keep_checkpoints",
    "resume": "resume", "register_as": "register_as", "embedding": "embedding",
    "metric": "metric", "device": "device", "compile": "compile", "decode": "decode",
    "select": "select", "allow_label_text": "allow_label_text",
}


# prepare reads its source as `data check` does, but splits nothing
PREPARE_PARAMS = {
    **{name: path for name, path in DATA_PARAMS.items()
       if name not in ("seed", "test_size", "class_fraction", "split", "val_size")},
    "size": "size", "format": "image_format", "quality": "quality",
    "shard_size": "shard_size", "workers": "workers",
}
# caption reads the data as eval does; its own captions are what it writes, so none are read
CAPTION_PARAMS = {
    **{name: path for name, path in DATA_PARAMS.items() if name not in ("captions",
                                                                        "caption_column")},
    **{name: name for name in ("out", "model", "template", "templates", "name_in_prompt",
                               "trust_remote_code", "batch_size", "max_new_tokens", "part_size",
                               "workers", "dtype", "device", "progress_every", "merge_only")},
}
SWEEP_PARAMS = {name: name for name in ("sweep", "n_trials", "timeout", "storage", "study_name")}
COMPARE_PARAMS = {name: name for name in ("experiments", "filter", "metric", "tie_break", "top",
                                          "promote", "out")}


def from_params(cls: type, params: Mapping[str, Any], mapping: Mapping[str, str]) -> Any:
    """Build dataclass `cls` from entry-point parameters (strings or values) named as in `mapping`.

    Unknown names raise ConfigError naming them; absent names keep the dataclass defaults.
    """
    unknown = sorted(set(params) - set(mapping))
    if unknown:
        raise ConfigError(f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(mapping)}")
    nested: dict[str, Any] = {}
    for name, value in params.items():
        *parents, leaf = mapping[name].split(".")
        target = nested
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return _build(cls, nested)


def _build(cls: type, values: Mapping[str, Any]) -> Any:
    hints = get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        if isinstance(value, dict) and dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], value)
        else:
            kwargs[name] = coerce(cls, name, value)
    return cls(**kwargs)


def to_params(config: Any, mapping: Mapping[str, str]) -> dict[str, Any]:
    """The entry-point parameters of a config: the inverse of `from_params`."""
    flat = flat_fields(config)
    return {name: flat[path] for name, path in mapping.items()}


# Launchers: where a command runs (see taxonclip.launch). local: in this process, as always.
LAUNCHER_NAMES = ("local", "slurm")
# SLURM's time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
_SLURM_TIME = r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}"
_SLURM_MEM = r"\d+[KMGT]?"


@dataclass(frozen=True)
class SlurmOptions:
    """What a SLURM job asks for: given as `--slurm key=value` pairs or a profile file (lines of
    the same `key=value`); none leaves a key to the cluster's default."""

    partition: str | None = _described(None, "the partition (queue) to run in")
    time: str | None = _described(None, "time limit: minutes, HH:MM:SS or D-HH:MM:SS")
    nodes: int = _described(1, "nodes of a train job (one torchrun per node); other commands "
                               "run on one")
    gpus_per_node: int = _described(0, "GPUs per node; train starts one process per GPU (0: one "
                                       "process per node, on the CPU)")
    cpus_per_task: int | None = _described(None, "CPU cores of each task")
    mem: str | None = _described(None, "memory per node: 64G, 500M")
    account: str | None = _described(None, "the account charged")
    qos: str | None = _described(None, "the quality of service")
    constraint: str | None = _described(None, "node features the job needs: a100|h100")
    signal_s: int = _described(300, "seconds before the time limit at which SLURM signals a "
                                    "train job to requeue itself")
    logs: str = _described("slurm-logs", "folder of the job scripts and logs, on a filesystem "
                                         "the nodes share")
    rdzv_port: int = _described(29400, "TCP port of the c10d rendezvous on a train job's first node")

    def __post_init__(self) -> None:
        import re

        for name in ("partition", "account", "qos", "constraint"):
            value = getattr(self, name)
            if value is not None and (not value.strip() or any(c.isspace() for c in value)):
                raise ConfigError(f"SLURM option {name!r} is {value!r}: give one word")
        if self.time is not None and not re.fullmatch(_SLURM_TIME, self.time):
            raise ConfigError(f"SLURM option 'time' is {self.time!r}; write minutes, HH:MM:SS or "
                              f"D-HH:MM:SS")
        if self.mem is not None and not re.fullmatch(_SLURM_MEM, self.mem):
            raise ConfigError(f"SLURM option 'mem' is {self.mem!r}; write 64G or 500M")
        _check_positive("nodes", self.nodes)
        _check_at_least("gpus_per_node", self.gpus_per_node, 0)
        if self.cpus_per_task is not None:
            _check_positive("cpus_per_task", self.cpus_per_task)
        _check_at_least("signal_s", self.signal_s, 0)
        _check_range("rdzv_port", self.rdzv_port, 1, 65535)


@dataclass(frozen=True)
class LaunchConfig:
    """Where a command runs, and for SLURM what its job asks for."""

    launcher: str = _described("local", "where the command runs: local (here) or slurm (a batch "
                                         "job, submitted with sbatch)", LAUNCHER_NAMES)
    slurm: SlurmOptions = field(default_factory=SlurmOptions)
    wait: bool = _described(False, "follow the job to its end and exit with its status")
    workers: int = _described(1, "array tasks, each running the command (a sweep's workers, a "
                                 "caption job's shares)")

    def __post_init__(self) -> None:
        _check_choice("launcher", self.launcher, LAUNCHER_NAMES)
        _check_positive("workers", self.workers)


SLURM_OPTION_NAMES = tuple(f.name for f in fields(SlurmOptions))


def slurm_options(pairs: list[str], profile: str | None = None) -> SlurmOptions:
    """SlurmOptions from a profile file (lines of `key=value`, `#` comments) overridden by `--slurm
    key=value` pairs; an unknown key or a malformed pair is refused, naming it and its file."""
    values: dict[str, str] = {}
    lines = [(pair, "--slurm") for pair in pairs]
    if profile:
        lines = [*_profile_lines(Path(profile)), *lines]
    for pair, where in lines:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{where}: {pair!r} is not KEY=VALUE (keys: "
                              f"{', '.join(SLURM_OPTION_NAMES)})")
        key = key.strip().replace("-", "_")
        if key not in SLURM_OPTION_NAMES:
            raise ConfigError(f"{where}: unknown SLURM option {key!r}; known: "
                              f"{', '.join(SLURM_OPTION_NAMES)}")
        values[key] = value.strip()
    return SlurmOptions(**{k: coerce(SlurmOptions, k, v) for k, v in values.items()})


def _profile_lines(path: Path) -> list[tuple[str, str]]:
    """The `key=value` lines of a SLURM profile, each with where it stands (file:line)."""
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"SLURM profile {path}: {err.strerror}") from None
    return [(line.split("#", 1)[0].strip(), f"{path}:{number}")
            for number, line in enumerate(text.splitlines(), 1)
            if line.split("#", 1)[0].strip()]
