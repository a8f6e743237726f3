"""Where the network looked: class activation maps (pytorch-grad-cam) and their pictures.

`heatmaps` gives, for an input batch and a list of classes per image, one map per (image,
class): float32 in [0, 1] at the input's size, from HiResCAM (default) or Grad-CAM on the
target layer. The target layer is the last `nn.Conv2d` of the network (for the repository's
models, the last convolution before the linear head: `conv.2` of TinyConv, `conv2d.2` of
VGG16) unless one is named (`--target-layer`, `[explain] target_layer`), e.g. for a forked
model whose last convolution is not the one to look at.

`overlay` lays a map over an image; `save_gallery` draws the end-of-run picture
`plots/explanations.png`: a few validation images, their true labels, the predicted
probabilities and the map of each true class. `error_rows` picks, per class, the validation
images the model is most confidently wrong about, and `save_errors` draws them with that
class's map, one picture per class (`plots/errors/<label>.png`). Both are sheets of
`save_sheet`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from pytorch_grad_cam import GradCAM, HiResCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from src.errors import ConfigError
from src.evaluate import metric_name

CAMS = {"hirescam": HiResCAM, "gradcam": GradCAM}
MAX_CLASSES_SHOWN = 4  # heatmaps per gallery row
TILE = 160  # side of a picture in the gallery, pixels
CAM_BATCH = 16  # (image, class) pairs per pass of the CAM: bounds the memory of 160 maps
ERRORS_SHOWN = 4  # false positives, and false negatives, per class in plots/errors/
MAX_ERROR_MAPS = 160  # maps drawn in plots/errors/ in all (20 classes x 8)


def find_target_layer(net: nn.Module, name: str = "") -> tuple[str, nn.Module]:
    """(name, module) of the layer to explain: `name`, else the last nn.Conv2d."""
    modules = dict(net.named_modules())
    convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
    if name and name not in modules:
        raise ConfigError(
            f"The model {type(net).__name__} has no layer {name!r}; name one of its modules "
            f"(its last convolutions: {', '.join(convs[-3:]) or 'none'})."
        )
    if not name and not convs:
        raise ConfigError(
            f"The model {type(net).__name__} has no nn.Conv2d layer to explain; name the layer "
            "with --target-layer (or [explain] target_layer)."
        )
    name = name or convs[-1]
    return name, modules[name]


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
    if cam not in CAMS:
        raise ConfigError(f"Unknown CAM method {cam!r}; use one of {', '.join(CAMS)}.")
    _, layer = find_target_layer(net, target_layer)
    pairs = [(i, int(c)) for i, row in enumerate(classes) for c in row]
    maps: list[list[np.ndarray]] = [[] for _ in classes]
    if not pairs:
        return maps
    was_training, found = net.training, []
    try:  # (pytorch-grad-cam puts the network in eval mode; its mode is restored below)
        with torch.enable_grad(), CAMS[cam](model=_Logits(net), target_layers=[layer]) as method:
            for start in range(0, len(pairs), CAM_BATCH):
                chunk = pairs[start : start + CAM_BATCH]
                targets = [ClassifierOutputTarget(c) for _, c in chunk]
                found += list(method(input_tensor=x[[i for i, _ in chunk]], targets=targets))
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
    h, w = image.shape[:2]
    rgb = image.astype(np.float32) / 255
    return show_cam_on_image(rgb, resized(heatmap, h, w), use_rgb=True, image_weight=0.5)


def display_image(data: torch.Tensor, input_transform: Any) -> np.ndarray:
    """A sample's `data` [C, H, W] as an RGB picture uint8 [H, W, 3]: uint8 as it is, float
    un-normalized with the transform's mean/std when it has them, else scaled to 0..255."""
    mean, std = getattr(input_transform, "mean", None), getattr(input_transform, "std", None)
    if data.dtype == torch.uint8:
        pixels = data.float()
    elif mean is not None and std is not None:
        pixels = (data * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]) * 255
    else:
        pixels = (data - data.min()) / max(float(data.max() - data.min()), 1e-12) * 255
    pixels = pixels.clamp(0, 255).round().to(torch.uint8)
    return (pixels[[0, 0, 0]] if len(pixels) == 1 else pixels[:3]).permute(1, 2, 0).numpy()


