"""Every MLflow call of the project, by concern: `runs` (start, continue and end a run),
`run_logging` (its parameters, metrics, tables and artifacts), `tables` (the per-taxa table as
metrics), `models` (resolve a model reference; the registry's writes), `queries` (what `compare`
reads) and `sweeps` (a sweep's parent and child runs). Importing the package imports none of
them, nor MLflow."""
