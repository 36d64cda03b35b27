"""Several workers on one study: two `taxonclip sweep` processes sharing a PostgreSQL storage;
and a storage password holding URL characters, which no output, param or tag shows."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from taxonclip import names
from taxonclip.sweep.storage import open_storage
from tests.helpers import slow_but_all_three

pytestmark = pytest.mark.integration

SWEEP = """\
name: shared
sampler: {type: tpe, seed: 0}
pruner: none
fixed: {model: tiny, epochs: 1, batch_size: 16, workers: 0}
search:
  lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
  margin_m2: {type: float, low: 0.1, high: 0.5}
"""
TRIALS_PER_WORKER = 2
WORKERS = 2
# Passwords holding the characters a naive URL parser splits at, unencoded in the URL; the
# fixture's server trusts every connection, so any password opens it.
PASSWORDS = {"slash": "se/cr3t", "at": "p@ss", "colon": "a:b", "all three": "x/y@z:w"}


def test_two_workers_share_one_postgres_study(tracking, postgres, specimens, tmp_path):
    sweep = tmp_path / "shared.yaml"
    sweep.write_text(textwrap.dedent(SWEEP))
    command = [sys.executable, "-m", "taxonclip", "sweep", "--sweep", str(sweep),
               "--n_trials", str(TRIALS_PER_WORKER), "--storage", postgres,
               "-P", f"data={specimens}"]
    workers = [subprocess.Popen(command, cwd=tmp_path, env=os.environ.copy(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
               for _ in range(WORKERS)]
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    assert [w.returncode for w in workers] == [0] * WORKERS, "\n".join(o[-3000:] for o in outputs)

    # n_trials counts each worker's trials: together they ran WORKERS x TRIALS_PER_WORKER.
    study = optuna.load_study(study_name="shared", storage=open_storage(postgres))
    assert sorted(t.number for t in study.trials) == list(range(WORKERS * TRIALS_PER_WORKER))
    assert {t.state for t in study.trials} == {TrialState.COMPLETE}

    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`{names.TAG_STUDY}` = 'shared'")
    parents = {r.info.run_id: r for r in runs if r.data.tags[names.TAG_ENTRY] == "sweep"}
    children = [r for r in runs if r.data.tags[names.TAG_ENTRY] == "train"]
    assert len(parents) == WORKERS
    assert sorted(int(c.data.tags[names.TAG_TRIAL]) for c in children) == \
        list(range(WORKERS * TRIALS_PER_WORKER))
    by_trial = {int(c.data.tags[names.TAG_TRIAL]): c for c in children}
    for trial in study.trials:
        child = by_trial[trial.number]
        assert trial.user_attrs["mlflow_run_id"] == child.info.run_id
        assert child.data.params["lr"] == str(trial.params["lr"])
    per_parent = [c.data.tags["mlflow.parentRunId"] for c in children]
    assert sorted(per_parent.count(p) for p in parents) == [TRIALS_PER_WORKER] * WORKERS
    stored = {p.data.tags["taxonclip.storage"] for p in parents.values()}
    assert stored == {postgres.replace(":secret@", ":***@")}


@pytest.mark.parametrize("case", slow_but_all_three(sorted(PASSWORDS)))
def test_storage_password_with_url_characters_is_never_shown(case, tracking, postgres, specimens,
                                                            tmp_path):
    password, study_name = PASSWORDS[case], f"secret-{case}"
    storage = postgres.replace(":secret@", f":{password}@")
    sweep = tmp_path / "shared.yaml"
    sweep.write_text(textwrap.dedent(SWEEP))
    command = [sys.executable, "-m", "taxonclip", "sweep", "--sweep", str(sweep), "--n_trials", "1",
               "--storage", storage, "--study_name", study_name, "-P", f"data={specimens}"]
    done = subprocess.run(command, cwd=tmp_path, env=os.environ.copy(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert password not in done.stdout + done.stderr
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`{names.TAG_STUDY}` = '{study_name}'")
    assert sorted(r.data.tags[names.TAG_ENTRY] for r in runs) == ["sweep", "train"]
    logged = [f"{key}={value}" for run in runs
              for key, value in {**run.data.params, **run.data.tags}.items()]
    assert not [item for item in logged if password in item]
    parent = next(r for r in runs if r.data.tags[names.TAG_ENTRY] == "sweep")
    assert parent.data.tags[names.TAG_STORAGE] == postgres.replace(":secret@", ":***@")
    assert parent.data.params["storage"] == postgres.replace(":secret@", ":***@")
