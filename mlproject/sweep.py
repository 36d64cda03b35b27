"""MLproject entry point `sweep`: the parameters go to `taxonclip sweep` unchanged."""

import sys

import _src  # noqa: F401

from taxonclip.cli import main

raise SystemExit(main(["sweep", *sys.argv[1:]]))
