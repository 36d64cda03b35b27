"""The checks of configured values: each parameter's bounds and choices, written once, raising
ConfigError that names the parameter. The config dataclasses run them as they are built; the
library calls the same functions where a value reaches it by another way."""

from __future__ import annotations

import math

from taxonclip import names
from taxonclip.errors import ConfigError

# The scale s of the margin loss lies in (0, 128]: UNICOM trains with 32, ArcFace with 64; a
# much larger scale saturates the softmax (a one-hot output, no useful gradient), so it is a typo.
MAX_MARGIN_SCALE = 128.0
# Registered model names: MLflow refuses `/` and `:`; our registry queries quote names in filter
# strings ('...'), and `models:/<name>@<alias>` splits a name at `@`.
MODEL_NAME_FORBIDDEN = "/:'\"`@"
MAX_MODEL_NAME = 256  # the registry's name column holds 256 characters


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
    check_range("sample_rate", sample_rate, 0.0, 1.0, low_open=True)


def check_table_key(name: str, key: str) -> None:
    """Raise ConfigError unless `key` names a per-taxa table cell `<taxa>/<level>/<score>`."""
    if not names.is_table_key(key):
        raise ConfigError(f"parameter {name!r} is {key!r}; use <taxa>/<level>/<score> with <level> "
                          f"one of {', '.join(names.KNOWN_LEVELS)} and <score> one of "
                          f"{', '.join((*names.SCORES, *names.ZERO_SHOT_SCORES))}, e.g. "
                          f"{names.HEADLINE_METRIC}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise ConfigError unless `value` is one of `choices`."""
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


def check_positive(name: str, value: int) -> None:
    """Raise ConfigError unless `value` is at least 1."""
    check_at_least(name, value, 1)


def check_at_least(name: str, value: int, minimum: int) -> None:
    """Raise ConfigError unless `value` is at least `minimum`."""
    if value < minimum:
        raise ConfigError(f"parameter {name!r} must be at least {minimum}, got {value}")


def check_finite(name: str, value: float, minimum: float, inclusive: bool = True) -> None:
    """Refuse nan, an infinity, and a value below `minimum` (or at it, unless `inclusive`)."""
    above = value >= minimum if inclusive else value > minimum
    if not (math.isfinite(value) and above):
        bound = f"at least {minimum:g}" if inclusive else f"above {minimum:g}"
        raise ConfigError(f"parameter {name!r} must be a finite number {bound}, got {value}")


def check_range(name: str, value: float, low: float, high: float,
                low_open: bool = False, high_open: bool = False) -> None:
    """Raise ConfigError unless `value` lies between `low` and `high` (each bound excluded where
    it is open); nan lies nowhere."""
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if math.isnan(value) or too_low or too_high:  # nan compares false with every bound
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ConfigError(f"parameter {name!r} must be in {lo}{low}, {high}{hi}, got {value}")
