"""Heads that sit on VGG-16 features ([B, 512, s, s]), chosen by `conv_type`, and their sizes.

VGG-16's feature extractor halves the image side five times (floor), so a 320 x 320 image
gives 512 x 10 x 10 features. The three heads of the tutorial (VGG16 has the first,
VGG16Customizable any of them):

| conv_type          | layers                                      | at 320: output, flattened |
| ------------------ | ------------------------------------------- | ------------------------- |
| "512to256to64_1x1" | 1x1 conv 512->256, ReLU, 1x1 conv 256->64, ReLU | 64 x 10 x 10 = 6400   |
| "512to64_1x1"      | 1x1 conv 512->64, ReLU                      | 64 x 10 x 10 = 6400       |
| "512to512_3x3"     | 3x3 conv 512->512 with stride 3, no padding, ReLU | 512 x 3 x 3 = 4608  |

The 3x3 head's stride of 3 is what turns 10 x 10 into floor((10 - 3) / 3) + 1 = 3 x 3.
It needs at least 3 x 3 features, i.e. images of at least 96 x 96 (96 -> 3 -> 1 x 1);
every head enforces that same minimum so that all variants accept the same images.
"""

from __future__ import annotations

from torch import nn

# Each head: (out channels, kernel, stride) of each conv, no padding, each conv followed by a
# ReLU; the order of the module's table.
HEADS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "512to256to64_1x1": ((256, 1, 1), (64, 1, 1)),
    "512to64_1x1": ((64, 1, 1),),
    "512to512_3x3": ((512, 3, 3),),
}
CONV_TYPES: tuple[str, ...] = tuple(HEADS)
FEATURE_CHANNELS = 512  # VGG-16's last conv block
N_POOLS = 5  # VGG-16 halves the side five times
MIN_IMAGE_SIZE = 96


def check_conv_type(conv_type: str) -> str:
    """`conv_type` itself, or a ValueError naming the allowed values."""
    if conv_type not in CONV_TYPES:
        allowed = ", ".join(repr(c) for c in CONV_TYPES)
        raise ValueError(f"conv_type={conv_type!r} is not known; use one of {allowed}.")
    return conv_type


def check_image_size(image_size: int) -> int:
    """`image_size` as an int, or a ValueError naming the minimum of 96 pixels."""
    if int(image_size) != image_size or image_size < MIN_IMAGE_SIZE:
        raise ValueError(
            f"image_size={image_size} is too small for the VGG-16 models; the minimum is "
            f"{MIN_IMAGE_SIZE} (pixels per side, an integer)."
        )
    return int(image_size)


def make_head(conv_type: str) -> nn.Sequential:
    """The head for `conv_type`: [B, 512, s, s] -> [B, C, h, w] (see the module's table)."""
    layers: list[nn.Module] = []
    channels = FEATURE_CHANNELS
    for width, kernel, stride in HEADS[check_conv_type(conv_type)]:
        layers += [nn.Conv2d(channels, width, kernel, stride=stride), nn.ReLU(inplace=True)]
        channels = width
    return nn.Sequential(*layers)


def vgg16_feature_side(image_size: int) -> int:
    """Side of VGG-16's feature map for a square image: five floor-halvings (320 -> 10), which
    are one floor division by 2 ** 5."""
    return int(image_size) // 2**N_POOLS


def head_output_shape(conv_type: str, image_size: int) -> tuple[int, int, int]:
    """(channels, height, width) of the head's output for a square image of `image_size`."""
    convs = HEADS[check_conv_type(conv_type)]
    side = vgg16_feature_side(check_image_size(image_size))
    for _, kernel, stride in convs:
        side = (side - kernel) // stride + 1
    return (convs[-1][0], side, side)


def flattened_size(conv_type: str, image_size: int) -> int:
    """Inputs of the final linear layer: 6400 for the 1x1 heads at 320, 4608 for the 3x3."""
    channels, height, width = head_output_shape(conv_type, image_size)
    return channels * height * width
