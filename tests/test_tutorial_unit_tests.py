"""The tutorial's own three unit tests, run against this repository's functions.

Same inputs and the same hand-computed expectations as the tutorial's `unit_tests.py`:
normalizing a 2 x 2 RGB image, turning segmentation masks into label vectors, and naming
the classes of a label vector.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from load_dataset.custom_pascal import get_all_labels_string, get_label_vector
from load_dataset.utils import to_tensor_and_normalize


def one_hot(*classes: int) -> list[int]:
    """A 20-entry label vector with 1 at the given class numbers (1 = airplane ... 20)."""
    vector = [0] * 20
    for c in classes:
        vector[c - 1] = 1
    return vector


def test_to_tensor_and_normalize():
    red = [[255, 16], [23, 9]]
    green = [[133, 230], [0, 87]]
    blue = [[200, 67], [189, 255]]
    image = Image.fromarray(np.stack([red, green, blue], axis=-1).astype(np.uint8))
    assert image.mode == "RGB" and image.size == (2, 2)

    # Each value is (pixel / 255 - mean) / std with ImageNet's mean (0.485, 0.456, 0.406)
    # and std (0.229, 0.224, 0.225), e.g. red 255: (1 - 0.485) / 0.229 = 2.24890...;
    # green 133: (0.52156863 - 0.456) / 0.224 = 0.29271...; green 0: -0.456 / 0.224.
    expected = torch.tensor(
        [
            [  # red
                [2.2489082969432315, -1.8439078602620087],
                [-1.7240345851528383, -1.963781135371179],
            ],
            [  # green
                [0.29271709821428554, 1.9908963392857142],
                [-2.0357142857142856, -0.5126050446428572],
            ],
            [  # blue
                [1.6813943555555555, -0.6366884444444445],
                [1.4896731999999997, 2.6399999999999997],
            ],
        ]
    )
    out = to_tensor_and_normalize(image)
    assert out.shape == (3, 2, 2)  # channels first: [C, H, W]
    assert torch.allclose(out, expected.to(out.dtype))


def test_get_label_vector():
    # Mask values are class numbers: 0 is background, 1..20 the classes.
    mask = Image.fromarray(np.array([[0, 1, 3], [16, 20, 0]], dtype=np.uint8))
    assert mask.mode == "L"
    assert get_label_vector(mask) == one_hot(1, 3, 16, 20)

    background_only = Image.fromarray(np.zeros((2, 3), dtype=np.uint8))
    assert get_label_vector(background_only) == [0] * 20

    repeated = Image.fromarray(np.array([[2, 12, 13], [19, 2, 2]], dtype=np.uint8))
    assert get_label_vector(repeated) == one_hot(2, 12, 13, 19)


def test_get_all_labels_string():
    assert get_all_labels_string([1] + [0] * 19) == "airplane"
    assert get_all_labels_string(one_hot(3, 4, 18)) == "bird boat sofa"
    assert get_all_labels_string([0] * 20) == ""
