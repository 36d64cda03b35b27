"""The MLflow pyfunc model of a logged encoder, logged as code (MLflow's models from code): MLflow
copies this file into the model and runs it to load the model, so no pickle is involved.
`load_context` rebuilds the encoder from the model's two artifacts, its config as JSON and its
state dict read with torch's weights-only loader (`tracking.models.read_logged_encoder`);
`predict` embeds a batch of preprocessed images.

    model = mlflow.pyfunc.load_model("runs:/<run_id>/model")
    embeddings = model.predict(images)  # float32 (B, embed_dim) from (B, 3, size, size)

Imported as `taxonclip.tracking.pyfunc_model`, the file only defines `EncoderModel`.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel


class EncoderModel(PythonModel):
    """Embeds preprocessed images (`Encoder.eval_transform()` output) with the logged encoder."""

    def load_context(self, context) -> None:
        """Rebuild the encoder, on the CPU, from the `config` and `weights` artifacts."""
        from taxonclip.tracking.models import CONFIG_ARTIFACT, WEIGHTS_ARTIFACT, read_logged_encoder

        self.encoder = read_logged_encoder(Path(context.artifacts[CONFIG_ARTIFACT]),
                                           Path(context.artifacts[WEIGHTS_ARTIFACT]))

    # The hint is one from which MLflow infers nothing: the logged signature says the shapes.
    def predict(self, context, model_input: np.ndarray, params=None):
        """Embeddings, float32 (B, embed_dim) and not normalised, of a batch of images
        (B, 3, input_size, input_size): a float32 numpy array (what the signature of the logged
        model admits through `mlflow.pyfunc`), or a torch tensor where this is called directly."""
        images = torch.as_tensor(model_input, dtype=torch.float32, device="cpu")
        with torch.inference_mode():
            return self.encoder(images).numpy()


# MLflow runs this file as a module of another name and loads the model it sets; imported as part
# of taxonclip, the file has no such side effect.
if __name__ != "taxonclip.tracking.pyfunc_model":
    mlflow.models.set_model(EncoderModel())
