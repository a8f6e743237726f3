"""load_dataset.images: one reader for every image the repository decodes.

For each file format a user may bring, the pixels `open_rgb` gives are the hand-computed
ones (EXIF orientation applied, 16-bit scaled, alpha dropped), and every way an image reaches
a model gives it the same pixels: the training sample of each dataset class (TinyData,
PascalVOC2012, torchvision's ImageFolder and DatasetFolder as the training set-up builds
them) equals what `python -m src.serve.predict` hands the run's MLflow model. A file of several
frames and an image over Pillow's pixel limit are refused by all of them alike, naming the file.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import DatasetFolder, Food101, ImageFolder

import src.config as cfg
from load_dataset.builtin import TorchvisionClassification
from load_dataset.custom_tiny import TinyData
from load_dataset.errors import DataError
from load_dataset.generators.pascal_tree import HEIGHT, WIDTH, make_pascal_tree
from load_dataset.images import image_size, is_image_file, list_images, open_rgb, reader_args
from src.serve.model_package import input_transform_of
from src.serve.predict import read_images
from src.train.build import build_dataset
from tests.test_bad_data import write_png16
from tests.tiny_fixtures import write_labels_csv, write_png

BLOCK = 16  # the test images are 4 x 3 blocks of 16 x 16 pixels: WIDTH x HEIGHT = 64 x 48
ORIENTATION = 0x0112  # the EXIF tag
LOSSY = 4  # JPEG's error on uniform 16 x 16 blocks (no chroma subsampling), in grey levels


def blocks(values: np.ndarray) -> np.ndarray:
    """[3, 4, ...] block values -> [48, 64, ...] pixels, each value a 16 x 16 block."""
    return np.repeat(np.repeat(values, BLOCK, axis=0), BLOCK, axis=1)


K = np.arange(12).reshape(3, 4)  # the block numbers, row by row
COLOURS = blocks(np.stack([20 * K + 10, 255 - 20 * K, 70 * K % 256], axis=-1)).astype(np.uint8)
GREYS = blocks(20 * K + 10).astype(np.uint8)


def grey_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1)


# Each writer saves a file that shows the picture it returns: uint8 [48, 64, 3] RGB, by hand.
def jpeg_grey(path: Path) -> np.ndarray:
    Image.fromarray(GREYS, "L").save(path, "JPEG", quality=95)
    return grey_rgb(GREYS)


def jpeg_cmyk(path: Path) -> np.ndarray:
    cmyk = np.concatenate([255 - COLOURS, np.zeros((HEIGHT, WIDTH, 1), np.uint8)], axis=-1)
    Image.fromarray(cmyk, "CMYK").save(path, "JPEG", quality=95)
    return COLOURS  # K = 0: R = 255 - C, G = 255 - M, B = 255 - Y


def jpeg_exif_orientation(path: Path) -> np.ndarray:
    """Stored 48 wide x 64 high, turned a quarter to the left; orientation 6 says "turn it a
    quarter to the right to show it", as a phone held upright writes it."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    stored = np.ascontiguousarray(np.rot90(COLOURS))  # numpy turns to the left
    Image.fromarray(stored).save(path, "JPEG", quality=95, subsampling=0, exif=exif)
    return COLOURS


def png_16_bit(path: Path) -> np.ndarray:
    write_png16(path, GREYS.astype(np.uint16) * 257)  # 257 * v is v in 16 bits
    return grey_rgb(GREYS)


def png_palette(path: Path) -> np.ndarray:
    palette = COLOURS[::BLOCK, ::BLOCK].reshape(-1)  # colour k at index k
    image = Image.fromarray(blocks(K).astype(np.uint8), "P")
    image.putpalette(palette.tolist())
    image.save(path)
    return COLOURS


def png_rgba(path: Path) -> np.ndarray:
    alpha = blocks(np.where(K % 2, 0, 128)).astype(np.uint8)[..., None]  # see-through blocks
    Image.fromarray(np.concatenate([COLOURS, alpha], axis=-1), "RGBA").save(path)
    return COLOURS  # the alpha channel is dropped, the colours stay


