"""Models in MLflow: logging a trained encoder as a run's `model`, and resolving a model
reference (a registry name or a logged model's URI) to an encoder."""

from __future__ import annotations

from taxonclip import names
from taxonclip.config import ModelConfig
from taxonclip.errors import ModelError
from taxonclip.tracking.runs import activated, connect, tracking_uri

MODEL_URI_PREFIXES = ("runs:/", "models:/")
# Requirements of the logged model, given explicitly: inferring them re-imports the model in a
# subprocess, which costs far more than the logging itself.
MODEL_REQUIREMENTS = ["taxonclip", "torch", "torchvision", "openai-clip"]


def log_model(run_id: str, encoder, register_as: str | None = None) -> str:
    """Log the encoder as an MLflow PyTorch model (pickle format: it loads back as the same
    module class, usable by `eval`) and register it under `register_as` when given."""
    import mlflow

    with activated(run_id):
        info = mlflow.pytorch.log_model(
            encoder.cpu(), name=names.MODEL_ARTIFACT, serialization_format="pickle",
            pip_requirements=MODEL_REQUIREMENTS, registered_model_name=register_as)
    return info.model_uri


def resolve_model(model: ModelConfig, device: str = "cpu", seed: int = 0):
    """Build the encoder a `ModelConfig` names: a registry name (`weights=none` drawn from
    `seed`), or a logged model URI (`runs:/<run_id>/model`, `models:/<name>/<version or @alias>`)."""
    from taxonclip.models import create_model

    if not model.name.startswith(MODEL_URI_PREFIXES):
        return create_model(model.name, model.weights, device=device, seed=seed)
    import mlflow

    connect()
    try:
        encoder = mlflow.pytorch.load_model(model.name, map_location=device)
    except Exception as exc:
        raise ModelError(f"cannot load the logged model {model.name} from {tracking_uri()}: "
                         f"{exc}") from None
    return encoder.to(device).float().eval()
