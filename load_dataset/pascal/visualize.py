"""Pictures of PASCAL samples: image + coloured mask + label names, and augmentation galleries.

Figures are drawn on matplotlib's Agg canvas (no window, no change to the global backend);
`show=True` draws with pyplot instead and opens a window.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from load_dataset.images import to_rgb
from load_dataset.pascal.augment import PascalAugment, check_augment
from load_dataset.pascal.labels import (
    VOC_CLASSES,
    colorize_mask,
    label_names,
    label_vector_from_mask,
    voc_colormap,
)


def caption(label_vector: Sequence[float] | np.ndarray | torch.Tensor) -> str:
    """A figure title for a 20-entry label vector: 'bicycle, person', or '(no object)'."""
    if isinstance(label_vector, torch.Tensor):
        label_vector = label_vector.detach().cpu().numpy()
    return ", ".join(label_names(label_vector)) or "(no object)"


def _to_rgb_array(image: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    """PIL image, [H, W, 3] array or [3, H, W] tensor (uint8, or float in [0, 1]) -> uint8 HWC."""
    if isinstance(image, Image.Image):
        return np.asarray(to_rgb(image))  # 16-bit images scaled, not clipped
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.ndim == 3 and image.shape[0] in (1, 3):
            image = image.permute(1, 2, 0)
        image = image.numpy()
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    if array.ndim == 2 or array.shape[-1] == 1:
        array = np.repeat(array.reshape(array.shape[0], array.shape[1], 1), 3, axis=2)
    return array


def _to_mask_array(mask: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    return np.asarray(mask).astype(np.uint8)


def _new_figure(show: bool, figsize: tuple[float, float]):
    if show:
        import matplotlib.pyplot as plt

        return plt.figure(figsize=figsize)
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def _finish(fig, out_path: str | os.PathLike | None, show: bool) -> Path | None:
    path = None
    if out_path is not None:
        path = Path(out_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=100)
    if show:
        import matplotlib.pyplot as plt

        plt.show()
        plt.close(fig)
    return path


def save_visualization(
    image: Image.Image | np.ndarray | torch.Tensor,
    mask: Image.Image | np.ndarray | torch.Tensor,
    label_vector: Sequence[float] | np.ndarray | torch.Tensor | None,
    out_path: str | os.PathLike | None,
    show: bool = False,
) -> Path | None:
    """Saves image | coloured mask side by side, titled with the label names, as a PNG.

    image: PIL image, uint8 [H, W, 3] array or [3, H, W] tensor (uint8 or floats in [0, 1]);
    mask: [H, W] class indices; label_vector: 20 x 0/1, or None to compute it from the mask.
    Returns the PNG's path (None when out_path is None and the figure is only shown).
    """
    rgb, classes = _to_rgb_array(image), _to_mask_array(mask)
    if label_vector is None:
        label_vector = label_vector_from_mask(classes)
    label_vector = np.asarray(label_vector, dtype=np.float32).ravel()
    fig = _new_figure(show, (8.0, 4.2))
    left, right = fig.subplots(1, 2)
    left.imshow(rgb)
    left.set_title("image")
    right.imshow(colorize_mask(classes), interpolation="nearest")
    right.set_title("segmentation mask")
    for ax in (left, right):
        ax.axis("off")
    _add_legend(fig, classes)
    fig.suptitle(caption(label_vector))
    return _finish(fig, out_path, show)


def _add_legend(fig, mask: np.ndarray) -> None:
    from matplotlib.patches import Patch

    cmap = voc_colormap() / 255.0
    present = [v for v in np.unique(mask) if 1 <= v <= len(VOC_CLASSES)]
    handles = [Patch(color=cmap[v], label=VOC_CLASSES[v - 1]) for v in present]
    if 255 in mask:
        handles.append(Patch(color=cmap[255], label="void"))
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8)


def build_augmentation_gallery(
    image: Image.Image | torch.Tensor,
    out_path: str | os.PathLike | None,
    augment: str | Sequence[str] = ("none", "flip", "flip_scale_crop", "full"),
    image_size: int | None = None,
    n_samples: int = 6,
    mask: Image.Image | np.ndarray | torch.Tensor | None = None,
    seed: int = 0,
    show: bool = False,
) -> Path | None:
    """A PNG grid: one row per augmentation setting, `n_samples` random draws each.

    Works on any image (PIL, or uint8 [3, H, W]); with a mask, each image row is followed by
    a row of the transformed masks, and each image is titled with its (recomputed) labels.
    image_size defaults to the image's shorter side (at most 320). The draws come from a
    private torch RNG seeded with `seed`: the global RNG state is left as it was.
    """
    modes = [augment] if isinstance(augment, str) else list(augment)
    for mode in modes:
        check_augment(mode)
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu().to(torch.uint8)
    else:
        tensor = torch.from_numpy(_to_rgb_array(image).copy()).permute(2, 0, 1)
    if image_size is None:
        image_size = min(320, *tensor.shape[1:])
    full_mask = None if mask is None else torch.from_numpy(_to_mask_array(mask).copy())
    base_label = None if full_mask is None else label_vector_from_mask(full_mask.numpy())

    rows_per_mode = 1 if full_mask is None else 2
    fig = _new_figure(show, (1.8 * n_samples, 1.9 * rows_per_mode * len(modes) + 0.4))
    axes = np.asarray(fig.subplots(rows_per_mode * len(modes), n_samples, squeeze=False))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for r, mode in enumerate(modes):
            transform = PascalAugment(mode, image_size)
            for c in range(n_samples):
                out, out_mask, label = transform(tensor, full_mask)
                ax = axes[r * rows_per_mode, c]
                ax.imshow(out.permute(1, 2, 0).numpy())
                title = mode if c == 0 else ""
                if base_label is not None:
                    names = caption(base_label if label is None else label)
                    title = f"{title}\n{names}" if title else names
                ax.set_title(title, fontsize=7)
                if out_mask is not None:
                    axes[r * rows_per_mode + 1, c].imshow(
                        colorize_mask(out_mask.numpy()), interpolation="nearest"
                    )
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle(f"augmentations at {image_size}x{image_size} (seed {seed})", fontsize=9)
    fig.tight_layout()
    return _finish(fig, out_path, show)
