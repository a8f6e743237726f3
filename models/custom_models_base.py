"""The tutorial's networks: two tiny CNNs for 32 x 32 TinyData, and VGG-16 variants for PASCAL.

Every model maps a float batch [B, 3, H, W] (normalized as its dataset's `mean_std` says)
to {'out': logits [B, n_outputs]}; the loss (sigmoid or softmax) is the training loop's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import VGG16_Weights

from models.components import check_conv_type, check_image_size, flattened_size, make_head
from src.errors import PretrainedWeightsError

# VGG-16 ("configuration D"): five blocks of 3x3 convs (these widths), each block followed
# by a 2x2 max pool. Built here layer by layer so that module indices, and thus state-dict
# keys, match torchvision's `vgg16().features` ("0.weight" .. "28.bias"), without building
# its 120M-parameter classifier that these models do not use.
VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
VGGINITS = ("random", "pretrained")


class TinyConvWithoutSequential(nn.Module):
    """Two strided 3x3 convs and a linear layer, each layer an attribute called in turn.

    [B, 3, 32, 32] -> conv 3->8, k3 s3 -> [B, 8, 10, 10] -> conv 8->16, k3 s3 -> [B, 16, 3, 3]
    -> flatten 144 -> linear -> {'out': [B, n_outputs]}. The same network as TinyConv.
    """

    def __init__(self, n_outputs: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, kernel_size=3, stride=3, padding=0)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, kernel_size=3, stride=3, padding=0)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(16 * 3 * 3, n_outputs)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x))
        return {"out": self.fc(torch.flatten(x, 1))}


class TinyConv(nn.Module):
    """TinyConvWithoutSequential written with nn.Sequential: [B, 3, 32, 32] -> [B, n_outputs]."""

    def __init__(self, n_outputs: int = 3) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(3, 8, kernel_size=3, stride=3, padding=0),
            nn.ReLU(),
            nn.Conv2d(8, 16, kernel_size=3, stride=3, padding=0),
            nn.ReLU(),
        )
        self.fc = nn.Linear(16 * 3 * 3, n_outputs)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.fc(torch.flatten(self.conv(x), 1))}


def vgg16_features() -> nn.Sequential:
    """VGG-16's convolutional part, randomly initialized as torchvision initializes it.

    [B, 3, H, W] -> [B, 512, H // 32, W // 32]; state-dict keys as torchvision's.
    """
    layers: list[nn.Module] = []
    channels = 3
    for block in VGG16_BLOCKS:
        for width in block:
            conv = nn.Conv2d(channels, width, kernel_size=3, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU(inplace=True)]
            channels = width
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


def imagenet_weights_path() -> Path:
    """Where torchvision keeps VGG-16's ImageNet weights: <torch.hub.get_dir()>/checkpoints/."""
    name = VGG16_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]  # as torch.hub names it
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def load_imagenet_features(features: nn.Sequential) -> None:
    """Loads torchvision's ImageNet VGG-16 weights (`VGG16_Weights.IMAGENET1K_V1`) into
    `features`, downloading the file once through torch.hub when it is not on disk.

    Raises PretrainedWeightsError (one sentence: file, folder, what to do) when the file is
    neither on disk nor downloadable, or cannot be read.
    """
    url, path = VGG16_Weights.IMAGENET1K_V1.url, imagenet_weights_path()
    try:
        state = torch.hub.load_state_dict_from_url(
            url, str(path.parent), map_location="cpu", check_hash=True, weights_only=True
        )
    except Exception as e:  # network, hash or unpickling failures all end in the same advice
        reason = " ".join(str(e).split()) or type(e).__name__
        if path.is_file():  # torch.hub downloads nothing when the file is there
            trouble = f"in {path.parent} cannot be read ({reason}); delete the file to "
            trouble += "download it again"
        else:
            trouble = f"are not in {path.parent} and could not be downloaded from {url} "
            trouble += f"({reason}); put the file there"
        raise PretrainedWeightsError(
            f"The VGG-16 ImageNet weights {path.name} {trouble}, or use vgginit='random' "
            "(flag --no-pretrained)."
        ) from None
    prefix = "features."  # the file also holds the classifier, which these models do not use
    feature_state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    try:
        features.load_state_dict(feature_state)
    except RuntimeError as e:
        raise PretrainedWeightsError(
            f"{path} does not hold torchvision's VGG-16 feature weights "
            f"({' '.join(str(e).split())[:200]}); delete it, or use vgginit='random' "
            "(flag --no-pretrained)."
        ) from None


