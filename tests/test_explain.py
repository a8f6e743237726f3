"""Heatmaps of src/serve/explain.py on a trained TinyConv: the image's size, not constant, different
for two classes of one image; the target layer found or named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import src.serve.explain as explain
from load_dataset.utils import open_rgb
from models.custom_models_base import VGG16, TinyConv
from src.errors import ConfigError
from tests.trained_runs import quick_tinyconv


@pytest.fixture(scope="module")
def trained():
    return quick_tinyconv()


def test_target_layer_is_the_last_convolution_or_the_named_one():
    assert explain.find_target_layer(TinyConv())[0] == "conv.2"
    assert explain.find_target_layer(VGG16(image_size=96, pretrained=False))[0] == "conv2d.2"
    assert explain.find_target_layer(TinyConv(), "conv.0")[0] == "conv.0"
    with pytest.raises(ConfigError, match="has no layer 'head'.*conv.0, conv.2"):
        explain.find_target_layer(TinyConv(), "head")
    with pytest.raises(ConfigError, match="no nn.Conv2d layer"):
        explain.find_target_layer(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("cam", ["hirescam", "gradcam"])
def test_heatmaps_of_two_classes_of_one_image(trained, cam):
    net, val = trained
    # The first val image with two true labels.
    i = next(i for i in range(len(val)) if val.labels[i].sum() >= 2)
    a, b = (int(k) for k in np.flatnonzero(val.labels[i])[:2])
    x = val[i]["data"][None]
    (maps,) = explain.heatmaps(net, x, [[a, b]], cam)
    assert [m.shape for m in maps] == [(32, 32), (32, 32)]
    assert all(m.max() > m.min() for m in maps)  # not constant
    assert not np.allclose(maps[0], maps[1])  # each class has its own evidence
    assert all(p.grad is None for p in net.parameters())  # nothing left behind


def test_overlay_has_the_size_of_the_original_image(trained):
    net, val = trained
    image = np.asarray(open_rgb(val.image_paths[0]))
    big = np.asarray(
        torch.nn.functional.interpolate(
            torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float(), size=(45, 70)
        )[0]
        .permute(1, 2, 0)
        .byte()
    )
    (maps,) = explain.heatmaps(net, val[0]["data"][None], [[0]])
    picture = explain.overlay(big, maps[0])
    assert picture.shape == (45, 70, 3) and picture.dtype == np.uint8
    assert explain.resized(maps[0], 45, 70).shape == (45, 70)


def test_heatmaps_in_chunks_are_the_maps_of_one_pass(trained, monkeypatch):
    net, val = trained
    x = torch.stack([val[i]["data"] for i in range(5)])
    classes = [[0, 1], [2], [0, 1, 2], [1], [2, 0]]  # 9 (image, class) pairs
    whole = explain.heatmaps(net, x, classes)
    monkeypatch.setattr(explain, "CAM_BATCH", 2)  # 5 passes, the last one of 1 pair
    chunked = explain.heatmaps(net, x, classes)
    assert [len(row) for row in chunked] == [2, 1, 3, 1, 2]
    for a, b in zip(whole, chunked):
        np.testing.assert_allclose(np.stack(a), np.stack(b), atol=1e-5)


def test_gallery_has_a_row_per_image_and_a_tile_per_map(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
    labels = np.array([[1, 0, 1], [0, 0, 0]])
    probs = np.array([[0.9, 0.1, 0.6], [0.2, 0.7, 0.1]])
    # The first image: its two true classes; the second (no label): its most probable one.
    maps = [[rng.random((32, 32), dtype=np.float32)] * 2, [rng.random((32, 32), np.float32)]]
    path = explain.save_gallery(images, labels, probs, maps, ["a", "b", "c"], tmp_path / "g.png")
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        assert picture.size == (3 * explain.TILE, 2 * (explain.TILE + 14 * 4 + 4))
