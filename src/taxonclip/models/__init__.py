"""Image encoders by name (`list_models`, `create_model`) and their rebuilding from checkpoints."""

from taxonclip.models.registry import (Encoder, ModelSpec, create_model, encoder_from_config,
                                       get_spec, list_models, load_encoder, spec_from_config)

__all__ = ["Encoder", "ModelSpec", "create_model", "encoder_from_config", "get_spec",
           "list_models", "load_encoder", "spec_from_config"]
