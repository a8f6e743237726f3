"""Bad data as users met it: 16-bit images, CSV rows without their file, images over Pillow's
pixel limit, an image of another size, a mask that does not fit its image, a file that is no
image (empty, truncated, text) in any dataset, with and without loader workers.

Each case either reads right now, or stops the command line with one line `error: ...` (exit
code 2) naming the file and what to do; none trains on garbage silently.
"""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image, ImageFile

from load_dataset.custom_pascal import PascalVOC2012, read_image
from load_dataset.custom_tiny import MissingFilesWarning, TinyData
from load_dataset.errors import DataError
from load_dataset.generators.pascal_tree import HEIGHT, WIDTH, make_pascal_tree
from load_dataset.images import open_rgb
from load_dataset.utils import IMAGENET_MEAN, IMAGENET_STD, compute_mean_std
from src.config import from_dict, read_toml
from src.train.build import build_dataset
from tests.tiny_fixtures import write_labels_csv

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "load_dataset" / "tiny_data"
DEMO2 = REPO / "experiments" / "demo2_tinyconv_tinydata.toml"
DEMO3 = REPO / "experiments" / "demo3_vgg16_pascal.toml"
GREY_LEVEL = 1 / 255 / min(IMAGENET_STD)  # one grey level in TinyData's normalized units


# ------------------------------------------------------------------ helpers


def write_png16(path: Path, pixels: np.ndarray) -> Path:
    """A 16-bit PNG of uint16 [H, W] (grey) or [H, W, 3] (RGB), written byte by byte: Pillow
    writes 16-bit grey PNGs but no 16-bit RGB ones."""
    pixels = np.asarray(pixels, dtype=">u2")  # PNG samples are big-endian
    height, width = pixels.shape[:2]
    colour_type = 2 if pixels.ndim == 3 else 0

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(b"\x00" + row.tobytes() for row in pixels.reshape(height, -1))  # filter 0
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    return path


def tiny_copy(tmp_path: Path) -> Path:
    """A writable copy of the shipped TinyData (150 train, 50 val, 50 test images, 32 x 32)."""
    data = tmp_path / "tiny"
    shutil.copytree(TINY, data)
    return data


def command_line(args: list[str], config: Path, tmp_path: Path, capsys) -> tuple[int, list[str]]:
    """A Demo's command line (`src.cli.main` with its experiment file) in this process: the exit
    code and the lines on stderr."""
    from src.cli import main

    capsys.readouterr()
    code = main(["--results-dir", str(tmp_path / "results"), *args], default_config=str(config))
    return code, capsys.readouterr().err.strip().splitlines()


def one_error_line(code: int, err: list[str]) -> str:
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ------------------------------------------------------------------ 1. 16-bit images


def test_16_bit_pngs_read_as_their_8_bit_equivalent(tmp_path):
    rng = np.random.default_rng(0)
    grey8 = rng.integers(0, 256, size=(6, 5), dtype=np.uint8)
    grey8[0, 0], grey8[0, 1] = 10, 226  # the values: 2,570 and 58,082 in 16 bits
    rgb8 = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    # v * 257 is v in 16 bits (0xVV -> 0xVVVV); so is v * 256 + anything below 256.
    below_one_level = rng.integers(0, 256, size=rgb8.shape)
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    write_png16(tmp_path / "rgb16.png", rgb8.astype(np.uint16) * 256 + below_one_level)
    Image.fromarray(grey8.astype(np.int32) * 257).save(tmp_path / "grey32.tif")  # mode "I"

    assert Image.open(tmp_path / "grey16.png").mode == "I;16"  # what the issue saw
    assert Image.open(tmp_path / "grey32.tif").mode == "I"
    expected_grey = np.repeat(grey8[:, :, None], 3, axis=2)
    for name, expected in [("grey16.png", expected_grey), ("rgb16.png", rgb8)]:
        got = np.asarray(open_rgb(tmp_path / name))
        assert got.dtype == np.uint8 and got.shape == (6, 5, 3)
        assert np.abs(got.astype(int) - expected).max() <= 1, name
        assert (got != 255).any(), f"{name} read as all white"
        padded = read_image(str(tmp_path / name), padded=True)[:3]  # PASCAL's reader
        assert torch.equal(padded, read_image(str(tmp_path / name)))
        assert np.array_equal(padded.permute(1, 2, 0).numpy(), got)
    assert np.array_equal(np.asarray(open_rgb(tmp_path / "grey32.tif")), expected_grey)


