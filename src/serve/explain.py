"""Where the network looked: class activation maps (pytorch-grad-cam) and their pictures.

`heatmaps` gives, for an input batch and a list of classes per image, one map per (image,
class): float32 in [0, 1] at the input's size, from HiResCAM (default) or Grad-CAM on the
target layer. The target layer is the last `nn.Conv2d` of the network (for the repository's
models, the last convolution before the linear head: `conv.2` of TinyConv, `conv2d.2` of
VGG16) unless one is named (`--target-layer`, `[explain] target_layer`), e.g. for a forked
model whose last convolution is not the one to look at.

`overlay` lays a map over an image; `save_gallery` draws the end-of-run picture
`plots/explanations.png`: a few validation images, their true labels, the predicted
probabilities and the map of each true class.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from src.errors import ConfigError

CAMS = ("hirescam", "gradcam")
MAX_CLASSES_SHOWN = 4  # heatmaps per gallery row
TILE = 160  # side of a picture in the gallery, pixels


def find_target_layer(net: nn.Module, name: str = "") -> tuple[str, nn.Module]:
    """(name, module) of the layer to explain: `name`, else the last nn.Conv2d."""
    modules = dict(net.named_modules())
    convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
    if name:
        if name not in modules:
            shown = ", ".join(convs[-3:]) or "none"
            raise ConfigError(
                f"The model {type(net).__name__} has no layer {name!r}; name one of its modules "
                f"(its last convolutions: {shown})."
            )
        return name, modules[name]
    if not convs:
        raise ConfigError(
            f"The model {type(net).__name__} has no nn.Conv2d layer to explain; name the layer "
            "with --target-layer (or [explain] target_layer)."
        )
    return convs[-1], modules[convs[-1]]


class _Logits(nn.Module):
    """The network with `forward(x) -> logits` (pytorch-grad-cam wants a tensor, not a dict)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)["out"]


def heatmaps(
    net: nn.Module,
    x: torch.Tensor,
    classes: Sequence[Sequence[int]],
    cam: str = "hirescam",
    target_layer: str = "",
) -> list[list[np.ndarray]]:
    """maps[i][j]: float32 [S, S] in [0, 1] for image x[i] and class classes[i][j].

    x: float32 [N, C, S, S], as the network is fed. Each map is scaled to [0, 1] on its own
    (pytorch-grad-cam's scaling); all zeros where the class has no positive evidence."""
    from pytorch_grad_cam import GradCAM, HiResCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if cam not in CAMS:
        raise ConfigError(f"Unknown CAM method {cam!r}; use one of {', '.join(CAMS)}.")
    _, layer = find_target_layer(net, target_layer)
    pairs = [(i, int(c)) for i, row in enumerate(classes) for c in row]
    maps: list[list[np.ndarray]] = [[] for _ in classes]
    if not pairs:
        return maps
    was_training = net.training
    method = HiResCAM if cam == "hirescam" else GradCAM
    try:
        with torch.enable_grad(), method(model=_Logits(net), target_layers=[layer]) as explainer:
            inputs = x[[i for i, _ in pairs]]
            targets = [ClassifierOutputTarget(c) for _, c in pairs]
            found = explainer(input_tensor=inputs, targets=targets)
    finally:
        net.zero_grad(set_to_none=True)
        net.train(was_training)
    for (i, _), m in zip(pairs, found):
        maps[i].append(np.asarray(m, dtype=np.float32))
    return maps


def resized(heatmap: np.ndarray, height: int, width: int) -> np.ndarray:
    """A map [h, w] at [height, width] (bilinear), still in [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(heatmap, dtype=np.float32))[None, None]
    out = torch.nn.functional.interpolate(t, size=(height, width), mode="bilinear")
    return out[0, 0].clamp_(0, 1).numpy()


def overlay(image: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3]: the RGB image with the map (resized to it) laid over in a colour map."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    h, w = image.shape[:2]
    rgb = image.astype(np.float32) / 255
    return show_cam_on_image(rgb, resized(heatmap, h, w), use_rgb=True, image_weight=0.5)


def display_image(data: torch.Tensor, input_transform: Any) -> np.ndarray:
    """A sample's `data` [C, H, W] as an RGB picture uint8 [H, W, 3]: uint8 as it is, float
    un-normalized with the transform's mean/std when it has them, else scaled to 0..255."""
    if data.dtype == torch.uint8:
        pixels = data.float()
    else:
        mean = getattr(input_transform, "mean", None)
        std = getattr(input_transform, "std", None)
        if mean is not None and std is not None:
            shape = (-1, 1, 1)
            pixels = (data * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)) * 255
        else:
            low, high = data.min(), data.max()
            pixels = (data - low) / max(float(high - low), 1e-12) * 255
    pixels = pixels.clamp(0, 255).round().to(torch.uint8)
    if pixels.shape[0] == 1:
        pixels = pixels.repeat(3, 1, 1)
    return pixels[:3].permute(1, 2, 0).numpy()


def save_gallery(
    images: Sequence[np.ndarray],
    classes: Sequence[Sequence[int]],
    true: Sequence[Sequence[int]],
    probs: np.ndarray,
    maps: Sequence[Sequence[np.ndarray]],
    label_meanings: Sequence[str],
    path: Path,
) -> Path:
    """One row per image: the image under its true labels and top probabilities, then the
    overlay of each class in `classes` (its true classes, or the most probable one). Drawn
    with Pillow (a few ms; matplotlib would add a second to every run)."""
    from PIL import Image, ImageDraw

    cols = 1 + max((len(c) for c in classes), default=1)
    text_h = 14 * 4 + 4  # four lines of Pillow's default font
    sheet = Image.new("RGB", (cols * TILE, len(images) * (TILE + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, image in enumerate(images):
        top = r * (TILE + text_h)
        names = ", ".join(label_meanings[k] for k in true[r]) or "none"
        best = np.argsort(-probs[r])[:3]
        lines = [f"true: {names}"] + [f"{label_meanings[k]} {probs[r, k]:.2f}" for k in best]
        tiles = [image] + [overlay(image, m) for m in maps[r]]
        captions = ["\n".join(lines)] + [
            label_meanings[k] + ("" if k in true[r] else " (top)") for k in classes[r]
        ]
        for c, (tile, caption) in enumerate(zip(tiles, captions)):
            picture = Image.fromarray(tile).resize((TILE, TILE), Image.Resampling.NEAREST)
            sheet.paste(picture, (c * TILE, top))
            draw.multiline_text((c * TILE + 2, top + TILE + 1), caption, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def gallery_rows(labels: np.ndarray, probs: np.ndarray, n: int) -> list[int]:
    """The first `n` images with a true label, then others when there are too few."""
    labelled = [i for i in range(len(labels)) if labels[i].any()]
    others = [i for i in range(len(labels)) if not labels[i].any()]
    return (labelled + others)[:n]


def classes_to_show(label_row: np.ndarray, prob_row: np.ndarray) -> list[int]:
    """The true classes of an image (at most MAX_CLASSES_SHOWN), or its most probable one."""
    true = [int(k) for k in np.flatnonzero(label_row)][:MAX_CLASSES_SHOWN]
    return true or [int(np.argmax(prob_row))]
