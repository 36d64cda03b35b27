"""The logged model against a real MLflow server: its layout (a pyfunc model from code with a
config JSON and a state dict), loading it back through `runs:/`, `models:/<name>/<version>` and
`models:/<name>@<alias>` with equal embeddings, `mlflow.pyfunc`, and a planted pickle in the
artifact store (or given as `weights=`) that is refused without ever running."""

from __future__ import annotations

import pathlib
import pickle

import mlflow
import numpy as np
import pytest
import torch
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

from taxonclip import names
from taxonclip.config import ModelConfig
from taxonclip.errors import ModelError
from taxonclip.models import Encoder, create_model
from taxonclip.tracking import queries
from taxonclip.tracking.models import model_version_for_run, resolve_model, set_model_alias
from taxonclip.tracking.runs import tracked_run

pytestmark = pytest.mark.integration

EXPERIMENT = "model-logging"
CAPTIONS = ["a photograph of Vanessa atalanta"]
# How a planted file is written: by torch.save (a zip, as the real weights are) or as a bare
# pickle at the highest protocol.
PLANTED_FORMS = ("torch.save", "pickle")
# What the refusal of each says: torch.save's zip names the object; a bare pickle at protocol 5
# fails on its first opcode, before reaching any.
REFUSALS = {"torch.save": "holds pickled Python objects (getattr)",
            "pickle": "it is not a file of tensors written by torch.save"}
# torch notes that a bare pickle has an unusual protocol before it refuses the file.
ignore_protocol_note = pytest.mark.filterwarnings("ignore:Detected pickle protocol")


@pytest.fixture
def tracking(tracking, monkeypatch) -> str:
    """The session's MLflow server, with runs going to this module's experiment; by the
    environment, as `mlflow.set_experiment` would stay in force for the tests after these."""
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    return tracking


class PlantedPayload:
    """Stands in for code hidden in a weights file: unpickling it creates the file `marker`."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def plant_pickle(path: pathlib.Path, marker: pathlib.Path, form: str) -> pathlib.Path:
    """Write a "state dict" whose unpickling creates `marker` to `path`, in `form`."""
    payload = {"visual.proj": PlantedPayload(marker)}
    if form == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
    return path


def logged(register_as: str | None = None, seed: int = 0) -> tuple[Encoder, str, str]:
    """A tiny encoder drawn from `seed`, logged by `Run.log_model` in a run of its own; returns it,
    its `runs:/<run_id>/model` URI and its logged model URI (`models:/<model_id>`)."""
    encoder = create_model("tiny", weights="none", seed=seed)
    with tracked_run("train") as run:
        run.log_model(encoder, register_as=register_as)
    client = MlflowClient()
    [model] = client.search_logged_models(
        [client.get_run(run.run_id).info.experiment_id],
        filter_string=f"source_run_id = '{run.run_id}' AND name = '{names.MODEL_ARTIFACT}'")
    return encoder, f"runs:/{run.run_id}/{names.MODEL_ARTIFACT}", f"models:/{model.model_id}"


def assert_same_encoder(loaded: Encoder, original: Encoder) -> None:
    """Same spec and bit-identical image and text embeddings, in eval mode."""
    images = torch.randn(3, 3, 32, 32)
    assert loaded.spec == original.spec and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), original(images), rtol=0, atol=0)
        torch.testing.assert_close(loaded.encode_text(CAPTIONS), original.encode_text(CAPTIONS),
                                   rtol=0, atol=0)


def overwrite_weights(model_uri: str, replacement: pathlib.Path) -> None:
    """Replace artifacts/weights.pt of a logged model in the server's artifact store."""
    model_id = model_uri.removeprefix("models:/")
    location = MlflowClient().get_logged_model(model_id).artifact_location
    staged = replacement.parent / "upload" / "weights.pt"
    staged.parent.mkdir(exist_ok=True)
    staged.write_bytes(replacement.read_bytes())
    get_artifact_repository(location).log_artifact(str(staged), "artifacts")


