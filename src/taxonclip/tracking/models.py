"""Models in MLflow: logging a trained encoder as a run's `model`, and resolving a model
reference (a registry name or a logged model's URI) to an encoder.

A logged model is an MLflow pyfunc model from code (`pyfunc_model.py`) with two artifacts:

    model/MLmodel, pyfunc_model.py, requirements.txt, ...   MLflow's files
    model/artifacts/config.json                             Encoder.config(): the registry spec
    model/artifacts/weights.pt                              its state dict (torch.save)

Loading it unpickles nothing: the config is JSON and the weights are read with torch's
weights-only loader, which refuses any pickled object other than tensors and plain values.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import torch

from taxonclip import names
from taxonclip.config import ModelConfig
from taxonclip.errors import ModelError
from taxonclip.models.registry import (Encoder, create_model, encoder_from_config,
                                       spec_from_config)
from taxonclip.models.weights import unreadable_weights
from taxonclip.tracking.connection import activated, connect, redacted_uri, tracking_uri

MODEL_URI_PREFIXES = ("runs:/", "models:/")
# Requirements of the logged model, given explicitly: inferring them re-imports the model in a
# subprocess, which costs far more than the logging itself.
MODEL_REQUIREMENTS = ["taxonclip", "torch", "torchvision", "openai-clip"]
PYFUNC_MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
# The model's artifacts, by their name in the pyfunc `artifacts` and their file name; MLflow
# keeps each one as <MODEL_ARTIFACTS_DIR>/<file name> in the model.
MODEL_ARTIFACTS_DIR = "artifacts"
CONFIG_ARTIFACT, CONFIG_FILE = "config", "config.json"
WEIGHTS_ARTIFACT, WEIGHTS_FILE = "weights", "weights.pt"
LOGGED_WEIGHTS_KIND = "a state dict of tensors saved with torch.save, as `train` logs it"


def log_model(run_id: str, encoder: Encoder, register_as: str | None = None) -> str:
    """Log the encoder as the run's MLflow model `model` (the layout above), registered under
    `register_as` when given; returns the model's URI."""
    import mlflow

    with tempfile.TemporaryDirectory() as scratch:
        artifacts = write_encoder_files(encoder, Path(scratch))
        with activated(run_id), warnings.catch_warnings():
            # No input example: one of full-size images is megabytes of JSON, and MLflow would
            # load the model once more to check it; the signature says what the model takes.
            warnings.filterwarnings("ignore", message=".*An input example was not provided")
            # A path, not an instance: an instance would be cloudpickled into the model.
            info = mlflow.pyfunc.log_model(
                name=names.MODEL_ARTIFACT, python_model=str(PYFUNC_MODEL_CODE),
                artifacts={key: str(path) for key, path in artifacts.items()},
                signature=_signature(encoder), pip_requirements=MODEL_REQUIREMENTS,
                registered_model_name=register_as)
    return info.model_uri


def write_encoder_files(encoder: Encoder, folder: Path) -> dict[str, Path]:
    """Write the encoder's config (JSON) and CPU state dict into `folder`, by artifact name."""
    config, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    config.write_text(json.dumps(encoder.config(), indent=2))
    torch.save({key: value.detach().cpu() for key, value in encoder.state_dict().items()}, weights)
    return {CONFIG_ARTIFACT: config, WEIGHTS_ARTIFACT: weights}


def _signature(encoder: Encoder):
    """The pyfunc's contract: float32 images (B, 3, size, size) in, embeddings (B, dim) out."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    size, dim = encoder.spec.input_size, encoder.spec.embed_dim
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, size, size))]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, dim))]))


def resolve_model(model: ModelConfig, device: str = "cpu", seed: int = 0) -> Encoder:
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


def read_logged_encoder(config_path: Path, weights_path: Path) -> Encoder:
    """The encoder of a logged model's config JSON and weights file, in eval mode on the CPU.

    Nothing is unpickled: a file that holds anything but JSON, or tensors and plain values, is
    refused with a ModelError naming it."""
    missing = [path.name for path in (config_path, weights_path) if not path.is_file()]
    if missing:
        raise ModelError(f"{' and '.join(missing)} missing: not a model as taxonclip logs it "
                         f"(earlier versions logged a pickle, which is not loaded; a checkpoint "
                         f"of its run, checkpoints/epoch_NNN.pt, loads as weights=/path)")
    config = _read_config(config_path)
    state_dict = _read_state_dict(weights_path)
    try:
        return encoder_from_config(config, state_dict).eval()
    except (ModelError, TypeError, ValueError, RuntimeError) as error:
        # TypeError and the like: an architecture in the config that the towers do not take.
        raise ModelError(f"{config_path.name} and {weights_path.name} do not make an encoder: "
                         f"{error}") from None


def _read_config(path: Path) -> dict:
    """The `Encoder.config()` dict in a config JSON file, its spec checked."""
    try:
        config = json.loads(path.read_text())
        spec_from_config(config)
    except (OSError, UnicodeDecodeError, ValueError, ModelError) as error:
        raise ModelError(f"{path.name} is not a model config written by taxonclip "
                         f"({type(error).__name__}: {error})") from None
    return config


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a weights file, read with torch's weights-only loader."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load reports a damaged file under many exception types
        raise unreadable_weights(path.name, error, LOGGED_WEIGHTS_KIND) from None
    if not (isinstance(state_dict, dict)
            and all(isinstance(key, str) and torch.is_tensor(value)
                    for key, value in state_dict.items())):
        raise ModelError(f"weights file {path.name} holds a {type(state_dict).__name__}, not "
                         f"{LOGGED_WEIGHTS_KIND}")
    return state_dict
