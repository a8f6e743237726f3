"""Heatmaps of src/serve/explain.py on a trained TinyConv: the image's size, not constant, different
for two classes of one image; the target layer found or named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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
