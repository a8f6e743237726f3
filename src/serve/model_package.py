"""The best weights of a run as an MLflow model: `runs:/<run id>/model`, a pyfunc that takes
RGB images and returns per-label probabilities.

Input: uint8 numpy images [N, H, W, 3] (RGB) of any H and W, or integers 0-255 of another type
(JSON requests to `mlflow models serve`); anything else is refused in one line. Each image becomes
a model input through the dataset's own `input_transform` (what its `__getitem__` makes of a
decoded image: resize, and normalization when the dataset normalizes on the CPU), then through the
training loop's `BatchPrep` (normalization with `mean_std` when the dataset returns uint8), so an
image the dataset would have read gets exactly the probabilities the run's metrics were computed
from. Output: a pandas DataFrame, one row per image, one column per label (`label_meanings`),
sigmoid probabilities (softmax for a multiclass problem).

The model also holds the per-label thresholds chosen on the validation split (`thresholds`,
used by `python -m src.serve.predict`) and the name of the layer the explanations look at.
Loading it needs this repository's code: the Python files of `src/`, `load_dataset/` and the model's
package travel with it (the model's `code/` folder).
"""

from __future__ import annotations

import importlib.metadata
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import ColSpec, Schema
from PIL import Image

import src.tracking as tracking
from src.config import REPO_ROOT
from src.errors import ConfigError, one_line
from src.train.build import import_class
from src.train.loop import BatchPrep, to_probs

MODEL_NAME = "model"  # runs:/<run id>/model
CHUNK = 64  # images per forward pass
EXAMPLE_SIDE = 32  # the input example: a grey 32 x 32 image (the model resizes it)
PIP_PACKAGES = ("torch", "torchvision", "numpy", "pandas", "pillow", "mlflow", "grad-cam")


def input_transform_of(dataset: Any) -> Callable[[Any], torch.Tensor] | None:
    """What turns a decoded RGB image (PIL) into the dataset's sample `data`: its
    `input_transform`, else its torchvision `transform` (e.g. ImageFolder's Compose, which
    gets the RGB image its loader decodes), else None (no MLflow model then)."""
    for name in ("input_transform", "transform"):
        transform = getattr(dataset, name, None)
        if callable(transform):
            return transform
    return None


@dataclass(frozen=True)
class ClassifierSpec:
    """What the network needs besides its weights: the model class (import path) and its
    arguments, the labels, the problem, the input transform and `mean_std` (when the dataset
    returns uint8); the per-label thresholds and the target layer of the explanations."""

    model_path: str
    model_args: dict[str, Any]
    label_meanings: list[str]
    problem: str
    input_transform: Callable[[Any], torch.Tensor]
    mean_std: Any = None
    thresholds: list[float] | None = None
    target_layer: str = ""


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """The pyfunc: images [N, H, W, 3] uint8 -> DataFrame of probabilities [N, K].

    `spec` says how to build the network and feed it; the weights are the artifact `weights`
    (best.pt).
    """

    def __init__(self, spec: ClassifierSpec) -> None:
        self.spec = spec
        self.net: torch.nn.Module | None = None
        self.device = torch.device("cpu")

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "net": None}  # the weights travel as the artifact

    def load_context(self, context: Any) -> None:
        self.load_weights(context.artifacts["weights"])

    def load_weights(self, path: str | Path) -> None:
        """Build the network from its class and arguments and load best.pt into it."""
        cls = import_class(self.spec.model_path, "[model] model", "model")
        net = cls(**self.spec.model_args)
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
        return pd.DataFrame(self.probabilities(model_input), columns=self.spec.label_meanings)

    def model_inputs(self, images: Any) -> torch.Tensor:
        """float32 [N, C, S, S] on the device, as the training loop feeds the network."""
        batch = check_images(images)
        transform = self.spec.input_transform
        data = torch.stack([transform(Image.fromarray(np.ascontiguousarray(im))) for im in batch])
        prep = BatchPrep(self.spec, self.device, channels_last=False)
        x, _ = prep({"data": data, "label": torch.zeros(len(data), len(self.spec.label_meanings))})
        return x

    @torch.no_grad()
    def probabilities(self, images: Any) -> np.ndarray:
        """float32 [N, K] probabilities of images uint8 [N, H, W, 3] (or a list of them)."""
        batch = check_images(images)
        out = [np.zeros((0, len(self.spec.label_meanings)), np.float32)]
        for start in range(0, len(batch), CHUNK):
            logits = self.net(self.model_inputs(batch[start : start + CHUNK]))["out"].float()
            out.append(to_probs(logits, self.spec.problem).cpu().numpy())
        return np.concatenate(out)

    def predicted(self, probs: np.ndarray, thresholds: Sequence[float] | None) -> np.ndarray:
        """bool [N, K]: `called_positive` with the stored thresholds unless `thresholds` is
        given."""
        chosen = thresholds if thresholds is not None else self.spec.thresholds
        return called_positive(probs, self.spec.problem, chosen)


