"""Prompt templates: named texts in a small YAML file, whose fields are ranks of a row's name.

A template holding a field (`{scientific_name}`, `{genus}`, ...) writes the label into the prompt,
so its caption is a function of the label. Such a template fills only the rows that may hold a
name (`name_in_prompt=gallery`: rows never queries); every other row gets its `without_name`
template, which holds no field.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

import yaml

from taxonclip import names
from taxonclip.errors import ConfigError

SHIPPED = Path(__file__).with_name("templates.yaml")
# the fields a template may name: the cleaned name and every rank a table can have
FIELDS = ("scientific_name", *names.KNOWN_LEVELS)


@dataclass(frozen=True)
class Template:
    """One named prompt: its text, the fields it fills, and the template used for rows that may
    not see a name (None for a template without fields)."""

    name: str
    text: str
    fields: tuple[str, ...]
    without_name: Template | None = None

    @property
    def names_label(self) -> bool:
        """Whether the prompt holds a rank name of its row."""
        return bool(self.fields)

    def fill(self, row: dict) -> str:
        """The prompt for one row (a mapping holding every field of the template)."""
        return self.text.format(**{field: row.get(field) or "" for field in self.fields})


def load_template(name: str, file: str | None) -> Template:
    """The template `name` of `file` (None: the shipped file), checked: known fields only, and a
    field-free `without_name` for a template with fields."""
    path = Path(file).expanduser() if file else SHIPPED
    entries = _entries(path)
    if name not in entries:
        raise ConfigError(f"no template {name!r} in {path}; it has {', '.join(sorted(entries))}")
    template = _template(name, entries[name], path)
    if not template.fields:
        return template
    fallback_name = entries[name].get("without_name")
    if fallback_name is None:
        raise ConfigError(f"template {name!r} of {path} writes {', '.join(template.fields)} into "
                          f"the prompt but names no `without_name` template for the rows that "
                          f"may be queries")
    if fallback_name not in entries:
        raise ConfigError(f"template {name!r} of {path}: its without_name {fallback_name!r} is "
                          f"not a template of the file")
    fallback = _template(fallback_name, entries[fallback_name], path)
    if fallback.fields:
        raise ConfigError(f"template {name!r} of {path}: its without_name {fallback_name!r} "
                          f"holds {', '.join(fallback.fields)}, a name again")
    return Template(template.name, template.text, template.fields, fallback)


def _entries(path: Path) -> dict[str, dict]:
    if not path.is_file():
        raise ConfigError(f"templates file {path} does not exist")
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"templates file {path} is not valid YAML: {err}") from None
    entries = document.get("templates") if isinstance(document, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise ConfigError(f"templates file {path}: expected a mapping `templates:` of name -> "
                          f"{{text: ..., without_name: ...}}")
    for key, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("text"), str):
            raise ConfigError(f"templates file {path}: template {key!r} needs a `text` string")
    return entries


def _template(name: str, entry: dict, path: Path) -> Template:
    """The template of one entry; a field that is not a rank is refused, naming it."""
    text = entry["text"].strip()
    try:
        parsed = [part[1] for part in string.Formatter().parse(text) if part[1] is not None]
    except ValueError as err:
        raise ConfigError(f"template {name!r} of {path}: {err} in {text!r}") from None
    unknown = sorted({field for field in parsed if field not in FIELDS})
    if unknown:
        raise ConfigError(f"template {name!r} of {path} has the unknown field(s) "
                          f"{', '.join('{' + field + '}' for field in unknown)}; a field is one "
                          f"of {', '.join('{' + field + '}' for field in FIELDS)}")
    return Template(name, text, tuple(dict.fromkeys(parsed)))