def tampered_copy(uri: str, folder: pathlib.Path, tamper) -> str:
    """Download the logged model `uri` into `folder`, change it with `tamper(model_folder)` and
    upload it as the `model` artifact folder of a new run; returns that run's model URI."""
    copy = pathlib.Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(folder)))
    tamper(copy)
    with tracked_run("train") as run:
        run.log_artifact(copy, names.MODEL_ARTIFACT)
    return f"runs:/{run.run_id}/{names.MODEL_ARTIFACT}"


def test_the_logged_model_is_code_config_and_weights_without_pickle(tracking, recwarn):
    _, uri, model_uri = logged(seed=1)
    files = {f.path for folder in ("", "/artifacts")
             for f in mlflow.artifacts.list_artifacts(f"{uri}{folder}")}
    assert {"model/MLmodel", "model/pyfunc_model.py", "model/artifacts/config.json",
            "model/artifacts/weights.pt"} <= files
    assert not [path for path in files if path.endswith((".pkl", ".pth"))]
    mlmodel = mlflow.models.Model.load(model_uri)
    assert list(mlmodel.flavors) == ["python_function"]
    assert mlmodel.flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    # Logging warns about nothing (the pickle format made MLflow warn at every training's end).
    assert not [str(w.message) for w in recwarn if "mlflow" in w.filename]


def test_runs_uri_loads_an_equal_encoder(tracking):
    encoder, uri, _ = logged(seed=2)
    assert_same_encoder(resolve_model(ModelConfig(uri)), encoder)


def test_registered_version_and_alias_load_an_equal_encoder(tracking):
    name = "model-logging-registered"
    encoder, uri, _ = logged(register_as=name, seed=3)
    MlflowClient().set_registered_model_alias(name, "champion", "1")
    for reference in (f"models:/{name}/1", f"models:/{name}@champion"):
        assert_same_encoder(resolve_model(ModelConfig(reference)), encoder)


def test_promote_registers_and_aliases_a_logged_model_that_loads(tracking):
    """What `compare --promote` does: find runs with a logged `model`, register, set an alias."""
    name = "model-logging-promoted"
    encoder, uri, _ = logged(seed=4)
    run_id = uri.split("/")[1]
    experiment_id = MlflowClient().get_run(run_id).info.experiment_id
    assert run_id in queries.runs_with_logged_model([experiment_id])
    registered, version = model_version_for_run(run_id, name)
    set_model_alias(registered, "challenger", version)
    assert_same_encoder(resolve_model(ModelConfig(f"models:/{name}@challenger")), encoder)


def test_pyfunc_predicts_the_embeddings(tracking):
    encoder, uri, _ = logged(seed=5)
    images = torch.randn(4, 3, 32, 32)
    model = mlflow.pyfunc.load_model(uri)
    embeddings = model.predict(images.numpy())
    assert isinstance(embeddings, np.ndarray) and embeddings.shape == (4, 64)
    with torch.no_grad():
        np.testing.assert_array_equal(embeddings, encoder(images).numpy())
        np.testing.assert_array_equal(model.unwrap_python_model().predict(None, images),
                                      encoder(images).numpy())


def test_the_planted_pickle_runs_code_when_unpickled(tmp_path):
    """The payload of the tests below is real: any loader that unpickles it creates the marker."""
    for form in PLANTED_FORMS:
        marker = tmp_path / f"marker-{form}"
        planted = plant_pickle(tmp_path / f"planted-{form}.pt", marker, form)
        if form == "torch.save":
            torch.load(planted, weights_only=False)
        else:
            pickle.loads(planted.read_bytes())
        assert marker.exists()


