"""Typed configuration: the one place where loose parameters (CLI flags, MLproject parameters,
sweep suggestions) become dataclasses. Everything below the entry points takes these types."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from collections.abc import Mapping
from typing import Any, get_args, get_type_hints

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


@dataclass(frozen=True)
class DataConfig:
    """Where the images are, how to read the manifest, and how to split it."""

    data: str = SYNTHETIC
    image_column: str | None = None
    name_column: str | None = None
    taxa: str | None = None
    caption_column: str | None = None
    captions: str | None = None
    group_column: str | None = None
    missing: str = "error"
    test_size: float = 0.2
    seed: int = 0
    class_fraction: float = 1.0
    split: str = "seeded"

    def __post_init__(self) -> None:
        _check_choice("missing", self.missing, MISSING_POLICIES)
        _check_choice("split", self.split, SPLITS)
        if self.split == "official" and self.class_fraction < 1.0:
            raise ConfigError("parameters 'split'=official and 'class_fraction' below 1 both "
                              "choose the seen classes (the official partitions hold unseen "
                              "species already); use one of them")
        _check_range("test_size", self.test_size, 0.0, 1.0, low_open=True, high_open=True)
        _check_range("class_fraction", self.class_fraction, 0.0, 1.0, low_open=True)
        _check_range("seed", self.seed, 0, MAX_SEED)


@dataclass(frozen=True)
class ModelConfig:
    """Which backbone: a registry name (`taxonclip models`) or `runs:/`/`models:/` URI, and its weights:
    `pretrained` (the source's own weights), `none` (random init) or a file path."""

    name: str = "tiny"
    weights: str = "pretrained"


@dataclass(frozen=True)
class LossConfig:
    """CombinedMarginLoss and PartialFC: s·(cos(m1·θ+m2) − m3), filter τ, sampled centres."""

    s: float = 32.0
    m1: float = 1.0
    m2: float = 0.3
    m3: float = 0.0
    filter: float = 0.0
    sample_rate: float = 1.0

    def __post_init__(self) -> None:
        check_margins(self.s, self.m1, self.m2, self.m3, self.filter)
        _check_range("sample_rate", self.sample_rate, 0.0, 1.0, low_open=True)


@dataclass(frozen=True)
class EvalConfig:
    """Nearest-neighbour evaluation of one model on one dataset."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    embedding: str = "visual"
    batch_size: int = 256
    workers: int = 2
    chunk_size: int = 512  # knn.DEFAULT_CHUNK_SIZE, written out to keep this module free of torch
    cache_embeddings: bool = True
    device: str = "auto"
    decode: str = "workers"
    zero_shot: bool = False

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
    label: str = "species"
    clusters: float = 0.1  # label=cluster: a fraction of the species (<= 1), or a count
    epochs: int = 32
    batch_size: int = 128
    grad_accum: int = 1
    lr: float = 1e-5
    lr_pfc_weight: float = 10.0
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    workers: int = 2
    eval_every: int = 1
    keep_checkpoints: int = 2
    resume: str | None = None
    register_as: str | None = None
    embedding: str = "visual"
    metric: str = names.HEADLINE_METRIC
    device: str = "auto"
    compile: bool = False
    decode: str = "workers"

    def __post_init__(self) -> None:
        _check_choice("label", self.label, LABELS)
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
                          device=self.device, decode=self.decode)


@dataclass(frozen=True)
class PrepareConfig:
    """`data prepare`: the source dataset (read and checked as `data check` reads it), the folder
    to write, and how: the short side of the resized images, their format and quality, rows per
    shard, and encoding processes (0: one per core)."""

    data: DataConfig = field(default_factory=DataConfig)
    out: str = ""
    size: int = 336  # the largest input of the registry's models (ViT-L/14@336px)
    image_format: str = "jpeg"
    quality: int = 95
    shard_size: int = 1000
    workers: int = 0

    def __post_init__(self) -> None:
        _check_at_least("workers", self.workers, 0)


@dataclass(frozen=True)
class SweepConfig:
    """An Optuna study over training parameters, read from a `sweeps/*.yaml` file."""

    sweep: str = "sweeps/margin_lr.yaml"
    n_trials: int = 20
    timeout: float | None = None
    storage: str | None = None
    study_name: str | None = None
    overrides: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_positive("n_trials", self.n_trials)
        if self.timeout is not None:
            _check_finite("timeout", self.timeout, 0.0, inclusive=False)


@dataclass(frozen=True)
class CompareConfig:
    """Which runs to rank, by what, and whether to move the registry aliases."""

    experiments: str | None = None
    filter: str | None = None
    metric: str = names.HEADLINE_METRIC
    tie_break: str = names.TIE_BREAK_METRIC
    top: int = 10
    promote: bool = False
    out: str = "reports/compare"

    def __post_init__(self) -> None:
        check_table_key("metric", self.metric)
        check_table_key("tie_break", self.tie_break)
        _check_positive("top", self.top)


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


def coerce(cls: type, name: str, raw: Any) -> Any:
    """Turn the string `raw` into the declared type of field `name` of dataclass `cls`
    ("none" or "" gives None where the field is optional)."""
    hints = get_type_hints(cls)
    if name not in hints:
        raise ConfigError(f"unknown parameter {name!r} for {cls.__name__}")
    args = get_args(hints[name])
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hints[name]) if args else hints[name]
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
    "group_column": "data.group_column", "split": "data.split",
}
EVAL_PARAMS = {
    "model": "model.name", "weights": "model.weights", **DATA_PARAMS,
    "embedding": "embedding", "batch_size": "batch_size", "workers": "workers",
    "chunk_size": "chunk_size", "device": "device", "decode": "decode", "zero_shot": "zero_shot",
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
}


# prepare reads its source as `data check` does, but splits nothing
PREPARE_PARAMS = {
    **{name: path for name, path in DATA_PARAMS.items()
       if name not in ("seed", "test_size", "class_fraction", "split")},
    "size": "size", "format": "image_format", "quality": "quality",
    "shard_size": "shard_size", "workers": "workers",
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
