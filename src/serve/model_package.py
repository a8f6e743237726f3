"""The best weights of a run as an MLflow model: `runs:/<run id>/model`, a pyfunc that takes
RGB images and returns per-label probabilities.

Input: uint8 numpy images [N, H, W, 3] (RGB) of any H and W. Each image becomes a model input
through the dataset's own `input_transform` (what its `__getitem__` makes of a decoded image:
resize, and normalization when the dataset normalizes on the CPU), then through the training
loop's `BatchPrep` (normalization with `mean_std` when the dataset returns uint8), so an image
the dataset would have read gets exactly the probabilities the run's metrics were computed
from. Output: a pandas DataFrame, one row per image, one column per label (`label_meanings`),
sigmoid probabilities (softmax for a multiclass problem).

The model also holds the per-label thresholds chosen on the validation split (`thresholds`,
used by `python -m src.serve.predict`) and the name of the layer the explanations look at.
Loading it needs this repository's code: the Python files of `src/`, `load_dataset/` and the model's
package travel with it (the model's `code/` folder).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch

from src.config import REPO_ROOT
from src.serve.model_inputs import (  # noqa: F401 (models logged before the move name them here)
    MODEL_NAME,
    TransformInput,
    input_transform_of,
)

CHUNK = 64  # images per forward pass
EXAMPLE_SIDE = 32  # the input example: a grey 32 x 32 image (the model resizes it)
PIP_PACKAGES = ("torch", "torchvision", "numpy", "pandas", "pillow", "mlflow", "grad-cam")


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """The pyfunc: images [N, H, W, 3] uint8 -> DataFrame of probabilities [N, K].

    Holds what the network needs besides its weights: the model class (import path) and its
    arguments, the labels, the problem, the input transform and `mean_std`; the thresholds and
    the target layer of the explanations. The weights are the artifact `weights` (best.pt).
    """

    def __init__(
        self,
        model_path: str,
        model_args: dict[str, Any],
        label_meanings: Sequence[str],
        problem: str,
        input_transform: Callable[[Any], torch.Tensor],
        mean_std: Any,
        thresholds: Sequence[float] | None = None,
        target_layer: str = "",
    ) -> None:
        self.model_path, self.model_args = model_path, dict(model_args)
        self.label_meanings, self.problem = list(label_meanings), problem
        self.input_transform, self.mean_std = input_transform, mean_std
        self.thresholds = None if thresholds is None else [float(v) for v in thresholds]
        self.target_layer = target_layer
        self.net: torch.nn.Module | None = None
        self.device = torch.device("cpu")

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "net": None}  # the weights travel as the artifact

    def load_context(self, context: Any) -> None:
        self.load_weights(context.artifacts["weights"])

    def load_weights(self, path: str | Path) -> None:
        """Build the network from its class and arguments and load best.pt into it."""
        from src.train.build import import_class

        cls = import_class(self.model_path, "[model] model", "model")
        net = cls(**self.model_args)
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state["model"])
        self.net = net.to(self.device).eval()

    def to(self, device: str | torch.device) -> ImageClassifier:
        self.device = torch.device(device)
        if self.net is not None:
            self.net.to(self.device)
        return self

    # MLflow reads the hint of `model_input`: np.ndarray asks for no checks of its own.
    def predict(self, context: Any, model_input: np.ndarray, params: Any = None) -> Any:
        """DataFrame [N, K] of probabilities of images uint8 [N, H, W, 3]."""
        import pandas as pd

        return pd.DataFrame(self.probabilities(model_input), columns=self.label_meanings)

    def model_inputs(self, images: Any) -> torch.Tensor:
        """float32 [N, C, S, S] on the device, as the training loop feeds the network."""
        from PIL import Image

        from src.train.loop import BatchPrep

        batch = check_images(images)
        data = torch.stack(
            [self.input_transform(Image.fromarray(np.ascontiguousarray(im))) for im in batch]
        )
        prep = BatchPrep(self, self.device, channels_last=False)
        x, _ = prep({"data": data, "label": torch.zeros(len(data), len(self.label_meanings))})
        return x

    @torch.no_grad()
    def probabilities(self, images: Any) -> np.ndarray:
        """float32 [N, K] probabilities of images uint8 [N, H, W, 3] (or a list of them)."""
        from src.train.loop import to_probs

        if self.net is None:
            raise RuntimeError("ImageClassifier has no weights; call load_weights first.")
        batch = check_images(images)
        out = [np.zeros((0, len(self.label_meanings)), np.float32)]
        for start in range(0, len(batch), CHUNK):
            logits = self.net(self.model_inputs(batch[start : start + CHUNK]))["out"].float()
            out.append(to_probs(logits, self.problem).cpu().numpy())
        return np.concatenate(out)

    def predicted(self, probs: np.ndarray, thresholds: Sequence[float] | None) -> np.ndarray:
        """bool [N, K]: the most probable class (multiclass), else probability >= threshold
        (the stored ones unless `thresholds` is given; 0.5 for a model without any)."""
        if self.problem == "multiclass":
            return np.eye(probs.shape[1], dtype=bool)[probs.argmax(1)]
        chosen = thresholds if thresholds is not None else self.thresholds
        return probs >= np.asarray(chosen if chosen is not None else 0.5, dtype=np.float32)


def check_images(images: Any) -> list[np.ndarray] | np.ndarray:
    """`images` (uint8 [N, H, W, 3], or a list of uint8 [H, W, 3] of any sizes) as given;
    ValueError in one sentence otherwise."""
    if isinstance(images, (list, tuple)):
        for image in images:
            check_images(np.asarray(image)[None])
        return list(images)
    array = np.asarray(images)
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
        shown = f"{array.dtype} {list(array.shape)}"
        raise ValueError(f"The model takes uint8 RGB images [N, H, W, 3]; got {shown}.")
    return array


# ------------------------------------------------------------------ logging


def code_folders(model_path: str, dataset_path: str, into: Path) -> list[str]:
    """Copies of the Python files the model needs to load (src/, load_dataset/, the packages
    of the model and dataset classes when they are this repository's), under `into`."""
    tops = ["src", "load_dataset", "models"]
    tops += [p.partition(":")[0].split(".")[0] for p in (model_path, dataset_path)]
    out = []
    for top in dict.fromkeys(tops):
        source = REPO_ROOT / top
        if source.is_dir():
            shutil.copytree(source, into / top, ignore=_not_python)
            out.append(str(into / top))
        elif (REPO_ROOT / f"{top}.py").is_file():
            shutil.copy(REPO_ROOT / f"{top}.py", into / f"{top}.py")
            out.append(str(into / f"{top}.py"))
    return out


def _not_python(folder: str, names: list[str]) -> list[str]:
    """copytree's `ignore`: everything but .py files and the folders that hold some."""

    def keep(path: Path) -> bool:
        if path.is_dir():
            return path.name != "__pycache__" and any(path.rglob("*.py"))
        return path.suffix == ".py"

    return [n for n in names if not keep(Path(folder) / n)]


def signature(label_meanings: Sequence[str]) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
        outputs=Schema([ColSpec("float", name) for name in label_meanings]),
    )


