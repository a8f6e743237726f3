"""load_dataset.utils: tensor conversion, ImageNet normalization and split statistics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from load_dataset.errors import DataError
from load_dataset.utils import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    compute_mean_std,
    to_tensor_and_normalize,
)
from tests.tiny_fixtures import write_png


def test_imagenet_constants_are_the_tutorials():
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406)
    assert IMAGENET_STD == (0.229, 0.224, 0.225)


def test_to_tensor_and_normalize_on_a_2x2_image_by_hand():
    pixels = [[(255, 0, 128), (0, 255, 0)], [(51, 102, 204), (255, 255, 255)]]
    x = to_tensor_and_normalize(Image.fromarray(np.array(pixels, dtype=np.uint8), "RGB"))
    assert x.shape == (3, 2, 2) and x.dtype == torch.float32
    # Pixel (0, 0) = (255, 0, 128).
    assert x[0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229, abs=1e-6)
    assert x[1, 0, 0].item() == pytest.approx((0 - 0.456) / 0.224, abs=1e-6)
    assert x[2, 0, 0].item() == pytest.approx((128 / 255 - 0.406) / 0.225, abs=1e-6)
    # Pixel (0, 1) = (0, 255, 0): channel-first, so x[c, row, column].
    assert x[0, 0, 1].item() == pytest.approx(-0.485 / 0.229, abs=1e-6)
    assert x[1, 0, 1].item() == pytest.approx((1 - 0.456) / 0.224, abs=1e-6)
    # Pixel (1, 0) = (51, 102, 204) = (0.2, 0.4, 0.8).
    assert x[:, 1, 0].tolist() == pytest.approx(
        [(0.2 - 0.485) / 0.229, (0.4 - 0.456) / 0.224, (0.8 - 0.406) / 0.225], abs=1e-6
    )
    # Pixel (1, 1) = white.
    assert x[:, 1, 1].tolist() == pytest.approx(
        [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225], abs=1e-6
    )


def test_to_tensor_and_normalize_with_own_statistics_and_a_grey_image():
    grey = Image.fromarray(np.full((1, 3), 51, dtype=np.uint8), "L")  # 0.2 in every channel
    x = to_tensor_and_normalize(grey, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.1))
    assert x.shape == (3, 1, 3)
    expected = [(0.2 - 0.1) / 0.5, (0.2 - 0.2) / 0.25, (0.2 - 0.3) / 0.1]
    assert x[:, 0, 2].tolist() == pytest.approx(expected, abs=1e-6)


def two_images(tmp_path):
    """Six pixels in all: a 1x2 image black | white and a 2x2 image of (255, 0, 102)."""
    a = write_png(tmp_path / "a.png", [[(0, 0, 0), (255, 255, 255)]])
    b = write_png(tmp_path / "b.png", np.full((2, 2, 3), (255, 0, 102)))
    return [a, b]


# The six pixels, scaled to [0, 1]: R 0,1,1,1,1,1  G 0,1,0,0,0,0  B 0,1,.4,.4,.4,.4
HAND_MEAN = (5 / 6, 1 / 6, 2.6 / 6)
HAND_STD = (
    math.sqrt(5 / 6 - (5 / 6) ** 2),
    math.sqrt(1 / 6 - (1 / 6) ** 2),
    math.sqrt((1 + 4 * 0.16) / 6 - (2.6 / 6) ** 2),
)


def test_compute_mean_std_by_hand(tmp_path):
    mean, std = compute_mean_std(two_images(tmp_path))
    assert mean == pytest.approx(HAND_MEAN, abs=1e-9)
    assert std == pytest.approx(HAND_STD, abs=1e-9)
    assert not list(tmp_path.glob("*.json"))  # no cache unless asked for


def test_compute_mean_std_cache_is_written_reused_and_invalidated(tmp_path):
    paths = two_images(tmp_path)
    cache = tmp_path / "mean_std_cache.json"
    mean, std = compute_mean_std(paths, cache)
    assert mean == pytest.approx(HAND_MEAN) and std == pytest.approx(HAND_STD)
    entry = json.loads(cache.read_text())
    assert entry["mean"] == pytest.approx(HAND_MEAN) and entry["n_images"] == 2

    # Reused: a planted value comes back, so the images were not read again.
    entry["mean"] = [0.5, 0.5, 0.5]
    cache.write_text(json.dumps(entry))
    assert compute_mean_std(paths, cache)[0] == (0.5, 0.5, 0.5)

    # Invalidated: another file list recomputes (and rewrites the cache).
    c = write_png(tmp_path / "c.png", [[(0, 0, 0), (0, 0, 0)]])
    mean, _ = compute_mean_std([*paths, c], cache)
    assert mean == pytest.approx((5 / 8, 1 / 8, 2.6 / 8))
    assert json.loads(cache.read_text())["mean"] == pytest.approx(mean)
    assert compute_mean_std(paths, cache)[0] == pytest.approx(HAND_MEAN)


def test_compute_mean_std_without_a_writable_cache_folder_just_computes(tmp_path):
    cache = tmp_path / "no-such-folder" / "mean_std_cache.json"
    mean, std = compute_mean_std(two_images(tmp_path), cache)
    assert mean == pytest.approx(HAND_MEAN) and std == pytest.approx(HAND_STD)
    assert not cache.exists()


def test_compute_mean_std_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="no image files"):
        compute_mean_std([])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        compute_mean_std([broken])
