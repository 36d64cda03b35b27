"""MLproject entry point `eval`: the parameters go to `taxonclip eval` unchanged."""

import sys

import _src  # noqa: F401

from taxonclip.cli import main

raise SystemExit(main(["eval", *sys.argv[1:]]))