class VGG16Customizable(nn.Module):
    """VGG-16 features, a `conv_type` head (models.components) and one linear layer.

    [B, 3, S, S] (ImageNet-normalized, S >= 96) -> features [B, 512, S//32, S//32] -> head
    -> flatten (6400 at S = 320 for the 1x1 heads, 4608 for '512to512_3x3')
    -> {'out': [B, n_outputs]}. `vgginit` 'pretrained' loads torchvision's ImageNet weights
    into the features; 'random' initializes them as torchvision does. The head and the
    linear layer always start random. `image_size` must be the size of the images fed.

    `load_state_dict` also takes the tutorial's state dicts and checkpoints (key names
    translated by `state_dict_from_tutorial`).
    """

    def __init__(
        self,
        n_outputs: int = 20,
        conv_type: str = "512to256to64_1x1",
        vgginit: str = "pretrained",
        image_size: int = 320,
    ) -> None:
        super().__init__()
        self.conv_type = check_conv_type(conv_type)
        if vgginit not in VGGINITS:
            raise ValueError(f"vgginit={vgginit!r} is not known; use 'random' or 'pretrained'.")
        self.image_size, self.vgginit = check_image_size(image_size), vgginit
        self.features = vgg16_features()
        if vgginit == "pretrained":
            load_imagenet_features(self.features)
        self.conv2d = make_head(conv_type)
        self.fc = nn.Linear(flattened_size(conv_type, self.image_size), n_outputs)
        self.register_load_state_dict_pre_hook(_translate_tutorial_keys)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"{type(self).__name__} was built for {self.image_size}x{self.image_size} "
                f"images but got {x.shape[-2]}x{x.shape[-1]}; make the model's image_size "
                "equal the dataset's."
            )
        x = self.conv2d(self.features(x))
        return {"out": self.fc(torch.flatten(x, 1))}


class VGG16(VGG16Customizable):
    """The tutorial's VGG16: VGG-16 features, the head '512to256to64_1x1', one linear layer.

    [B, 3, S, S] -> features [B, 512, S//32, S//32] -> 1x1 conv 512->256, ReLU -> 1x1 conv
    256->64, ReLU -> flatten (6400 at S = 320) -> {'out': [B, n_outputs]}: 14,990,484
    parameters at S = 320 and 20 outputs. The same network as
    VGG16Customizable(conv_type='512to256to64_1x1'). `pretrained=True` loads torchvision's
    ImageNet weights into the features; `pretrained=False` starts them random (no download).
    """

    def __init__(self, n_outputs: int = 20, image_size: int = 320, pretrained: bool = True) -> None:
        vgginit = "pretrained" if pretrained else "random"
        super().__init__(n_outputs, "512to256to64_1x1", vgginit, image_size)


# The tutorial's VGG models wrapped torchvision's `vgg16().features` in one more Sequential
# (`features.0.<i>.*` where ours are `features.<i>.*`) and called the head `conv`.
_TUTORIAL_FEATURES_KEY = re.compile(r"^features\.0\.(\d+\.)")


def state_dict_from_tutorial(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A state dict saved by the tutorial's code, with the key names of these models.

    `state` is a model's state dict, or the tutorial's checkpoint `{'params': state dict,
    'optimizer': ...}` (only 'params' is kept). VGG16 / VGG16Customizable keys
    `features.0.<i>.*` become `features.<i>.*` and `conv.<j>.*` become `conv2d.<j>.*`;
    TinyConv and TinyConvWithoutSequential keys are already ours, and so are keys in our
    naming: both pass unchanged. Tensors are not copied.
    """
    params = state.get("params")
    if isinstance(params, Mapping):
        state = params
    # `conv.*` names the head of a VGG model, but the convolutions of TinyConv.
    is_vgg = any(key.startswith("features.") for key in state)

    def ours(key: str) -> str:
        key = _TUTORIAL_FEATURES_KEY.sub(r"features.\1", key)
        return re.sub(r"^conv\.", "conv2d.", key) if is_vgg else key

    return {ours(key): value for key, value in state.items()}


def _translate_tutorial_keys(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    """load_state_dict pre-hook: renames this module's entries (those under `prefix`) in
    place, so that `model.load_state_dict(tutorial_state)` needs no conversion first."""
    own = [key for key in state_dict if key.startswith(prefix)]
    local = {key.removeprefix(prefix): state_dict.pop(key) for key in own}
    state_dict.update({prefix + k: v for k, v in state_dict_from_tutorial(local).items()})