def save_sheet(
    rows: Sequence[Sequence[tuple[np.ndarray, str]]], path: Path, text_lines: int = 4
) -> Path:
    """A PNG of pictures (uint8 [H, W, 3], each shown TILE pixels square) in rows, each with
    its caption (up to `text_lines` lines) under it. Drawn with Pillow (a few ms; matplotlib
    would add a second to every run)."""
    cols = max(map(len, rows), default=1)
    text_h = 14 * text_lines + 4  # lines of Pillow's default font
    sheet = Image.new("RGB", (cols * TILE, len(rows) * (TILE + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        top = r * (TILE + text_h)
        for c, (tile, caption) in enumerate(row):
            picture = Image.fromarray(tile).resize((TILE, TILE), Image.Resampling.NEAREST)
            sheet.paste(picture, (c * TILE, top))
            draw.multiline_text((c * TILE + 2, top + TILE + 1), caption, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def save_gallery(
    images: Sequence[np.ndarray],
    labels: np.ndarray,
    probs: np.ndarray,
    maps: Sequence[Sequence[np.ndarray]],
    label_meanings: Sequence[str],
    path: Path,
) -> Path:
    """One row per image: the image under its true labels and top probabilities, then the
    overlay of each map, the maps of `classes_to_show` (its true classes, or the most probable
    one). `labels`, `probs`: [N, K], a row per image."""
    rows = []
    for r, image in enumerate(images):
        true = np.flatnonzero(labels[r])
        best = np.argsort(-probs[r])[:3]
        lines = [f"true: {true_names(labels[r], label_meanings)}"]
        lines += [f"{label_meanings[k]} {probs[r, k]:.2f}" for k in best]
        captions = ["\n".join(lines)] + [
            label_meanings[k] + ("" if k in true else " (top)")
            for k in classes_to_show(labels[r], probs[r])
        ]
        rows.append(list(zip([image] + [overlay(image, m) for m in maps[r]], captions)))
    return save_sheet(rows, path)


def true_names(label_row: np.ndarray, label_meanings: Sequence[str]) -> str:
    return ", ".join(label_meanings[k] for k in np.flatnonzero(label_row)) or "none"


def gallery_rows(labels: np.ndarray, probs: np.ndarray, n: int) -> list[int]:
    """The first `n` images with a true label, then others when there are too few."""
    return sorted(range(len(labels)), key=lambda i: not labels[i].any())[:n]  # a stable sort


def classes_to_show(label_row: np.ndarray, prob_row: np.ndarray) -> list[int]:
    """The true classes of an image (at most MAX_CLASSES_SHOWN), or its most probable one."""
    true = [int(k) for k in np.flatnonzero(label_row)][:MAX_CLASSES_SHOWN]
    return true or [int(np.argmax(prob_row))]


def error_rows(
    labels: np.ndarray,
    probs: np.ndarray,
    positive: np.ndarray,
    shown: int = ERRORS_SHOWN,
    budget: int = MAX_ERROR_MAPS,
) -> dict[int, tuple[list[int], list[int]]]:
    """class k -> (false positives, false negatives): the rows of the `shown` images called
    positive without the label, highest probability first, and of the `shown` images with the
    label not called positive, lowest probability first (equal probabilities: the earlier row
    first). Only classes with an error; classes in order while the `budget` of rows in all
    lasts (false positives first). `labels`, `probs`, `positive` (bool, the model's calls):
    [N, K]."""
    out: dict[int, tuple[list[int], list[int]]] = {}
    for k in range(labels.shape[1]):
        truth, called, p = labels[:, k] >= 0.5, positive[:, k], probs[:, k]
        fp = [int(i) for i in np.argsort(-p, kind="stable") if called[i] and not truth[i]]
        fn = [int(i) for i in np.argsort(p, kind="stable") if truth[i] and not called[i]]
        fp = fp[: min(shown, budget)]
        fn = fn[: min(shown, budget - len(fp))]
        if fp or fn:
            out[k] = (fp, fn)
            budget -= len(fp) + len(fn)
    return out


def error_file_names(label_meanings: Sequence[str]) -> list[str]:
    """A file name per class, `<label>.png` with the label made safe as for its metric keys
    (`src.evaluate.metric_name`); `<label>~<k>.png` (class k) where that is empty or taken
    (metric_name leaves no `~`, so these are taken by no other class)."""
    names: list[str] = []
    for k, meaning in enumerate(label_meanings):
        name = metric_name(meaning)
        names.append(f"{name}.png" if name and f"{name}.png" not in names else f"{name}~{k}.png")
    return names


def error_pairs(
    errors: dict[int, tuple[list[int], list[int]]],
) -> tuple[list[int], list[list[int]]]:
    """(rows, classes): each row of `errors` (`error_rows`) once, in order, and the classes it
    is an error of: the heatmaps to compute."""
    rows = sorted({i for found in errors.values() for i in found[0] + found[1]})
    return rows, [[k for k, found in errors.items() if i in found[0] + found[1]] for i in rows]


def save_errors(
    errors: dict[int, tuple[list[int], list[int]]],
    drawn: Sequence[tuple[np.ndarray, Sequence[np.ndarray], str]],
    labels: np.ndarray,
    probs: np.ndarray,
    label_meanings: Sequence[str],
    folder: Path,
) -> list[Path]:
    """`<folder>/<label>.png` (`error_file_names`) per class of `errors` (`error_rows`): a row
    of its false positives, titled FP with the probability of the class, the image's name and
    its true labels, over a row of the same images under the class's map; then the same for
    its false negatives (FN).
    `drawn`: for each row of `error_pairs(errors)`, (its picture, the maps of its classes, its
    name). `labels`, `probs`: [N, K], all rows."""
    rows, classes = error_pairs(errors)
    picture = {i: image for i, (image, _, _) in zip(rows, drawn)}
    name = {i: n for i, (_, _, n) in zip(rows, drawn)}
    heatmap = {(i, k): m for i, ks, (_, ms, _) in zip(rows, classes, drawn) for k, m in zip(ks, ms)}
    files, paths = error_file_names(label_meanings), []
    for k, found in errors.items():
        sheet, caption = [], shortened(f"heatmap of {label_meanings[k]}")
        for kind, found_rows in zip(("FP", "FN"), found):
            if not found_rows:
                continue
            titles = [
                f"{kind} {label_meanings[k]} {probs[i, k]:.2f}\n{shortened(name[i], end=True)}\n"
                + shortened(f"true: {true_names(labels[i], label_meanings)}")
                for i in found_rows
            ]
            sheet.append([(picture[i], title) for i, title in zip(found_rows, titles)])
            sheet.append([(overlay(picture[i], heatmap[i, k]), caption) for i in found_rows])
        paths.append(save_sheet(sheet, folder / files[k], text_lines=3))
    return paths


def shortened(text: str, end: bool = False, chars: int = 30) -> str:
    """The start (or the end) of a text too long for a tile's width."""
    if len(text) <= chars:
        return text
    return "..." + text[3 - chars :] if end else text[: chars - 3] + "..."
