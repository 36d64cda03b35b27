"""MLproject entry point `compare`: the parameters go to `taxonclip compare` unchanged."""

import sys

import _src  # noqa: F401

from taxonclip.cli import main

raise SystemExit(main(["compare", *sys.argv[1:]]))