@ignore_protocol_note
@pytest.mark.parametrize("form", PLANTED_FORMS)
def test_planted_pickle_in_the_artifact_store_never_runs(tracking, tmp_path, form):
    name = f"model-logging-tampered-{form.replace('.', '-')}"
    marker = tmp_path / "marker"
    _, uri, model_uri = logged(register_as=name, seed=6)
    MlflowClient().set_registered_model_alias(name, "champion", "1")
    overwrite_weights(model_uri, plant_pickle(tmp_path / "planted.pt", marker, form))
    for reference in (uri, f"models:/{name}/1", f"models:/{name}@champion"):
        with pytest.raises(ModelError) as error:
            resolve_model(ModelConfig(reference))
        message = str(error.value)
        assert f"cannot load the logged model {reference} from {tracking}" in message
        assert "weights.pt" in message and REFUSALS[form] in message
        assert "weights_only" not in message
    with pytest.raises(ModelError, match="weights.pt"):
        mlflow.pyfunc.load_model(uri)
    assert not marker.exists()


def test_planted_pickle_uploaded_as_a_runs_model_never_runs(tracking, tmp_path):
    """A tampered copy of a logged model uploaded as another run's `model` artifact folder."""
    _, uri, _ = logged(seed=7)
    marker = tmp_path / "marker"
    tampered = tampered_copy(uri, tmp_path / "copy", lambda model: plant_pickle(
        model / "artifacts" / "weights.pt", marker, "torch.save"))
    with pytest.raises(ModelError, match="holds pickled Python objects") as error:
        resolve_model(ModelConfig(tampered))
    assert tampered in str(error.value) and "weights.pt" in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize("file, content, expected", [
    ("config.json", b"{not json", "config.json is not a model config written by taxonclip"),
    ("config.json", b'{"spec": {"source": "tiny"}}', "config.json is not a model config"),
    ("weights.pt", b"not a torch file", "cannot read weights file weights.pt"),
])
def test_malformed_artifact_names_the_uri_and_the_file(tracking, tmp_path, file, content,
                                                       expected):
    _, uri, _ = logged(seed=8)
    broken = tampered_copy(uri, tmp_path / "copy",
                           lambda model: (model / "artifacts" / file).write_bytes(content))
    with pytest.raises(ModelError, match=expected) as error:
        resolve_model(ModelConfig(broken))
    assert broken in str(error.value) and "weights_only" not in str(error.value)


def test_a_model_in_the_former_pickle_format_is_refused(tracking, tmp_path):
    _, uri, _ = logged(seed=10)
    marker = tmp_path / "marker"

    def as_pickle_format(model: pathlib.Path) -> None:
        for file in (model / "artifacts").iterdir():
            file.unlink()
        (model / "data").mkdir()
        plant_pickle(model / "data" / "model.pth", marker, "torch.save")

    former = tampered_copy(uri, tmp_path / "copy", as_pickle_format)
    with pytest.raises(ModelError, match="config.json and weights.pt missing: .*earlier "
                                         "versions logged a pickle"):
        resolve_model(ModelConfig(former))
    assert not marker.exists()


def test_weights_of_another_model_name_both_files(tracking, tmp_path):
    _, uri, _ = logged(seed=9)
    other = tampered_copy(uri, tmp_path / "copy", lambda model: torch.save(
        {"visual.proj": torch.zeros(2, 2)}, model / "artifacts" / "weights.pt"))
    with pytest.raises(ModelError, match="config.json and weights.pt do not make an encoder: .*"
                                         "does not fit model tiny"):
        resolve_model(ModelConfig(other))


@ignore_protocol_note
@pytest.mark.parametrize("form", PLANTED_FORMS)
def test_planted_pickle_as_a_weights_file_never_runs(tmp_path, form):
    marker = tmp_path / "marker"
    planted = plant_pickle(tmp_path / "planted.pt", marker, form)
    with pytest.raises(ModelError, match=f"weights file {planted}") as error:
        create_model("tiny", weights=str(planted))
    assert REFUSALS[form] in str(error.value) and "weights_only" not in str(error.value)
    assert "TorchScript archive" in str(error.value)  # says which files it does take
    assert not marker.exists()