def called_positive(
    probs: np.ndarray, problem: str, thresholds: Sequence[float] | None
) -> np.ndarray:
    """bool [N, K]: the most probable class (multiclass), else probability >= threshold (0.5
    without thresholds)."""
    if problem == "multiclass":
        return np.eye(probs.shape[1], dtype=bool)[probs.argmax(1)]
    return probs >= np.asarray(thresholds if thresholds is not None else 0.5, dtype=np.float32)


class InputError(MlflowException):
    """An input the model refuses, in one line (HTTP 400 from `mlflow models serve`). The server
    puts the whole input in front of the message of an MlflowException that `predict` raises
    (thousands of characters for one image); this one keeps its line."""

    def __init__(self, line: str) -> None:
        self.line = line
        super().__init__(line, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self.line

    @message.setter
    def message(self, _: str) -> None:
        pass


def check_images(images: Any) -> list[np.ndarray] | np.ndarray:
    """`images` (integers 0-255 [N, H, W, 3], or a list of [H, W, 3] of any sizes) as uint8: any
    integer type, since JSON numbers reach the server as int64; InputError in one line for
    anything else (floats, booleans, values outside 0-255, another shape)."""
    if isinstance(images, (list, tuple)):
        return [check_images(np.asarray(image)[None])[0] for image in images]
    array = np.asarray(images)
    expected = "The model takes RGB images [N, H, W, 3] of integers 0-255 (uint8)"
    if array.ndim != 4 or array.shape[-1] != 3 or not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"{expected}; got {array.dtype} {list(array.shape)}.")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise InputError(f"{expected}; got {array.dtype} values {array.min()} to {array.max()}.")
    return array.astype(np.uint8, copy=False)


# ------------------------------------------------------------------ logging


def code_folders(model_path: str, dataset_path: str, into: Path) -> list[str]:
    """Copies of the Python files the model needs to load (src/, load_dataset/, the packages
    of the model and dataset classes when they are this repository's), under `into`."""
    tops = ["src", "load_dataset", "models"]
    tops += [p.partition(":")[0].split(".")[0] for p in (model_path, dataset_path)]
    for top in dict.fromkeys(tops):  # a package's .py files, or the module top.py
        for file in [*REPO_ROOT.glob(f"{top}.py"), *(REPO_ROOT / top).rglob("*.py")]:
            copy = into / file.relative_to(REPO_ROOT)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(file, copy)
    return sorted(str(path) for path in into.iterdir())


def signature(label_meanings: Sequence[str]) -> ModelSignature:
    """Outputs only: with an input schema MLflow would check the input first, in a message that
    holds the whole array, and `mlflow models serve` would cast JSON floats to uint8 (0.9 -> 0)."""
    return ModelSignature(
        outputs=Schema([ColSpec("float", name) for name in label_meanings]),
    )


def input_example() -> np.ndarray:
    """What the model is logged with as its example input: one grey image."""
    return np.full((1, EXAMPLE_SIDE, EXAMPLE_SIDE, 3), 128, np.uint8)


def pip_requirements() -> list[str]:
    return [f"{name}=={importlib.metadata.version(name)}" for name in PIP_PACKAGES]


def pyfunc_model(
    classifier: ImageClassifier, best_path: Path, code_from: tuple[str, str], into: Path
) -> dict[str, Any]:
    """The arguments of MLflow's `Model.log` for `classifier` with the weights `best_path`
    (src/tracking.py logs it); the code it needs is copied under `into` (a temporary folder
    that must outlive the logging)."""
    return {
        "flavor": mlflow.pyfunc,
        "python_model": classifier,
        "artifacts": {"weights": str(best_path)},
        "code_paths": code_folders(*code_from, into),
        "signature": signature(classifier.spec.label_meanings),
        "input_example": input_example(),
        "pip_requirements": pip_requirements(),
    }


def load(model_uri: str) -> ImageClassifier:
    """The ImageClassifier of an MLflow model URI (runs:/, models:/, a folder), weights loaded."""
    try:
        with tracking.quiet():
            classifier = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    except Exception as e:  # MLflow's errors for a URI, a store or a folder that is not there
        raise ConfigError(f"The MLflow model {model_uri} cannot be loaded: {one_line(e)}") from None
    if not isinstance(classifier, ImageClassifier):
        raise ConfigError(f"{model_uri} is not a model logged by this repository's training runs.")
    return classifier
