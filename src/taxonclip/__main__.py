"""`python -m taxonclip` (and `torchrun -m taxonclip`) runs the command line."""

from taxonclip.cli import main

raise SystemExit(main())
