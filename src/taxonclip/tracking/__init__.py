"""Every MLflow call of the project, by concern: `runs` (start or continue a run; parameters,
metrics, tables, artifacts), `models` (log a trained encoder, resolve a model reference),
`queries` (what `compare` reads) and `sweeps` (a sweep's parent and child runs). Importing the
package imports none of them, nor MLflow."""