def png_1_bit(path: Path) -> np.ndarray:
    checkers = blocks((K // 4 + K % 4) % 2).astype(bool)
    Image.fromarray(checkers).save(path)  # bool: mode "1"
    return grey_rgb(np.where(checkers, 255, 0).astype(np.uint8))


def webp(path: Path) -> np.ndarray:
    Image.fromarray(COLOURS).save(path, "WEBP", lossless=True)
    return COLOURS


def tiff(path: Path) -> np.ndarray:
    Image.fromarray(COLOURS).save(path, "TIFF")
    return COLOURS


def gif(path: Path) -> np.ndarray:
    png_palette(path.with_suffix(".png"))
    with Image.open(path.with_suffix(".png")) as im:
        im.save(path, "GIF")
    path.with_suffix(".png").unlink()
    return COLOURS


def bmp(path: Path) -> np.ndarray:
    Image.fromarray(COLOURS).save(path, "BMP")
    return COLOURS


def pgm(path: Path) -> np.ndarray:
    Image.fromarray(GREYS, "L").save(path, "PPM")
    return grey_rgb(GREYS)


FORMATS: dict[str, tuple[str, Callable[[Path], np.ndarray], int]] = {
    # name: (suffix, writer, the largest error allowed: JPEG is lossy)
    "JPEG grey": (".jpg", jpeg_grey, LOSSY),
    "JPEG CMYK": (".jpg", jpeg_cmyk, LOSSY),
    "JPEG with EXIF orientation": (".jpg", jpeg_exif_orientation, LOSSY),
    "PNG 16-bit grey": (".png", png_16_bit, 0),
    "PNG palette": (".png", png_palette, 0),
    "PNG RGBA": (".png", png_rgba, 0),
    "PNG 1-bit": (".png", png_1_bit, 0),
    "WebP": (".webp", webp, 0),
    "TIFF": (".tiff", tiff, 0),
    "GIF": (".gif", gif, 0),
    "BMP": (".bmp", bmp, 0),
    "PGM": (".pgm", pgm, 0),
}


def write_format(folder: Path, name: str, fmt: str) -> tuple[Path, np.ndarray, int]:
    suffix, writer, tolerance = FORMATS[fmt]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}{suffix}"
    return path, writer(path), tolerance


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_as_the_picture_it_shows(tmp_path, fmt):
    path, shown, tolerance = write_format(tmp_path, "image", fmt)
    image = open_rgb(path)
    assert image.mode == "RGB" and image.size == (WIDTH, HEIGHT)
    error = np.abs(np.asarray(image).astype(int) - shown).max()
    assert error <= tolerance
    assert image_size(path) == (WIDTH, HEIGHT)  # from the header, orientation included
    assert list_images(tmp_path) == [path]


def test_without_the_orientation_the_photo_would_lie_on_its_side(tmp_path):
    """The check above can fail: Pillow alone gives the stored, turned pixels."""
    path, shown, _ = write_format(tmp_path, "photo", "JPEG with EXIF orientation")
    with Image.open(path) as im:
        assert im.size == (HEIGHT, WIDTH)
    assert np.asarray(open_rgb(path))[0, 0].tolist() != np.asarray(Image.open(path))[0, 0].tolist()


# ---------------------------------------------------------------- training sees what predict sees

DATASETS = ("TinyData", "PascalVOC2012", "ImageFolder", "DatasetFolder")


def training_set_with(kind: str, root: Path, write: Callable[[Path, str], Path]) -> tuple:
    """(the config of a `kind` dataset whose first training image is `write(folder, name)`,
    that file). The other files are plain PNGs of the same size."""
    plain = np.full((HEIGHT, WIDTH, 3), 90, np.uint8)
    tree: dict = {"data": {"problem": "multiclass"}}
    if kind == "TinyData":
        path = write(root / "train", "a")
        write_png(root / "train" / "b.png", plain)
        rows = [[path.name, 1, 0], ["b.png", 0, 1]]
        write_labels_csv(root / "tiny_labels.csv", ["Filename", "x", "y"], rows)
        data = {"dataset": "load_dataset.custom_tiny:TinyData", "args": {"data_dir": str(root)}}
        tree["data"] = {**data, "problem": "multilabel"}
    elif kind == "PascalVOC2012":
        voc = make_pascal_tree(root).voc_dir
        first = voc / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2008_000002.jpg"
        path = write(first.parent, "2008_000002")
        if path != first:  # VOC lists <id>.jpg: the bytes of another format under that name
            shutil.move(path, first)
            path = first
        args = {"voc_dataset_dir": str(voc), "sbd_dataset_dir": "", "image_size": 32}
        tree["data"] = {"dataset": "load_dataset.custom_pascal:PascalVOC2012", "args": args}
        tree["data"]["problem"] = "multilabel"
    else:
        path = write(root / "train" / "a", "image")
        write_png(root / "train" / "b" / "plain.png", plain)
        args = {"root": str(root / "{setname}")}
        args["transform"] = {"class": "torchvision.transforms:ToTensor"}
        tree["data"] |= {"dataset": f"torchvision.datasets:{kind}", "args": args}
    return cfg.from_dict(tree), path


def served(dataset, pixels: np.ndarray) -> torch.Tensor:
    """What the run's MLflow model feeds on for an image [H, W, 3] uint8: the dataset's input
    transform, applied as `ImageClassifier.model_inputs` applies it."""
    return input_transform_of(dataset)(Image.fromarray(np.ascontiguousarray(pixels)))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", DATASETS)
def test_training_sees_what_predict_sees(tmp_path, kind, fmt):
    shown = {}

    def write(folder: Path, name: str) -> Path:
        path, shown["pixels"], _ = write_format(folder, name, fmt)
        return path

    config, path = training_set_with(kind, tmp_path, write)
    ds = build_dataset(config, "train")
    index = 0 if kind != "PascalVOC2012" else ds.image_ids.index("2008_000002")
    training = ds[index]["data"]
    ((read_path, predicted),) = read_images([path])[0]
    assert read_path == path
    assert torch.equal(training, served(ds, predicted))
    if FORMATS[fmt][2] == 0:  # lossless: also the picture itself, pixel for pixel
        assert torch.equal(training, served(ds, shown["pixels"]))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_torchvision_dataset_of_image_files_reads_them_as_predict_does(tmp_path, fmt):
    """TorchvisionClassification over a class that reads files through a `loader` (Food101's
    layout: food-101/meta/<split>.json, food-101/images/<class>/<name>.jpg)."""
    food = tmp_path / "food-101"
    (food / "meta").mkdir(parents=True)
    (food / "meta" / "test.json").write_text(json.dumps({"cake": ["cake/1"], "pie": ["pie/1"]}))
    path, _, _ = write_format(food / "images" / "cake", "1", fmt)
    if path.suffix != ".jpg":  # Food101 lists <name>.jpg: another format's bytes under it
        path = path.rename(path.with_suffix(".jpg"))
    write_png(food / "images" / "pie" / "1.png", np.zeros((HEIGHT, WIDTH, 3))).rename(
        food / "images" / "pie" / "1.jpg"
    )
    ds = TorchvisionClassification("test", name="Food101", root=str(tmp_path))
    ((_, predicted),) = read_images([path])[0]
    assert ds.label_meanings == ["cake", "pie"]
    assert torch.equal(ds[0]["data"], served(ds, predicted))


def test_imagefolder_without_the_repositorys_reader_sees_other_pixels(tmp_path):
    """The comparison above can fail: torchvision's own loader clips a 16-bit PNG to white
    and leaves GIFs out."""

    def write(folder: Path, name: str) -> Path:
        write_format(folder, "z", "GIF")
        return write_format(folder, name, "PNG 16-bit grey")[0]

    config, _ = training_set_with("ImageFolder", tmp_path, write)
    own = ImageFolder(str(tmp_path / "train"))
    assert (np.asarray(own[0][0]) == 255).all()  # 257 * v > 255 for every v here
    assert len(own) == 2  # image.png and b/plain.png; z.gif is not listed
    ours = build_dataset(config, "train")
    assert len(ours) == 3
    pixels = (ours[0]["data"] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert (pixels == grey_rgb(GREYS)).all()


def test_folder_datasets_get_the_reader_unless_the_config_gives_their_own():
    both = {"loader": open_rgb, "is_valid_file": is_image_file}
    assert reader_args(Food101, {"split": "train"}) == {"loader": open_rgb}
    assert reader_args(ImageFolder, {"root": "r"}) == both
    assert reader_args(DatasetFolder, {"root": "r"}) == both
    assert reader_args(DatasetFolder, {"extensions": [".npy"]}) == {"loader": open_rgb}
    assert reader_args(ImageFolder, {"loader": "x"}) == {}
    assert reader_args(TinyData, {}) == {}

    class OwnReader(ImageFolder):
        def __init__(self, root, loader=np.load) -> None:
            super().__init__(root, loader=loader)

    assert reader_args(OwnReader, {}) == {}  # a class's own loader is its choice


# ---------------------------------------------------------------- refused alike, by name


def write_frames(path: Path, n: int = 2) -> Path:
    """A file of `n` frames of different colours (an animation, or a multi-page TIFF)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [Image.new("RGB", (WIDTH, HEIGHT), (40 * i, 90, 200)) for i in range(n)]
    fmt = {".gif": "GIF", ".png": "PNG", ".webp": "WEBP", ".tiff": "TIFF"}[path.suffix]
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:])
    return path


def read_by(kind: str, tmp_path: Path, write: Callable[[Path, str], Path]) -> tuple[str, Path]:
    """The one-line error of reading the training image `write` gives through `kind` (a dataset
    built as training builds it, or predict's list of skipped files)."""
    if kind == "predict":
        path = write(tmp_path, "image")
        read, failed = read_images([path])
        assert read == [] and len(failed) == 1
        return failed[0][1], path
    config, path = training_set_with(kind, tmp_path, write)
    with pytest.raises(DataError) as info:
        build_dataset(config, "train")  # the contract check reads the first sample
    return str(info.value), path


@pytest.mark.parametrize("suffix", [".gif", ".png", ".webp", ".tiff"])
@pytest.mark.parametrize("kind", [*DATASETS, "predict"])
def test_a_file_of_several_frames_is_refused_by_name(tmp_path, kind, suffix):
    message, path = read_by(kind, tmp_path, lambda d, n: write_frames(d / f"{n}{suffix}", 3))
    assert f"Image {path} holds 3 frames" in message and "\n" not in message


def test_a_cameras_mpo_photo_is_read_as_its_first_frame(tmp_path):
    """A multi-picture JPEG (stereo, depth or preview images after the photo) is a photo."""
    photo, preview = Image.fromarray(COLOURS), Image.new("RGB", (WIDTH, HEIGHT), (0, 0, 0))
    path = tmp_path / "camera.jpg"
    photo.save(path, "MPO", save_all=True, append_images=[preview], quality=95, subsampling=0)
    error = np.abs(np.asarray(open_rgb(path)).astype(int) - COLOURS).max()
    assert error <= LOSSY


@pytest.mark.parametrize("side", [40, 60], ids=["over the limit: Pillow warns", "over twice"])
@pytest.mark.parametrize("kind", ["TinyData", "ImageFolder", "DatasetFolder", "predict"])
def test_an_image_over_pillows_limit_is_refused_by_name(tmp_path, monkeypatch, kind, side):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # 40 x 40 = 1,600; 60 x 60 = 3,600

    def write(folder: Path, name: str) -> Path:
        return write_png(folder / f"{name}.png", np.full((side, side, 3), 7))

    message, path = read_by(kind, tmp_path, write)
    assert f"Image {path} has {side * side:,} pixels, over Pillow's limit" in message


def test_hidden_files_and_other_suffixes_are_not_images(tmp_path):
    for name in ("a.PNG", "b.jpeg", "c.gif", "d.ppm", "._e.png", "f.txt", "g.png.bak"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "h.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.PNG", "b.jpeg", "c.gif", "d.ppm"]


@pytest.mark.parametrize(
    "content",
    [b"", b"just some text, not a picture", b"GIF89a" + b"\x00" * 4],
    ids=["zero bytes", "text", "a header alone"],
)
def test_a_file_that_is_no_image_is_one_sentence(tmp_path, content):
    path = tmp_path / "photo.jpg"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        open_rgb(path)
    assert str(info.value).startswith(f"Cannot read image {path}")
    assert "replace or remove it" in str(info.value) and "\n" not in str(info.value)


def test_a_format_outside_the_list_is_refused_even_under_an_image_name(tmp_path):
    path = tmp_path / "looks_like.png"
    Image.new("RGB", (4, 4)).save(path, "TGA")
    with pytest.raises(DataError, match=r"looks_like.png: it is no PNG, JPEG, .* image"):
        open_rgb(path)
