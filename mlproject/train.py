"""MLproject entry point `train`: the parameters go to `taxonclip train` unchanged."""

import sys

import _src  # noqa: F401

from taxonclip.cli import main

raise SystemExit(main(["train", *sys.argv[1:]]))
