"""MLproject entry point `caption`: the parameters go to `taxonclip caption` unchanged."""

import sys

import _src  # noqa: F401

from taxonclip.cli import main

raise SystemExit(main(["caption", *sys.argv[1:]]))
