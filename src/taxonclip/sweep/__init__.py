"""Optuna studies over training parameters, described by `sweeps/*.yaml` files; the only
package that calls Optuna.

- `spec`: the sweep file read and checked (`load_sweep`, `SweepSpec`), its sampler and pruner;
- `storage`: Optuna storage URLs, their redaction, the storage and its heartbeat timing;
- `run`: the objective, the trial-seeded sampler, the reconciler of dead sweeps, `run_sweep`;
- `report`: the best trial on the sweep's run, the plots and the printed summary.

Nothing is imported here, so `import taxonclip.sweep.spec` loads no more than that module needs.
"""
