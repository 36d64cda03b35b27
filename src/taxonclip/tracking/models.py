"""Models in MLflow: resolving a model reference (a registry name or a logged model's URI) to an
encoder, and the model registry's writes (registering a run's model, moving an alias) that
`compare --promote` makes. A logged model's files, and logging one, are `logged_model.py`'s.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from taxonclip import names
from taxonclip.config import DataConfig, ModelConfig
from taxonclip.errors import ModelError
from taxonclip.models.registry import Encoder, create_model
# CONFIG_ARTIFACT and WEIGHTS_ARTIFACT stay importable here: the pyfunc code that models logged
# so far carry imports them, with read_logged_encoder, from this module.
from taxonclip.tracking.logged_model import (CONFIG_ARTIFACT, CONFIG_FILE,  # noqa: F401
                                             MODEL_ARTIFACTS_DIR, WEIGHTS_ARTIFACT, WEIGHTS_FILE,
                                             read_logged_encoder)
from taxonclip.tracking.connection import connect, redacted_uri, tracking_uri

MODEL_URI_PREFIXES = ("runs:/", "models:/")


def resolve_model(model: ModelConfig, device: str = "cpu",
                  seed: int = DataConfig.seed) -> Encoder:
    """Build the encoder a `ModelConfig` names: a registry name (`weights=none` drawn from
    `seed`, or `weights=` a logged model of that architecture, to train a finished model
    further), or a logged model URI (`runs:/<run_id>/model`, `models:/<name>/<version or @alias>`)."""
    if model.name.startswith(MODEL_URI_PREFIXES):
        return load_logged_model(model.name).to(device).float().eval()
    if not model.weights.startswith(MODEL_URI_PREFIXES):
        return create_model(model.name, model.weights, device=device, seed=seed)
    encoder = load_logged_model(model.weights)
    if encoder.spec.name != model.name:
        raise ModelError(f"weights {model.weights} are a {encoder.spec.name} model, not "
                         f"{model.name}; use model={encoder.spec.name}")
    return encoder.to(device).float().eval()


def load_logged_model(uri: str) -> Encoder:
    """Download the logged model `uri` and rebuild its encoder from its config and weights files
    (see `read_logged_encoder`); a ModelError names the URI and the file at fault."""
    import mlflow

    connect()
    where = f"the logged model {uri} from {redacted_uri(tracking_uri())}"
    with tempfile.TemporaryDirectory() as scratch:
        try:
            folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=scratch))
        except Exception as exc:
            raise ModelError(f"cannot download {where}: {exc}") from None
        files = [folder / MODEL_ARTIFACTS_DIR / name for name in (CONFIG_FILE, WEIGHTS_FILE)]
        try:
            return read_logged_encoder(*files)
        except ModelError as error:
            raise ModelError(f"cannot load {where}: {error}") from None


def model_version_for_run(run_id: str, name: str) -> tuple[str, str]:
    """The registered model version of a run's `model` as (name, version): an existing one
    (preferring registered model `name`), else a new version registered under `name`."""
    import mlflow
    from mlflow.tracking import MlflowClient

    versions = list(MlflowClient().search_model_versions(f"run_id = '{run_id}'"))
    if versions:
        chosen = max(versions, key=lambda v: (v.name == name, int(v.version)))
        return chosen.name, str(chosen.version)
    created = mlflow.register_model(f"runs:/{run_id}/{names.MODEL_ARTIFACT}", name)
    return created.name, str(created.version)


def set_model_alias(name: str, alias: str, version: str) -> None:
    """Point registry alias `alias` of model `name` at `version` (its other aliases stay)."""
    from mlflow.tracking import MlflowClient

    MlflowClient().set_registered_model_alias(name, alias, version)
