"""Baselines: the pretrained run each ranked run is measured against, and its gain.

A pretrained baseline is an `eval` run of a registry model name (not of a logged `runs:/` or
`models:/` model) with its published weights (`weights=pretrained`, or its synonym `openai` or
`unicom`; not `none`, nor a file). The gain of every other run is its metric minus that of the
best-ranked baseline of the same split, model and embedding: the split by its fingerprint (the
sha256 of its `eval/split.csv`, every row and its role, tag `taxonclip.split_fingerprint`), so
that a group-aware split, another seed, test or val size, or other data never meet; the model
and embedding (and the captions of a text embedding) by their parameters (BASELINE_MATCH),
compared as values. An eval of a logged `runs:/` model matches on the `model` of its source run
when that run is compared. There is no looser match: a run that no baseline matches (or that
carries no fingerprint) has no gain, and the report gives the `taxonclip eval` command that
would make its baseline.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping

import pandas as pd

from taxonclip import names
from taxonclip.compare.rank import KIND_EVAL, fingerprint, run_kind
from taxonclip.config import DATA_PARAMS, EVAL_PARAMS, EvalConfig, flat_fields
from taxonclip.errors import ModelError
from taxonclip.tracking.models import MODEL_URI_PREFIXES
from taxonclip.tracking.queries import RunRecord

# What a run shares with its pretrained baseline besides the split (matched by its fingerprint,
# names.TAG_SPLIT_FINGERPRINT): the architecture, the embedding and the captions it reads, so
# that the gain is the fine-tuning's alone.
BASELINE_MATCH = ("model", "embedding", "captions", "caption_column")
# The parameters that make the split, which the command making a missing baseline repeats
SPLIT_PARAMS = tuple(name for name in DATA_PARAMS if name not in BASELINE_MATCH)
# A parameter a run lacks (logged before it existed) had the eval config's default, which is also
# the train config's for every one of these.
_EVAL_DEFAULTS = flat_fields(EvalConfig())
PARAM_DEFAULTS = {name: _EVAL_DEFAULTS[EVAL_PARAMS[name]]
                  for name in (*BASELINE_MATCH, *SPLIT_PARAMS, "weights")}
MATCH_TEXT = (f"split (fingerprint of {names.SPLIT_ARTIFACT}: every row and its role), model, "
              f"embedding and captions")


def param_text(params: Mapping[str, str], name: str) -> str:
    """A run's parameter as logged, stripped; the config default where the run lacks it."""
    return str(params.get(name, PARAM_DEFAULTS[name])).strip()


def normalised(name: str, text: str) -> float | str:
    """A parameter's value as compared: a number where the config field is numeric ("0.20" and
    "0.2", "1" and "1.0" are equal), else the stripped text."""
    text = text.strip()
    if isinstance(PARAM_DEFAULTS[name], (int, float)):
        try:
            return float(text)
        except ValueError:
            pass  # not a number: compared as the text it is
    return text


def architecture(run: RunRecord, runs: Mapping[str, RunRecord]) -> str | None:
    """The registry name of a run's model: its `model` parameter, or for a `runs:/<run_id>/...`
    model that of the source run when it is among `runs`; None when unknown (`models:/`)."""
    model = param_text(run.params, "model")
    if not model.startswith(MODEL_URI_PREFIXES):
        return model
    source = runs.get(source_run_id(model))
    return None if source is None else architecture(source, runs)


def source_run_id(model: str) -> str:
    """The run id of a `runs:/<run_id>/<path>` model URI; "" for any other model."""
    return model.removeprefix("runs:/").split("/", 1)[0] if model.startswith("runs:/") else ""


def baseline_key(run: RunRecord, runs: Mapping[str, RunRecord]) -> tuple | None:
    """What the run's baseline must have: the split fingerprint and the BASELINE_MATCH values,
    normalised (the model as its architecture; the captions only for a text embedding); None
    when the architecture or the fingerprint is unknown, so that no baseline matches."""
    model = architecture(run, runs)
    if model is None or not fingerprint(run):
        return None
    visual = param_text(run.params, "embedding") == "visual"
    values = tuple(normalised(name, model if name == "model" else
                              "" if visual and name.startswith("caption") else
                              param_text(run.params, name)) for name in BASELINE_MATCH)
    return (fingerprint(run), *values)


