"""The interface every dataset reader has, and the reading parameters it may honour.

A reader is a `Reader`: its format's name (what `format=` names), `detect` (whether a `data`
value is of its format; cheap, and never an error for a path of another format), `read` (the
validated `Manifest`), the reading parameters it `honours`, and its fixture writer where the
format has one (`taxonclip data synth --format NAME`). A parameter given to a reader that does
not honour it is refused by name (`check_honoured`): silently ignoring `group_column` would
split the groups it names across train and test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from taxonclip.config import DataConfig
from taxonclip.data.validated import Manifest
from taxonclip.errors import ConfigError


@dataclass(frozen=True)
class ReadOptions:
    """The reading parameters of `DataConfig` (see its descriptions); a field left at its value
    here is not given."""

    image_column: str | None = None
    name_column: str | None = None
    taxa: str | None = None
    caption_column: str | None = None
    group_column: str | None = None
    missing: str = DataConfig.missing
    image_package: str | None = None
    text_key: str | None = None
    queries: str | None = None

    def given(self) -> tuple[str, ...]:
        """The names of the parameters set to something other than their value here."""
        unset = ReadOptions()
        return tuple(f.name for f in fields(self)
                     if getattr(self, f.name) != getattr(unset, f.name))


@dataclass(frozen=True)
class Reader:
    """One dataset format (see the module docstring)."""

    name: str
    title: str
    detect: Callable[[str], bool]
    read: Callable[[str, ReadOptions], Manifest]
    honours: frozenset[str]
    write_fixture: Callable[..., Path] | None = None


def check_honoured(reader: Reader, options: ReadOptions, data: str) -> None:
    """Refuse, by name, every given parameter that `reader` does not honour."""
    ignored = [name for name in options.given() if name not in reader.honours]
    if ignored:
        takes = ", ".join(sorted(reader.honours)) or "none"
        raise ConfigError(f"parameter{'s' if len(ignored) > 1 else ''} "
                          f"{', '.join(map(repr, ignored))} do{'es' if len(ignored) == 1 else ''} "
                          f"not apply to {reader.title} data ({data}); it reads its own layout "
                          f"and takes only: {takes}. Leave {'them' if len(ignored) > 1 else 'it'} "
                          f"out")
