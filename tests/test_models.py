"""models.components and models.custom_models_base: shapes, sizes, errors, weights, learning."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

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
    vgg16_features,
)

TINY_MODELS = (TinyConvWithoutSequential, TinyConv)


@pytest.mark.parametrize("cls", TINY_MODELS)
def test_tiny_models_map_32x32_images_to_logits(cls):
    model = cls(n_outputs=5)
    out = model(torch.zeros(2, 3, 32, 32))
    assert set(out) == {"out"}
    assert out["out"].shape == (2, 5)
    # conv 3->8 k3 (8*27+8) + conv 8->16 k3 (16*72+16) + linear 144->5 (144*5+5)
    assert sum(p.numel() for p in model.parameters()) == 224 + 1168 + 725


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


def test_vgg16_is_features_plus_the_512to64_head():
    torch.manual_seed(0)
    model = VGG16(n_outputs=7, image_size=96, pretrained=False)
    assert model.conv_type == "512to64_1x1" and model.vgginit == "random"
    assert model.fc.in_features == 64 * 3 * 3
    with torch.no_grad():
        assert model(torch.randn(2, 3, 96, 96))["out"].shape == (2, 7)


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