def input_example() -> np.ndarray:
    """What the model is logged with as its example input: one grey image."""
    return np.full((1, EXAMPLE_SIDE, EXAMPLE_SIDE, 3), 128, np.uint8)


def pip_requirements() -> list[str]:
    import importlib.metadata

    out = []
    for name in PIP_PACKAGES:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(name)
    return out


def log_model(
    classifier: ImageClassifier,
    best_path: Path,
    tracking_uri: str,
    run_id: str,
    step: int,
    code_from: tuple[str, str],
    register_as: str = "",
) -> Any:
    """Log `classifier` with the weights `best_path` as the model `model` of the run
    `run_id` (its metrics at `step`, the best epoch, linked to it), registered as
    `register_as` when given; the ModelInfo. No fluent run is started or left active and
    the run's status is not touched."""
    path = list(sys.path)  # loading the model to check its input example prepends code/
    try:
        with tempfile.TemporaryDirectory() as tmp, tracking_uri_set(tracking_uri), _quiet():
            return _log(classifier, best_path, run_id, step, code_from, register_as, tmp)
    finally:
        sys.path[:] = path


@contextmanager
def tracking_uri_set(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI set to `uri` for the block (`Model.log` reads only that),
    then put back as it was, MLFLOW_TRACKING_URI included (MLflow's own
    `_use_tracking_uri` deletes that variable when no URI was set before)."""
    from mlflow.tracking._tracking_service import utils

    before, env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        utils.set_tracking_uri(before)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


@contextmanager
def _quiet() -> Iterator[None]:
    """MLflow's notes while it logs a model (the CloudPickle caution, the check of the input
    example, a download bar) left out of the run's output; its errors still show."""
    loggers = [logging.getLogger(name) for name in ("mlflow.pyfunc", "mlflow.models")]
    levels = [lg.level for lg in loggers]
    bar = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar


def _log(classifier, best_path, run_id, step, code_from, register_as, tmp: str) -> Any:
    from mlflow.models import Model

    # Created here, in the run's experiment: left to itself, Model.log puts a model logged
    # without an active run into the default experiment ('0').
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    logged = client.create_logged_model(
        run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id, params=run.data.params
    )
    return Model.log(
        artifact_path=None,
        name=MODEL_NAME,
        model_id=logged.model_id,
        flavor=mlflow.pyfunc,
        run_id=run_id,
        step=step,
        python_model=classifier,
        artifacts={"weights": str(best_path)},
        code_paths=code_folders(*code_from, Path(tmp)),
        signature=signature(classifier.label_meanings),
        input_example=input_example(),
        pip_requirements=pip_requirements(),
        registered_model_name=register_as or None,
    )


def load(model_uri: str) -> ImageClassifier:
    """The ImageClassifier of an MLflow model URI (runs:/, models:/, a folder), weights loaded."""
    from src.errors import ConfigError, one_line

    try:
        with _quiet():
            classifier = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    except Exception as e:  # MLflow's errors for a URI, a store or a folder that is not there
        raise ConfigError(f"The MLflow model {model_uri} cannot be loaded: {one_line(e)}") from None
    if not isinstance(classifier, ImageClassifier):
        raise ConfigError(f"{model_uri} is not a model logged by this repository's training runs.")
    return classifier
