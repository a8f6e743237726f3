"""models.components and models.custom_models_base: shapes, sizes, errors, weights, learning."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from models.any_size import TinyConvAnySize
from models.components import (
    CONV_TYPES,
    MIN_IMAGE_SIZE,
    flattened_size,
    head_output_shape,
    make_head,
    vgg16_feature_side,
)
from models.custom_models_base import (
    VGG16,
    PretrainedWeightsError,
    TinyConv,
    TinyConvWithoutSequential,
    VGG16Customizable,
    imagenet_weights_path,
    state_dict_from_tutorial,
    vgg16_features,
)

TINY_MODELS = (TinyConvWithoutSequential, TinyConv)


def n_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("cls", TINY_MODELS)
def test_tiny_models_map_32x32_images_to_logits(cls):
    model = cls(n_outputs=5)
    out = model(torch.zeros(2, 3, 32, 32))
    assert set(out) == {"out"}
    assert out["out"].shape == (2, 5)
    # conv 3->8 k3 (8*27+8) + conv 8->16 k3 (16*72+16) + linear 144->5 (144*5+5)
    assert n_parameters(model) == 224 + 1168 + 725


def test_both_tiny_models_are_the_same_network():
    torch.manual_seed(3)
    plain = TinyConvWithoutSequential()
    torch.manual_seed(3)
    sequential = TinyConv()
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(plain(x)["out"], sequential(x)["out"])


def test_a_few_sgd_steps_reduce_tinyconv_loss():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 32, 32)
    y = (torch.rand(16, 3) > 0.5).float()
    model = TinyConv(n_outputs=3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = loss_fn(model(x)["out"], y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_feature_side_and_flattened_sizes_by_hand():
    assert vgg16_feature_side(320) == 10  # 320 -> 160 -> 80 -> 40 -> 20 -> 10
    assert vgg16_feature_side(96) == 3
    assert flattened_size("512to256to64_1x1", 320) == 64 * 10 * 10 == 6400
    assert flattened_size("512to64_1x1", 320) == 6400
    assert flattened_size("512to512_3x3", 320) == 512 * 3 * 3 == 4608  # (10 - 3) // 3 + 1 = 3
    assert head_output_shape("512to512_3x3", 96) == (512, 1, 1)
    assert flattened_size("512to64_1x1", 224) == 64 * 7 * 7


@pytest.mark.parametrize("conv_type", CONV_TYPES)
@pytest.mark.parametrize("image_size", [96, 224, 320])
def test_flattened_size_matches_a_forward_pass_on_the_meta_device(conv_type, image_size):
    # The meta device computes shapes only: a 320x320 VGG forward costs nothing here.
    with torch.device("meta"):
        features, head = vgg16_features(), make_head(conv_type)
        out = head(features(torch.empty(1, 3, image_size, image_size)))
    assert out.shape[1:] == head_output_shape(conv_type, image_size)
    assert out[0].numel() == flattened_size(conv_type, image_size)


@pytest.mark.parametrize("conv_type", CONV_TYPES)
def test_vgg16customizable_linear_layer_size_at_320(conv_type):
    with torch.device("meta"):
        model = VGG16Customizable(n_outputs=20, conv_type=conv_type, vgginit="random")
        out = model(torch.empty(2, 3, 320, 320))["out"]
    assert model.fc.in_features == (4608 if conv_type == "512to512_3x3" else 6400)
    assert out.shape == (2, 20)


@pytest.mark.parametrize("conv_type", CONV_TYPES)
def test_vgg16customizable_runs_on_the_smallest_images(conv_type):
    torch.manual_seed(0)
    model = VGG16Customizable(n_outputs=20, conv_type=conv_type, vgginit="random", image_size=96)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 96, 96))["out"]
    assert out.shape == (1, 20)
    assert torch.isfinite(out).all()


def test_vgg16_is_features_plus_the_512to256to64_head():
    torch.manual_seed(0)
    model = VGG16(n_outputs=7, image_size=96, pretrained=False)
    assert model.conv_type == "512to256to64_1x1" and model.vgginit == "random"
    convs = [m for m in model.conv2d if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (512, 256, (1, 1)),
        (256, 64, (1, 1)),
    ]
    assert model.fc.in_features == 64 * 3 * 3
    with torch.no_grad():
        assert model(torch.randn(2, 3, 96, 96))["out"].shape == (2, 7)


# Hand counts (weights out*in*k*k + biases out). VGG-16 features:
#   3->64 1,792 | 64->64 36,928 | 64->128 73,856 | 128->128 147,584 | 128->256 295,168
#   256->256 590,080 (x2) | 256->512 1,180,160 | 512->512 2,359,808 (x5)  = 14,714,688.
# Heads: 512to256to64_1x1  (512*256+256) + (256*64+64) = 131,328 + 16,448 = 147,776
#        512to64_1x1       512*64+64 = 32,832
#        512to512_3x3      512*512*9+512 = 2,359,808
# Linear at 320 px, 20 outputs: 1x1 heads 6400*20+20 = 128,020; 3x3 head 4608*20+20 = 92,180.
def test_parameter_counts_at_the_tutorials_settings():
    # TinyData, 3 outputs: conv 3->8 k3 (8*27+8 = 224) + conv 8->16 k3 (16*72+16 = 1,168)
    # + linear 144->3 (144*3+3 = 435) = 1,827.
    assert n_parameters(TinyConvWithoutSequential(n_outputs=3)) == 1_827
    assert n_parameters(TinyConv(n_outputs=3)) == 1_827
    with torch.device("meta"):  # counting needs shapes only
        vgg16 = VGG16(n_outputs=20, image_size=320, pretrained=False)
        customizable = {
            conv_type: VGG16Customizable(20, conv_type, vgginit="random", image_size=320)
            for conv_type in CONV_TYPES
        }
    assert n_parameters(vgg16.features) == 14_714_688
    assert n_parameters(vgg16) == 14_990_484  # 14,714,688 + 147,776 + 128,020
    assert {conv_type: n_parameters(m) for conv_type, m in customizable.items()} == {
        "512to256to64_1x1": 14_990_484,  # the tutorial's VGG16
        "512to64_1x1": 14_875_540,  # 14,714,688 + 32,832 + 128,020
        "512to512_3x3": 17_166_676,  # 14,714,688 + 2,359,808 + 92,180
    }


@pytest.mark.parametrize("size", [95, 64, 32])
def test_images_below_96_are_refused_with_the_minimum(size):
    for conv_type in CONV_TYPES:
        with pytest.raises(ValueError, match=str(MIN_IMAGE_SIZE)):
            VGG16Customizable(conv_type=conv_type, vgginit="random", image_size=size)
    with pytest.raises(ValueError, match="minimum is 96"):
        VGG16(image_size=size, pretrained=False)


def test_unknown_conv_type_and_vgginit_are_named():
    with pytest.raises(ValueError, match="512to32_1x1"):
        VGG16Customizable(conv_type="512to32_1x1", vgginit="random")
    with pytest.raises(ValueError, match="imagenet"):
        VGG16Customizable(vgginit="imagenet")


def test_images_of_another_size_than_built_for_are_refused():
    with torch.device("meta"):
        model = VGG16Customizable(vgginit="random", image_size=320)
        with pytest.raises(ValueError, match="320x320.*224x224"):
            model(torch.empty(1, 3, 224, 224))


def test_state_dict_keys_match_torchvision_vgg16_features():
    import torchvision

    with torch.device("meta"):
        ours = vgg16_features().state_dict()
        theirs = torchvision.models.vgg16().features.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


# ----------------------------------------------------------------- the tutorial's checkpoints


class TutorialVGG(torch.nn.Module):
    """The tutorial's VGG16 layout: torchvision's features inside one more Sequential (its
    `list(vgg16().children())[:-2]`), the head called `conv`, then `fc`."""

    def __init__(self, n_outputs: int, image_size: int) -> None:
        import torchvision

        super().__init__()
        with torch.device("meta"):  # skips initializing the 120M-parameter classifier
            inner = torchvision.models.vgg16(weights=None).features
        inner = inner.to_empty(device="cpu")
        for layer in inner:
            if isinstance(layer, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                torch.nn.init.normal_(layer.bias, std=0.01)
        self.features = torch.nn.Sequential(inner)
        self.conv = torch.nn.Sequential(
            torch.nn.Conv2d(512, 256, kernel_size=1),
            torch.nn.ReLU(inplace=True),
            torch.nn.Conv2d(256, 64, kernel_size=1),
            torch.nn.ReLU(inplace=True),
        )
        side = image_size // 32
        self.fc = torch.nn.Linear(64 * side * side, n_outputs)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.conv(self.features(x))
        return {"out": self.fc(torch.flatten(x, 1))}


@pytest.fixture(scope="module")
def tutorial_vgg() -> TutorialVGG:
    torch.manual_seed(5)
    return TutorialVGG(n_outputs=20, image_size=96).eval()


def test_tutorial_vgg_keys_are_renamed_to_ours(tutorial_vgg: TutorialVGG):
    theirs = tutorial_vgg.state_dict()
    assert "features.0.28.bias" in theirs and "conv.2.weight" in theirs
    with torch.device("meta"):
        ours = VGG16(n_outputs=20, image_size=96, pretrained=False).state_dict()
    renamed = state_dict_from_tutorial(theirs)
    assert list(renamed) == list(ours)
    assert renamed["features.28.bias"] is theirs["features.0.28.bias"]
    assert renamed["conv2d.2.weight"] is theirs["conv.2.weight"]
    # The tutorial's checkpoint form, and keys already in our naming, give the same dict.
    assert state_dict_from_tutorial({"params": theirs, "optimizer": {}}) == renamed
    assert state_dict_from_tutorial(renamed) == renamed


def test_a_tutorial_vgg_state_dict_loads_into_vgg16(tutorial_vgg: TutorialVGG):
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = tutorial_vgg(x)["out"]
    for state in (
        tutorial_vgg.state_dict(),
        {"params": tutorial_vgg.state_dict(), "optimizer": {}},
    ):
        torch.manual_seed(6)  # different random weights: equal outputs come from `state`
        model = VGG16(n_outputs=20, image_size=96, pretrained=False).eval()
        model.load_state_dict(state)  # strict: every key matched
        with torch.no_grad():
            torch.testing.assert_close(model(x)["out"], expected, rtol=0, atol=0)
    customizable = VGG16Customizable(20, "512to256to64_1x1", vgginit="random", image_size=96)
    customizable.load_state_dict(tutorial_vgg.state_dict())
    # Inside a wrapper (as under DDP, prefix 'module.') the renaming still applies.
    wrapper = torch.nn.ModuleDict({"module": VGG16(20, image_size=96, pretrained=False)})
    wrapper.load_state_dict({f"module.{k}": v for k, v in tutorial_vgg.state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(wrapper["module"](x)["out"], expected, rtol=0, atol=0)


def test_a_state_dict_of_the_wrong_model_is_still_refused(tutorial_vgg: TutorialVGG):
    model = VGG16Customizable(20, "512to64_1x1", vgginit="random", image_size=96)
    with pytest.raises(RuntimeError, match="conv2d.2.weight"):
        model.load_state_dict(tutorial_vgg.state_dict())


class TutorialTinyConvWithoutSequential(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, kernel_size=3, stride=3)
        self.relu = torch.nn.ReLU(inplace=True)  # one ReLU, used twice
        self.conv2 = torch.nn.Conv2d(8, 16, kernel_size=3, stride=3)
        self.fc = torch.nn.Linear(16 * 3 * 3, 3)


class TutorialTinyConv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, kernel_size=3, stride=3),
            torch.nn.ReLU(inplace=True),
            torch.nn.Conv2d(8, 16, kernel_size=3, stride=3),
            torch.nn.ReLU(inplace=True),
        )
        self.fc = torch.nn.Linear(16 * 3 * 3, 3)


@pytest.mark.parametrize(
    ("theirs", "ours"),
    [(TutorialTinyConvWithoutSequential, TinyConvWithoutSequential), (TutorialTinyConv, TinyConv)],
)
def test_tutorial_tiny_model_state_dicts_load_unchanged(theirs, ours):
    state = theirs().state_dict()
    assert state_dict_from_tutorial(state) == dict(state)
    assert state_dict_from_tutorial({"params": state, "optimizer": {}}) == dict(state)
    model = ours(n_outputs=3)
    model.load_state_dict(state_dict_from_tutorial({"params": state, "optimizer": {}}))
    for key, value in state.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)


@pytest.fixture
def empty_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """TORCH_HOME in an empty folder, and no network (name lookups fail at once)."""
    home = tmp_path / "torch-home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(home / "hub"))

    def offline(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    yield home
    torch.hub.set_dir(previous)


def test_pretrained_without_weights_offline_is_one_clear_error(empty_torch_home: Path):
    expected = empty_torch_home / "hub" / "checkpoints"
    assert imagenet_weights_path() == expected / "vgg16-397923af.pth"
    with pytest.raises(PretrainedWeightsError) as info:
        VGG16Customizable(vgginit="pretrained", image_size=96)
    message = str(info.value)
    assert "vgg16-397923af.pth" in message
    assert str(expected) in message
    assert "vgginit='random'" in message
    assert isinstance(info.value, RuntimeError)
    with pytest.raises(PretrainedWeightsError):
        VGG16(image_size=96, pretrained=True)


def test_pretrained_loads_the_file_torchvision_keeps(empty_torch_home: Path):
    torch.manual_seed(1)
    reference = vgg16_features()
    state = {f"features.{k}": v for k, v in reference.state_dict().items()}
    # The real file also holds the classifier; those keys must be skipped.
    state["classifier.6.weight"] = torch.zeros(2, 2)
    path = imagenet_weights_path()
    path.parent.mkdir(parents=True)
    torch.save(state, path)

    torch.manual_seed(2)  # a different seed: equal weights can only come from the file
    model = VGG16Customizable(conv_type="512to64_1x1", vgginit="pretrained", image_size=96)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.features.state_dict()[key], value, rtol=0, atol=0)


def test_a_file_without_vgg_weights_is_a_clear_error(empty_torch_home: Path):
    path = imagenet_weights_path()
    path.parent.mkdir(parents=True)
    torch.save({"features.0.weight": torch.zeros(1)}, path)
    with pytest.raises(PretrainedWeightsError, match="vgg16-397923af.pth"):
        VGG16Customizable(vgginit="pretrained", image_size=96)


@pytest.mark.parametrize("size", [(9, 9), (32, 32), (48, 48), (64, 100), (320, 240)])
def test_tinyconv_any_size_takes_any_image_size(size):
    torch.manual_seed(0)
    out = TinyConvAnySize(n_outputs=4)(torch.randn(2, 3, *size))["out"]
    assert out.shape == (2, 4) and torch.isfinite(out).all()


def test_tinyconv_any_size_averages_the_conv_features():
    """One channel pattern tiled over a bigger image gives the same mean feature, hence the
    same logits: the pooling is an average over the whole image, by hand."""
    torch.manual_seed(0)
    model = TinyConvAnySize(n_outputs=2).eval()
    tile = torch.randn(1, 3, 9, 9)  # 9 x 9 -> 3 x 3 -> 1 x 1 after the two strided convs
    big = tile.repeat(1, 1, 3, 3)  # 27 x 27 -> 9 x 9 -> 3 x 3, nine copies of the same value
    with torch.no_grad():
        assert torch.allclose(model(tile)["out"], model(big)["out"], atol=1e-6)
    assert n_parameters(model) == 3 * 8 * 9 + 8 + 8 * 16 * 9 + 16 + 16 * 2 + 2
