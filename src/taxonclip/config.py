"""Typed configuration: the dataclasses that loose parameters (CLI flags, MLproject parameters,
sweep suggestions) become, through `taxonclip.params`, with each field's default and help.
Everything below the entry points takes these types; they check their values as they are built
(`taxonclip.config_checks`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from taxonclip import names
from taxonclip.config_checks import (MAX_MARGIN_SCALE, check_at_least, check_choice, check_finite,
                                     check_margins, check_model_name, check_positive, check_range,
                                     check_sample_rate, check_table_key)
from taxonclip.errors import ConfigError
from taxonclip.params import described

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
# the encodings `data prepare` writes resized images in (the keys of data.prepare.IMAGE_FORMATS,
# which imports PIL; tests/test_config.py checks they match)
PREPARED_IMAGE_FORMATS = ("jpeg", "webp")
# numpy's legacy seeding (np.random.seed) takes 0 .. 2**32 - 1
MAX_SEED = 2**32 - 1


def cache_dir() -> Path:
    """Folder for generated data and cached embeddings: `$TAXONCLIP_CACHE` or ~/.cache/taxonclip."""
    return Path(os.environ.get("TAXONCLIP_CACHE", Path.home() / ".cache" / "taxonclip"))


@dataclass(frozen=True)
class DataConfig:
    """Where the images are, how to read the manifest, and how to split it."""

    data: str = described(
        SYNTHETIC, "the dataset: a VLM4Bio folder, a manifest CSV/parquet (or a folder holding "
                   "one), BIOSCAN-5M (its bioscan5m folder or metadata), a folder of `data "
                   "prepare`, TreeOfLife-10M or prepared WebDataset shards (a path, brace pattern "
                   "or URL), or synthetic (the generated specimens)")
    image_column: str | None = described(
        None, "manifest column of the image paths (none: the first of fileNameAsDelivered, "
              "image_path, file_name, file_path, image, path)")
    name_column: str | None = described(
        None, "manifest column of the scientific names (none: scientificName or scientific_name)")
    taxa: str | None = described(
        None, "one taxa name for every row (none: the manifest's taxa column, else its VLM4Bio "
              "group folder, else the manifest's folder name)")
    caption_column: str | None = described(
        None, "column of the captions: in the manifest, or in the captions file when captions is "
              "set (none: caption, and in a captions file also description or text)")
    captions: str | None = described(
        None, "CSV or parquet file of one caption per scientific name (e.g. field-guide "
              "descriptions) for the text embeddings")
    group_column: str | None = described(
        None, "manifest column of a group id (specimen, clip, observation): every image of a "
              "group lands on the same side of the split")
    missing: str = described(
        "error", "what a missing or unreadable image does: error stops, listing them; skip "
                 "leaves it out, counted", MISSING_POLICIES)
    test_size: float = described(
        0.2, "fraction of each species' images held out as test queries, in (0, 1); "
             "split=seeded only")
    seed: int = described(
        0, f"seed of every random draw: the split, the class subset, weights=none's init, and "
           f"training's data order, augmentation, centre sampling and k-means (0 .. {MAX_SEED})")
    class_fraction: float = described(
        1.0, "fraction of the classes kept, a seeded subset, in (0, 1]: train learns only them "
             "and the rest are unseen at test time (All:seen, All:unseen rows); eval scores only "
             "them")
    split: str = described(
        "seeded", "seeded: a seeded train/test split stratified by species; official: the data's "
                  "own partitions (its split column, as BIOSCAN-5M has)", SPLITS)
    val_size: float = described(
        0.1, "fraction of each species' non-test images held out as validation queries, in "
             "[0, 1): a training's best epoch, pruning and sweep objective score them, and it "
             "never trains on them; eval keeps them in its gallery (its table does not depend "
             "on val_size). split=seeded only; split=official validates on val + val_unseen")
    format: str = described(
        "auto", "the dataset's format (auto: found from the data)", DATA_FORMATS)
    image_package: str | None = described(
        None, "BIOSCAN-5M: the image package to read (none: the first present of "
              f"{', '.join(BIOSCAN_IMAGE_PACKAGES)})", BIOSCAN_IMAGE_PACKAGES)
    text_key: str | None = described(
        None, "TreeOfLife-10M: the per-sample text that becomes each row's caption (zero-shot "
              "adds it to each species' texts)", TREEOFLIFE_TEXT_KEYS)
    queries: str | None = described(
        None, "TreeOfLife-10M: held-out shards (a path or brace pattern) that are the queries, the "
              "data's shards the gallery; needs split=official (none: a seeded split by shard)")

    def __post_init__(self) -> None:
        check_missing(self.missing)
        check_choice("split", self.split, SPLITS)
        check_choice("format", self.format, DATA_FORMATS)
        for value, check in ((self.image_package, check_image_package),
                             (self.text_key, check_text_key)):
            if value is not None:
                check(value)
        if self.queries is not None and self.split != "official":
            raise ConfigError("parameter 'queries' names held-out query shards, which the "
                              "official split scores (gallery: the data's shards); set "
                              "split=official, or leave queries out for a seeded split by shard")
        if self.split == "official" and self.class_fraction < 1.0:
            raise ConfigError("parameters 'split'=official and 'class_fraction' below 1 both "
                              "choose the seen classes (the official partitions hold unseen "
                              "species already); use one of them")
        check_test_size(self.test_size)
        check_class_fraction(self.class_fraction)
        check_seed(self.seed)
        check_range("val_size", self.val_size, 0.0, 1.0, high_open=True)


@dataclass(frozen=True)
class ModelConfig:
    """Which backbone: a registry name (`taxonclip models`) or `runs:/`/`models:/` URI, and its weights:
    `pretrained` (the source's own weights), `none` (random init) or a file path."""

    name: str = described(
        "tiny", "the encoder: a registry name (taxonclip models), open_clip:<architecture>, or a "
                "logged model runs:/<run_id>/model or models:/<name>@<alias>")
    weights: str = described(
        "pretrained", "pretrained (the published weights; tiny: a fixed init), none (a random init "
                      "drawn from seed), a weights file or checkpoint, a logged model runs:/... of "
                      "the same architecture, or hf-hub:<org>/<name> for open_clip")


@dataclass(frozen=True)
class LossConfig:
    """CombinedMarginLoss and PartialFC: s·(cos(m1·θ+m2) − m3), filter τ, sampled centres."""

    s: float = described(32.0, f"scale s of the cosine logits, in (0, {MAX_MARGIN_SCALE:g}] "
                               f"(UNICOM: 32, ArcFace: 64)")
    m1: float = described(1.0, "multiplicative angle margin m1 (only 1 is supported)")
    m2: float = described(0.3, "ArcFace additive angle margin m2 (radians), in [0, π)")
    m3: float = described(0.0, "CosFace additive cosine margin m3, at least 0 (not with "
                               "margin_m2)")
    filter: float = described(0.0, "cosine threshold τ in [0, 1): non-target cosines above it "
                                   "count as 0, without gradient (0: off)")
    sample_rate: float = described(
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
    embedding: str = described(
        "visual", "what is compared: visual (images), text (captions), avg or concat (image and "
                  "caption fused), gallery_avg (gallery images fused with their caption, queries "
                  "visual)", EMBEDDINGS)
    batch_size: int = described(256, "images (or captions) embedded per forward pass")
    workers: int = described(2, "DataLoader worker processes that decode the images (0: the "
                                "main process)")
    # the one default of knn.knn_metrics's chunk_size: on CPUs its C kernel shares a chunk's
    # queries among the threads, each making its products tile by tile (chunks of 1,024 and 2,048
    # ran 15% and 30% slower at 2,000 x 8,000, the gallery in one block: smaller tiles); on GPUs,
    # chunk x block products are alive at once
    chunk_size: int = described(512, "test queries scored against the whole gallery at once "
                                     "(memory and speed, not the metrics)")
    cache_embeddings: bool = described(
        True, "reuse the embeddings of the same weights, images and captions from "
              "~/.cache/taxonclip/embeddings")
    device: str = described("auto", _DEVICE_HELP)
    decode: str = described("workers", _DECODE_HELP, DECODERS)
    zero_shot: bool = described(
        False, "also score zs_top1 and zs_top5: each test image labelled by the nearest class "
               "text embedding (BioCLIP's protocol; needs a text tower)")
    allow_label_text: bool = described(
        False, _ALLOW_LABEL_TEXT_HELP)

    def __post_init__(self) -> None:
        check_choice("embedding", self.embedding, EMBEDDINGS)
        check_choice("decode", self.decode, DECODERS)
        if self.zero_shot and self.embedding in ("text", "avg", "concat"):
            raise ConfigError(f"zero_shot=true labels visual queries by class texts; "
                              f"embedding={self.embedding} puts text into the queries: use "
                              f"embedding=visual or gallery_avg")
        check_positive("batch_size", self.batch_size)
        check_positive("chunk_size", self.chunk_size)
        check_at_least("workers", self.workers, 0)


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning with the margin loss over PartialFC class centres, then evaluation."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    label: str = described(
        "species", "the classes trained on: the names at a rank the data has, or cluster (k-means "
                   "clusters of the starting model's embeddings, UNICOM's cluster "
                   "discrimination)", LABELS)
    clusters: float = described(
        0.1, "label=cluster: how many clusters, a fraction of the species (at most 1) or a count")
    epochs: int = described(32, "passes over the training images")
    batch_size: int = described(128, "images per micro-batch per process (also the evaluation's "
                                     "batch)")
    grad_accum: int = described(1, "micro-batches per optimiser step (a step follows the mean "
                                   "loss of grad_accum x batch_size images)")
    lr: float = described(1e-5, "peak learning rate of the backbone (AdamW; OneCycleLR warms up "
                                "to it, then anneals)")
    lr_pfc_weight: float = described(10.0, "learning-rate multiplier of the PartialFC class "
                                           "centres (their peak rate is lr x lr_pfc_weight)")
    weight_decay: float = described(0.0, "AdamW's decoupled weight decay, of the backbone and "
                                          "the centres")
    grad_clip: float = described(0.0, "largest L2 norm of the backbone's gradients; a larger one "
                                      "is scaled down to it (0: no clipping)")
    workers: int = described(2, "DataLoader worker processes per training process (0: the "
                                "main process); from shards they also shape the batches")
    eval_every: int = described(1, "evaluate every this many epochs (and after the last)")
    keep_checkpoints: int = described(2, "checkpoints of the last epochs kept in the run, besides "
                                         "the best one")
    resume: str | None = described(None, "run id of an unfinished train run to continue from its "
                                         "last checkpoint, with its own parameters")
    register_as: str | None = described(None, "register the final model under this name in the "
                                               "MLflow model registry")
    embedding: str = described(
        "visual", "what each evaluation compares (as eval's embedding; text ones need captions)",
        EMBEDDINGS)
    metric: str = described(names.HEADLINE_METRIC, "the cell <taxa>/<level>/<score> of the "
                                                   "validation table that picks the best "
                                                   "checkpoint")
    device: str = described("auto", _DEVICE_HELP)
    compile: bool = described(False, "compile the encoder with torch.compile: faster steps on a "
                                     "GPU, after a compilation pause")
    decode: str = described("workers", _DECODE_HELP, DECODERS)
    select: str = described(
        "best", "which epoch's weights are the run's model, scored once on the test split at the "
                "end: best (the best validation metric) or last", SELECTIONS)
    allow_label_text: bool = described(False, _ALLOW_LABEL_TEXT_HELP)

    def __post_init__(self) -> None:
        check_choice("label", self.label, LABELS)
        check_choice("select", self.select, SELECTIONS)
        if self.select == "best" and self.data.split == "seeded" and self.data.val_size == 0:
            raise ConfigError("parameter 'select'=best picks the epoch by its validation metric, "
                              "and 'val_size' is 0 (no validation rows): give val_size (e.g. "
                              "0.1) or select=last")
        check_choice("embedding", self.embedding, EMBEDDINGS)
        check_choice("decode", self.decode, DECODERS)
        check_finite("clusters", self.clusters, 0.0, inclusive=False)
        if self.clusters > 1 and not float(self.clusters).is_integer():
            raise ConfigError(f"parameter 'clusters' is {self.clusters}: a fraction of the "
                              f"species lies in (0, 1], a count is a whole number")
        check_table_key("metric", self.metric)
        if self.metric.rsplit("/", 1)[-1] in names.ZERO_SHOT_SCORES:
            raise ConfigError(f"parameter 'metric' is {self.metric!r}: training evaluates by nearest "
                              f"neighbours; zero-shot scores come from `eval --zero_shot true`")
        for name in ("epochs", "batch_size", "grad_accum", "eval_every", "keep_checkpoints"):
            check_positive(name, getattr(self, name))
        check_at_least("workers", self.workers, 0)
        check_finite("lr", self.lr, 0.0, inclusive=False)
        check_finite("lr_pfc_weight", self.lr_pfc_weight, 0.0, inclusive=False)
        check_finite("weight_decay", self.weight_decay, 0.0)
        check_finite("grad_clip", self.grad_clip, 0.0)  # 0: no clipping
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
    out: str = described("", "folder to write: new, empty, or an earlier prepare of the same "
                             "source to finish")
    # the largest input of the registry's models (ViT-L/14@336px)
    size: int = described(336, "short side in pixels of the written images, or model names whose "
                               "largest input it is (ViT-B/32,ViT-L/14@336px); smaller images "
                               "keep their bytes")
    image_format: str = described("jpeg", "encoding of the resized images",
                                  PREPARED_IMAGE_FORMATS)
    quality: int = described(95, "JPEG or WebP quality of the resized images, 1 to 100")
    shard_size: int = described(1000, "rows per shard")
    workers: int = described(0, "encoding processes (0: one per core)")

    def __post_init__(self) -> None:
        check_prepare(self.size, self.image_format, self.quality, self.shard_size)
        check_at_least("workers", self.workers, 0)


@dataclass(frozen=True)
class SweepConfig:
    """An Optuna study over training parameters, read from a `sweeps/*.yaml` file."""

    sweep: str = described("sweeps/margin_lr.yaml", "the sweep file: study name, metric, "
                                                    "sampler, pruner, fixed and searched "
                                                    "training parameters")
    n_trials: int = described(20, "trials this invocation runs (a continued study keeps its "
                                  "earlier ones)")
    timeout: float | None = described(None, "seconds after which no new trial starts (none: no "
                                            "limit)")
    storage: str | None = described(
        None, "Optuna storage: sqlite:///FILE, postgresql://USER@HOST/DB, mysql://..., or "
              "journal:FILE (none: optuna.db beside a SQLite MLflow store, else in the working "
              "folder)")
    study_name: str | None = described(None, "the study to create or continue (none: the sweep "
                                             "file's name)")
    overrides: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_positive("n_trials", self.n_trials)
        if self.timeout is not None:
            check_finite("timeout", self.timeout, 0.0, inclusive=False)


@dataclass(frozen=True)
class CompareConfig:
    """Which runs to rank, by what, and whether to move the registry aliases."""

    experiments: str | None = described(None, "MLflow experiments, comma-separated names or ids "
                                              "(none: every active one)")
    filter: str | None = described(None, "MLflow search filter on the runs, e.g. "
                                         "\"params.model = 'ViT-B/32'\"")
    metric: str = described(names.HEADLINE_METRIC, "the table cell <taxa>/<level>/<score> that "
                                                   "runs are ranked by, higher first")
    tie_break: str = described(names.TIE_BREAK_METRIC, "the table cell that breaks ties of metric "
                                                       "(then the newer run wins)")
    top: int = described(10, "runs shown in the leaderboard and the plots")
    promote: bool = described(False, "move the registry alias champion to the best run's model "
                                     "version, challenger to the runner-up")
    out: str = described("reports/compare", "folder of the report (CSV, Markdown, HTML, plots)")

    def __post_init__(self) -> None:
        check_table_key("metric", self.metric)
        check_table_key("tie_break", self.tie_break)
        check_positive("top", self.top)


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
    out: str | None = described(
        None, "folder of the captions: part files in parts/, merged into captions.parquet "
              "(required; a rerun into it with the same settings captions only what is missing)")
    model: str = described(
        "tiny", "the captioner: tiny (a tiny random model built in code: nonsense captions, for "
                "trying the command), or an image-text-to-text model: a local folder, or a "
                "Hugging Face id found in $HF_HUB_CACHE (transformers:<folder or id> says so "
                "explicitly)")
    template: str = described(
        "describe", "the prompt: a template's name in the templates file")
    templates: str | None = described(
        None, "YAML file of named prompt templates (none: the shipped captions/templates.yaml)")
    name_in_prompt: str = described(
        "none", "none: no prompt holds a name; gallery: a template's {scientific_name} (or any "
                "rank) is filled only for rows that are never queries under the split (seed, "
                "test_size, split, group_column) that eval and train use", NAME_IN_PROMPT)
    trust_remote_code: bool = described(
        False, "let transformers run the model folder's own Python code (models not native to "
               "transformers, such as InternVL2); only for code you trust")
    batch_size: int = described(16, "images captioned per generate call")
    max_new_tokens: int = described(100, "longest caption in tokens (greedy decoding)")
    part_size: int = described(256, "captions per part file: a kill loses at most one part")
    workers: int = described(2, "DataLoader worker processes that decode the images (0: the "
                                "main process)")
    dtype: str = described("auto", "the model's weights and compute: auto is bfloat16 on CUDA, "
                                   "float32 on the CPU", CAPTION_DTYPES)
    device: str = described("auto", _DEVICE_HELP)
    progress_every: int = described(10, "off a terminal, one progress line every this many "
                                        "batches")
    merge_only: bool = described(
        False, "caption nothing: merge the part files of every share into captions.parquet (the "
               "last step of a SLURM array) and log the run")

    def __post_init__(self) -> None:
        check_choice("name_in_prompt", self.name_in_prompt, NAME_IN_PROMPT)
        check_choice("dtype", self.dtype, CAPTION_DTYPES)
        if not self.model.strip():
            raise ConfigError("parameter 'model' needs a value: tiny, or a model folder or id")
        for name in ("batch_size", "max_new_tokens", "part_size", "progress_every"):
            check_positive(name, getattr(self, name))
        check_at_least("workers", self.workers, 0)

    def out_folder(self) -> Path:
        """The output folder; a job cannot run without one (a default has none, for --help)."""
        if self.out is None or not self.out.strip():
            raise ConfigError("parameter 'out' is required: the folder that will hold "
                              "captions.parquet and its parts/")
        return Path(self.out).expanduser().resolve()


# The checks that take their value sets from the constants above (config_checks, which the
# dataclasses here import, cannot import them); the entry points that take a value without a
# config call them too.
def check_missing(missing: str) -> None:
    """What a missing or unreadable image does: one of MISSING_POLICIES."""
    check_choice("missing", missing, MISSING_POLICIES)


def check_test_size(test_size: float) -> None:
    """The seeded split's share of each class's images that go to test: in (0, 1)."""
    check_range("test_size", test_size, 0.0, 1.0, low_open=True, high_open=True)


def check_class_fraction(class_fraction: float) -> None:
    """The share of the classes kept, a seeded subset: in (0, 1]."""
    check_range("class_fraction", class_fraction, 0.0, 1.0, low_open=True)


def check_seed(seed: int) -> None:
    """A seed numpy's legacy seeding takes too: 0 .. MAX_SEED."""
    check_range("seed", seed, 0, MAX_SEED)


def check_image_package(image_package: str) -> None:
    """A BIOSCAN-5M image package as its owners name them: one of BIOSCAN_IMAGE_PACKAGES."""
    check_choice("image_package", image_package, BIOSCAN_IMAGE_PACKAGES)


def check_text_key(text_key: str) -> None:
    """A TreeOfLife-10M per-sample text: one of TREEOFLIFE_TEXT_KEYS."""
    check_choice("text_key", text_key, TREEOFLIFE_TEXT_KEYS)


def check_prepare(size: int, image_format: str, quality: int, shard_size: int) -> None:
    """How `data prepare` writes images: one of PREPARED_IMAGE_FORMATS, a short side of 8 to 8192
    pixels, a quality of 1 to 100 and 1 to 10**7 rows per shard."""
    if image_format not in PREPARED_IMAGE_FORMATS:  # `--format` on the command line
        raise ConfigError(f"parameter 'format' is {image_format!r}; choose one of "
                          f"{', '.join(PREPARED_IMAGE_FORMATS)}")
    for name, value, low, high in (("size", size, 8, 8192), ("quality", quality, 1, 100),
                                   ("shard_size", shard_size, 1, 10**7)):
        if not low <= value <= high:
            raise ConfigError(f"parameter {name!r} is {value}; it lies in {low} .. {high}")


def check_label(label: str, levels: names.Levels, source: object) -> None:
    """Raise ConfigError unless the data read from `source` has the rank `label` to train on."""
    if label not in (*levels.labels, CLUSTER_LABEL):
        raise ConfigError(f"parameter 'label' is {label!r}, but {source} has the ranks "
                          f"{', '.join(levels.labels)}; choose one of them (or cluster)")
