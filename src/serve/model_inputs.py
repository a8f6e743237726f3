"""What turns a decoded image into a dataset's sample, for the MLflow model: a module without
MLflow, so the training process can find it without importing MLflow (src/tracking_service.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

MODEL_NAME = "model"  # runs:/<run id>/model


@dataclass(frozen=True)
class TransformInput:
    """A torchvision-style dataset's `transform` (e.g. ImageFolder's Compose) as an input
    transform: it gets the decoded RGB image, as the dataset's loader gives it."""

    transform: Callable[[Any], torch.Tensor]

    def __call__(self, image: Any) -> torch.Tensor:
        return self.transform(image.convert("RGB"))


def input_transform_of(dataset: Any) -> Callable[[Any], torch.Tensor] | None:
    """What turns a decoded RGB image (PIL) into the dataset's sample `data`: its
    `input_transform`, else its torchvision `transform`, else None (no MLflow model then)."""
    transform = getattr(dataset, "input_transform", None)
    if callable(transform):
        return transform
    transform = getattr(dataset, "transform", None)
    return TransformInput(transform) if callable(transform) else None