def test_tinydata_and_its_statistics_read_a_16_bit_png_as_the_8_bit_one(tmp_path):
    data = tiny_copy(tmp_path)
    path = data / "train" / "train_002.png"
    grey8 = np.asarray(Image.open(path).convert("L"))
    Image.fromarray(grey8).save(path)  # the 8-bit grey image
    ds = TinyData("train", data_dir=data)
    eight_bit = ds[1]["data"]
    stats8 = compute_mean_std([path])

    Image.fromarray(grey8.astype(np.uint16) * 256 + 100).save(path)  # the same in 16 bits
    assert Image.open(path).mode == "I;16"
    sixteen_bit = ds[1]["data"]
    assert sixteen_bit.shape == eight_bit.shape == (3, 32, 32)
    assert (sixteen_bit - eight_bit).abs().max() <= GREY_LEVEL + 1e-6
    white = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    assert not torch.allclose(sixteen_bit, white.view(3, 1, 1).expand(3, 32, 32))
    stats16 = compute_mean_std([path])
    assert np.allclose(stats16[0], stats8[0], atol=1 / 255)
    assert np.allclose(stats16[1], stats8[1], atol=1 / 255)


def test_a_32_bit_float_image_is_refused_by_name(tmp_path):
    path = tmp_path / "depth.tif"
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(path)
    with pytest.raises(DataError, match=r"depth.tif holds 32-bit floats"):
        open_rgb(path)


# ------------------------------------------------------------------ 2. files the CSV names


def test_a_csv_row_whose_file_is_gone_stops_the_command_line(mlflow_uri, tmp_path, capsys):
    data = tiny_copy(tmp_path)
    (data / "train" / "train_007.png").unlink()  # 249 of 250 images left
    code, err = command_line(["--data-dir", str(data), "--epochs", "1"], DEMO2, tmp_path, capsys)
    line = one_error_line(code, err)
    assert f"{data / 'tiny_labels.csv'} names 1 file(s)" in line
    assert "train_007.png" in line and "missing_files" in line
    assert not (tmp_path / "results").exists()  # stopped before training


def test_missing_files_are_named_and_counted_or_only_warned_of(tmp_path):
    data = tiny_copy(tmp_path)
    gone = [f"train_{i:03d}.png" for i in (3, 5, 8, 13, 21, 34)] + ["val_002.png"]
    for name in gone:
        (data / name.split("_")[0] / name).unlink()
    first_five = ", ".join(sorted(gone)[:5])
    with pytest.raises(DataError, match=f"names 7 file.*: {first_five} and 2 more;"):
        TinyData("val", data_dir=data)
    with pytest.warns(MissingFilesWarning, match=f"names 7 file.*: {first_five} and 2 more;"):
        ds = TinyData("train", data_dir=data, missing_files="warn")
    assert len(ds) == 150 - 6 and "train_003.png" not in ds.image_ids
    with pytest.raises(DataError, match="missing_files 'ignore'.*'error', 'warn'"):
        TinyData("train", data_dir=data, missing_files="ignore")


def test_missing_files_warn_is_set_from_the_command_line(tmp_path):
    """The flag as given on the command line reaches the data set (building it only)."""
    from src.cli import load_from_args, make_parser

    data = tiny_copy(tmp_path)
    (data / "train" / "train_007.png").unlink()
    args = ["--data-dir", str(data), "--set", 'data.args.missing_files="warn"']
    parsed = make_parser(str(DEMO2), "").parse_args(args)
    config = load_from_args(parsed.config, parsed)
    with pytest.warns(MissingFilesWarning, match="names 1 file.*train_007.png; going on"):
        assert len(build_dataset(config, "train")) == 149


# ------------------------------------------------------------------ 3. decompression bombs


