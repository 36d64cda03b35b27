"""Compare: rank every run that carries a per-taxa table against its pretrained baseline, write
the report, promote the best. `run` (the command), `rank` (the leaderboard), `baseline`
(baseline matching by split fingerprint, and the gain), `report` (plots, tables, Markdown and
HTML) and `promote` (the registry aliases)."""
