"""Entry-point parameters: the names the MLproject entry points and the `taxonclip` commands
take (the `*_PARAMS` mappings), the help each config field declares, and turning the loose
values (CLI strings, MLproject parameters, sweep suggestions) into a typed config and back."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import field, fields
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

from taxonclip.errors import ConfigError


def described(default: Any, help: str, choices: tuple[str, ...] = ()) -> Any:
    """A dataclass field with its default and what `taxonclip <command> --help` says of it: one
    line, and the fixed set of values it takes (none where it takes any value of its type)."""
    return field(default=default, metadata={"help": help, "choices": choices})


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
    of `cls.loss`) and its fixed set of values, as `described` declares them ("" and () for a
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