@pytest.mark.parametrize("side", [40, 60], ids=["over the limit: Pillow warns", "over twice"])
def test_an_image_over_pillows_pixel_limit_is_one_line(
    mlflow_uri, tmp_path, capsys, monkeypatch, side
):
    data = tiny_copy(tmp_path)
    path = data / "val" / "val_001.png"  # read before training starts, by the contract check
    Image.new("RGB", (side, side), (200, 30, 30)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # 32 x 32 = 1,024 pass; 40 x 40 not
    code, err = command_line(["--data-dir", str(data)], DEMO2, tmp_path, capsys)
    line = one_error_line(code, err)
    assert f"Image {path} has {side * side:,} pixels" in line
    assert "PIL.Image.MAX_IMAGE_PIXELS = 1,500" in line and "if you trust the file" in line


def test_pillows_limit_also_holds_for_image_headers_and_masks(tmp_path, monkeypatch):
    tree = make_pascal_tree(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", WIDTH * HEIGHT - 1)  # Pillow would warn
    with pytest.raises(DataError, match=r"SegmentationClass/2008_000002.png has 3,072 pixels"):
        PascalVOC2012("train", tree.voc_dir, image_size=8)


# ------------------------------------------------------------------ 4. an image of another size


def test_an_image_of_another_size_is_one_line(mlflow_uri, tmp_path, capsys):
    data = tiny_copy(tmp_path)
    path = data / "train" / "train_010.png"
    Image.new("RGB", (64, 64), (10, 200, 10)).save(path)
    code, err = command_line(["--data-dir", str(data), "--epochs", "1"], DEMO2, tmp_path, capsys)
    line = one_error_line(code, err)
    assert f"Image {path} is 64 x 64 pixels" in line
    assert f"all 32 x 32, as {data / 'train' / 'train_001.png'} is" in line


def test_tinydata_checks_each_sample_against_the_first_training_image(tmp_path):
    data = tiny_copy(tmp_path)
    Image.new("RGB", (32, 40), (10, 200, 10)).save(data / "val" / "val_003.png")
    ds = TinyData("val", data_dir=data)
    assert ds.image_size_wh == (32, 32) and ds[1]["data"].shape == (3, 32, 32)
    with pytest.raises(DataError, match=r"val_003.png is 32 x 40 pixels \(width x height\)"):
        ds[2]


# ------------------------------------------------------------------ 5. a mask of another size


def shrink_image(tree, image_id: str = "2008_000003") -> Path:
    """Replaces the JPEG of `image_id` by one of 80 x 60 (its mask stays 64 x 48)."""
    path = tree.voc_image(image_id)
    Image.new("RGB", (80, 60), (90, 90, 90)).save(path)
    return path


MISMATCH = r"Mask .*2008_000003.png is 64 x 48 pixels but its image .*2008_000003.jpg is 80 x 60"


@pytest.mark.parametrize(
    "args",
    [
        {"augment": "none", "return_seglabel": False},  # Demo-3's settings
        {"augment": "flip", "return_seglabel": False},
        {"augment": "full"},
        {"augment": "none", "return_seglabel": False, "cache": "built before"},
        {"augment": "flip_scale_crop", "cache": "built now"},
    ],
    ids=lambda a: ", ".join(f"{k}={v}" for k, v in a.items()),
)
def test_a_mask_of_another_size_is_refused_when_the_dataset_is_built(tmp_path, args):
    tree = make_pascal_tree(tmp_path / "data")
    cache = args.pop("cache", None)
    if cache:
        args["cache_dir"] = tmp_path / "cache"
    if cache == "built before":  # labels and images from a cache of the good files
        PascalVOC2012("train", tree.voc_dir, tree.sbd_dir, image_size=8, **args)
    shrink_image(tree)
    with pytest.raises(DataError, match=MISMATCH):
        PascalVOC2012("train", tree.voc_dir, tree.sbd_dir, image_size=8, **args)


def test_an_sbd_mask_of_another_size_is_refused(tmp_path):
    tree = make_pascal_tree(tmp_path)
    path = tree.sbd_dir / "img" / "2008_000020.jpg"
    Image.new("RGB", (48, 64), (90, 90, 90)).save(path)  # turned: width and height swapped
    with pytest.raises(DataError, match=r"2008_000020.mat is 64 x 48 pixels .* is 48 x 64"):
        PascalVOC2012("train", tree.voc_dir, tree.sbd_dir, image_size=8)


def test_the_size_check_decodes_no_image(tmp_path, monkeypatch):
    """Building the data set reads each image's header only; a sample decodes its image once
    and no mask (Demo-3's settings)."""
    tree = make_pascal_tree(tmp_path)
    decoded: list[str] = []
    real_load = ImageFile.ImageFile.load

    def counting_load(self):
        if self.tile:  # a decode (a loaded image has no tiles left)
            decoded.append(Path(self.filename).suffix)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    ds = PascalVOC2012("train", tree.voc_dir, tree.sbd_dir, image_size=8, return_seglabel=False)
    assert ".png" in decoded and ".jpg" not in decoded  # VOC masks yes, images no
    decoded.clear()
    ds[0]
    assert decoded == [".jpg"]


def test_a_mask_of_another_size_stops_demo3s_command_line(mlflow_uri, tmp_path, capsys):
    tree = make_pascal_tree(tmp_path / "data")
    image = shrink_image(tree)
    code, err = command_line(
        ["--voc-dir", str(tree.voc_dir), "--sbd-dir", str(tree.sbd_dir), "--epochs", "1"],
        DEMO3,
        tmp_path,
        capsys,
    )
    line = one_error_line(code, err)
    assert str(image) in line and str(tree.voc_mask("2008_000003")) in line
    assert "64 x 48" in line and "80 x 60" in line


# ------------------------------------------------------------------ 6. a file that is no image


def zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def text(path: Path) -> None:
    path.write_text("Filename,LabelRed\nnotes about the photos, not a photo\n")


DAMAGES = {"zero bytes": zero_bytes, "truncated": truncated, "text in an image's name": text}


def noisy_images(folder: Path, prefix: str, n: int = 4) -> list[Path]:
    """n images of 32 x 32 noise, PNGs and JPEGs in turn (a few KB each: half of one is a
    truncated file, not a header cut short)."""
    rng = np.random.default_rng(len(prefix))
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{prefix}{i:03d}{'.jpg' if i % 2 else '.png'}" for i in range(n)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(path)
    return paths


def experiment_with_a_bad_val_image(
    kind: str, root: Path, damage: str, workers: int = 0
) -> tuple[Path, Path]:
    """(the TOML of a TinyConv experiment on a `kind` dataset whose second val image is
    damaged, that image).

    A val image: every epoch reads all of val (a training image may be the one the shuffle
    leaves out of the last, partial batch); not the first one, which the contract check
    reads before the run starts: found in the middle of an epoch, in a loader worker if any.
    """
    if kind == "TinyData":
        images = noisy_images(root / "train", "train_") + noisy_images(root / "val", "val_")
        rows = [[p.name, i % 2, 1 - i % 2] for i, p in enumerate(images)]
        write_labels_csv(root / "tiny_labels.csv", ["Filename", "x", "y"], rows)
        data = f'dataset = "load_dataset.custom_tiny:TinyData"\n[data.args]\ndata_dir = "{root}"'
        n_outputs, path = 2, images[5]
    elif kind == "PascalVOC2012":
        tree = make_pascal_tree(root)
        data = (
            'dataset = "load_dataset.custom_pascal:PascalVOC2012"\n[data.args]\n'
            f'voc_dataset_dir = "{tree.voc_dir}"\nsbd_dataset_dir = ""\nimage_size = 32'
        )
        n_outputs, path = 20, tree.voc_image("2008_000011")
    else:
        for split in ("train", "val"):
            for name in ("a", "b"):
                noisy_images(root / split / name, name)
        data = (
            f'dataset = "torchvision.datasets:{kind}"\nproblem = "multiclass"\n[data.args]\n'
            f'root = "{root}/{{setname}}"\n'
            '[data.args.transform]\nclass = "torchvision.transforms:ToTensor"'
        )
        n_outputs, path = 2, root / "val" / "a" / "a001.jpg"
    DAMAGES[damage](path)
    toml = root / "experiment.toml"
    toml.write_text(
        f'[run]\nexperiment_name = "bad-image"\n[train]\nepochs = 1\n'
        f"[data]\nbatch_size = 2\nnum_workers = {workers}\n{data}\n"
        '[model]\nmodel = "models.custom_models_base:TinyConv"\n'
        f"args = {{ n_outputs = {n_outputs} }}\n"
    )
    return toml, path


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("kind", ["TinyData", "PascalVOC2012", "ImageFolder", "DatasetFolder"])
def test_a_file_that_is_no_image_is_named_by_every_dataset(tmp_path, kind, damage):
    toml, path = experiment_with_a_bad_val_image(kind, tmp_path, damage)
    ds = build_dataset(from_dict(read_toml(toml)), "val")  # the first sample reads well
    with pytest.raises(DataError) as info:
        ds[1]
    assert str(info.value).startswith(f"Cannot read image {path}")
    assert "\n" not in str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize(
    "kind, damage",
    [
        ("TinyData", "zero bytes"),
        ("ImageFolder", "truncated"),
        ("DatasetFolder", "text in an image's name"),
        ("PascalVOC2012", "truncated"),
    ],
)
def test_a_file_that_is_no_image_stops_training_in_one_line(
    mlflow_uri, tmp_path, capsys, kind, damage, workers
):
    """The command line's one line `error: ...` naming the file, with and without loader
    workers (from a worker the error reaches the main process as a copy holding the worker's
    traceback); the run is marked FAILED and nothing is checkpointed."""
    toml, path = experiment_with_a_bad_val_image(kind, tmp_path / "data", damage, workers)
    code, err = command_line([], toml, tmp_path, capsys)
    line = one_error_line(code, err)
    assert line.startswith(f"error: Cannot read image {path}"), line
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("bad-image").experiment_id])
    assert run.info.status == "FAILED"
    assert not list((tmp_path / "results").glob("**/*.pt"))