def is_pretrained_baseline(run: RunRecord) -> bool:
    """Whether the run is an eval of a registry model with its published weights."""
    # Imported here: the registry loads torch, which ranking runs needs nowhere else.
    from taxonclip.models.registry import get_spec, is_published

    model = param_text(run.params, "model")
    if run_kind(run) != KIND_EVAL or model.startswith(MODEL_URI_PREFIXES):
        return False
    try:
        source = get_spec(model).source
    except ModelError:
        return False  # a model name the registry no longer knows has no published weights
    return is_published(source, param_text(run.params, "weights"))


def baseline_command(run: RunRecord, model: str) -> str:
    """The `taxonclip eval` command that makes the baseline of a run (its weights are the
    default, `pretrained`): its model (architecture) and embedding, and every parameter of its
    split or captions that differs from the default."""
    given = {"model": model, "embedding": param_text(run.params, "embedding")}
    for name in (*SPLIT_PARAMS, "captions", "caption_column"):
        text = param_text(run.params, name)
        if text.lower() not in ("", "none") and normalised(name, text) != normalised(
                name, str(PARAM_DEFAULTS[name])):
            given[name] = normalised(name, text)
    return "taxonclip eval " + " ".join(f"--{name} {shlex.quote(command_text(name, value))}"
                                        for name, value in given.items())


def command_text(name: str, value: float | str) -> str:
    """A normalised parameter as the command line takes it: an integer field without `.0`."""
    integer = isinstance(PARAM_DEFAULTS[name], int) and not isinstance(PARAM_DEFAULTS[name], bool)
    if isinstance(value, float) and integer and value.is_integer():
        return str(int(value))
    return str(value)


def missing_baseline(run: RunRecord, runs: Mapping[str, RunRecord]) -> str:
    """What a run that no baseline matches lacks: the command that makes its baseline, or why
    none can match."""
    model = architecture(run, runs)
    if model is None:
        return (f"none: the architecture of {param_text(run.params, 'model')} is unknown "
                f"(not a runs:/ model of a compared run)")
    if not fingerprint(run):
        return (f"none: the run has no split fingerprint (tag {names.TAG_SPLIT_FINGERPRINT}), "
                f"so its split cannot be matched; run it again")
    return baseline_command(run, model)


def add_gains(board: pd.DataFrame, runs: Mapping[str, RunRecord], metric: str) -> pd.DataFrame:
    """Add to every run that is not a pretrained baseline `baseline_run_id` (the best-ranked
    baseline of the same split fingerprint and BASELINE_MATCH values; never a looser match),
    `gain` (its metric minus the baseline's) and,
    where none matches, `baseline_missing` (see `missing_baseline`)."""
    is_baseline = {run_id: is_pretrained_baseline(runs[run_id]) for run_id in board.index}
    keys = {run_id: baseline_key(runs[run_id], runs) for run_id in board.index}
    best_baseline: dict[tuple, str] = {}
    for run_id in board.index:  # best first, so the first baseline of a key is its best
        if is_baseline[run_id] and keys[run_id] is not None:
            best_baseline.setdefault(keys[run_id], run_id)
    baseline_ids = [None if is_baseline[run_id] else best_baseline.get(keys[run_id])
                    for run_id in board.index]
    board = board.copy()
    board["baseline_run_id"] = baseline_ids
    board["gain"] = [board.at[run_id, metric] - board.at[base, metric] if base else math.nan
                     for run_id, base in zip(board.index, baseline_ids)]
    board["baseline_missing"] = [
        "" if is_baseline[run_id] or base else missing_baseline(runs[run_id], runs)
        for run_id, base in zip(board.index, baseline_ids)]
    return board


def matched_pair(board: pd.DataFrame) -> tuple[str, str] | None:
    """The best-ranked fine-tuned run (a train run, a sweep trial or an eval of a logged model)
    that has a matched baseline, and that baseline; None if none has."""
    tuned = (board["kind"] != KIND_EVAL) | board["model"].str.startswith(MODEL_URI_PREFIXES)
    matched = board.loc[tuned, "baseline_run_id"].dropna()
    return None if matched.empty else (matched.index[0], matched.iloc[0])


def missing_baselines(board: pd.DataFrame) -> pd.DataFrame:
    """One row per missing baseline: how many ranked runs need it, their ranks, and the command
    that makes it (or why none can match)."""
    needing = board[board["baseline_missing"] != ""]
    rows = [{"runs": len(group), "ranks": ", ".join(f"#{rank}" for rank in group["rank"]),
             "missing baseline": missing}
            for missing, group in needing.groupby("baseline_missing", sort=False)]
    return pd.DataFrame(rows, columns=["runs", "ranks", "missing baseline"])
