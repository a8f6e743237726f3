"""TinyData on the shipped folder and on hand-made folders, and the script that makes the data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from load_dataset.custom_tiny import SHIPPED_DATA_DIR, TinyData
from load_dataset.errors import DataError
from load_dataset.generators.make_tiny_data import LABEL_COLOURS, main, make_tiny_data
from load_dataset.utils import IMAGENET_MEAN, IMAGENET_STD
from tests.tiny_fixtures import (
    TINY_LABELS,
    small_tiny_folder,
    solid_colour,
    write_labels_csv,
    write_png,
    write_tiny_folder,
)


def read_csv_rows(path: Path) -> dict[str, list[float]]:
    with path.open(newline="") as f:
        return {row["Filename"]: [float(row[k]) for k in TINY_LABELS] for row in csv.DictReader(f)}


# ------------------------------------------------------------------ the shipped data


@pytest.mark.parametrize("setname, count", [("train", 150), ("val", 50), ("test", 50)])
def test_shipped_data_matches_its_csv(setname, count):
    ds = TinyData(setname)
    rows = read_csv_rows(SHIPPED_DATA_DIR / "tiny_labels.csv")
    assert len(ds) == count == len(ds.image_ids)
    assert ds.label_meanings == ["LabelRed", "LabelBlue", "LabelYellow"]
    assert ds.image_ids == [f"{setname}_{i:03d}.png" for i in range(1, count + 1)]
    assert ds.labels.dtype == np.float32 and ds.labels.shape == (count, 3)
    assert ds.labels.tolist() == [rows[name] for name in ds.image_ids]
    assert ds.mean_std is None
    assert len(rows) == 250  # one row per image over all splits


def test_shipped_sample_is_the_imagenet_normalized_image():
    ds = TinyData("val")
    sample = ds[7]
    assert set(sample) == {"data", "label", "img_idx"} and sample["img_idx"] == 7
    assert sample["data"].shape == (3, 32, 32) and sample["data"].dtype == torch.float32
    assert sample["label"].dtype == torch.float32
    assert sample["label"].tolist() == ds.labels[7].tolist()
    pixels = np.asarray(Image.open(SHIPPED_DATA_DIR / "val" / ds.image_ids[7]).convert("RGB"))
    expected = (pixels.transpose(2, 0, 1) / 255.0 - np.reshape(IMAGENET_MEAN, (3, 1, 1))) / (
        np.reshape(IMAGENET_STD, (3, 1, 1))
    )
    np.testing.assert_allclose(sample["data"].numpy(), expected, atol=1e-5)


def test_shipped_data_is_found_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert len(TinyData("test")) == 50


def test_shipped_data_is_what_the_script_makes(tmp_path):
    # Pixels and labels, not bytes: another zlib may compress the same image differently.
    made = make_tiny_data(tmp_path / "made", seed=0)
    assert (made / "tiny_labels.csv").read_text() == (
        SHIPPED_DATA_DIR / "tiny_labels.csv"
    ).read_text()
    for split in ("train", "val", "test"):
        names = sorted(p.name for p in (made / split).iterdir())
        assert names == sorted(p.name for p in (SHIPPED_DATA_DIR / split).glob("*.png"))
        for name in names[::7]:
            a = np.asarray(Image.open(made / split / name))
            b = np.asarray(Image.open(SHIPPED_DATA_DIR / split / name))
            assert np.array_equal(a, b), f"{split}/{name}"


# ------------------------------------------------------------------ hand-made folders


def test_a_tmp_folder_with_its_own_label_columns(tmp_path):
    root = write_tiny_folder(
        tmp_path / "d",
        {
            "train": {"zebra.png": (1, 0), "apple.png": (0, 1), "mango.png": (1, 1)},
            "val": {"kiwi.png": (0, 0)},
        },
        label_names=("cat", "dog"),
    )
    ds = TinyData("train", data_dir=root)
    assert ds.label_meanings == ["cat", "dog"]
    assert ds.image_ids == ["apple.png", "mango.png", "zebra.png"]  # sorted, not CSV order
    assert ds.labels.tolist() == [[0, 1], [1, 1], [1, 0]]
    # The image is the one named: apple.png was written second (colour index 1).
    red, green, blue = solid_colour(1)
    expected_red = (red / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    assert ds[0]["data"][0, 5, 5].item() == pytest.approx(expected_red, abs=1e-5)
    assert ds[2]["label"].tolist() == [1.0, 0.0]
    assert TinyData("val", data_dir=str(root)).labels.tolist() == [[0, 0]]


def test_the_tutorials_original_file_names(tmp_path):
    # "001.png" and "01.png" would collide if the names were read as numbers.
    root = write_tiny_folder(
        tmp_path / "orig",
        {
            "train": {
                "002.png": (0, 1, 0),
                "0010.png": (1, 1, 0),
                "001.png": (1, 0, 0),
                "01.png": (0, 0, 1),
            },
            "val": {"003.png": (1, 1, 1)},
            "test": {"004.png": (0, 0, 0)},
        },
    )
    ds = TinyData("train", data_dir=root)
    assert ds.image_ids == ["001.png", "0010.png", "002.png", "01.png"]  # string order
    assert ds.labels.tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1]]


def test_files_that_are_not_images_are_ignored(tmp_path):
    root = small_tiny_folder(tmp_path / "d")
    (root / "train" / "notes.txt").write_text("not an image")
    (root / "train" / ".DS_Store").write_bytes(b"\x00\x01")
    (root / "train" / "._a.png").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork
    (root / "train" / "sub.png").mkdir()
    ds = TinyData("train", data_dir=root)
    assert ds.image_ids == ["a.png", "b.png"]
    assert ds.labels.tolist() == [[1, 0, 1], [0, 1, 0]]


def test_grey_and_palette_images_become_rgb(tmp_path):
    root = small_tiny_folder(tmp_path / "d")
    write_png(root / "train" / "a.png", np.full((32, 32), 51), mode="L")
    Image.new("P", (32, 32), 0).save(root / "train" / "b.png")
    ds = TinyData("train", data_dir=root)
    grey = ds[0]["data"]
    assert grey.shape == (3, 32, 32)
    assert grey[:, 0, 0].tolist() == pytest.approx(
        [(0.2 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)], abs=1e-5
    )
    assert ds[1]["data"].shape == (3, 32, 32)


def test_train_split_normalization_uses_the_training_images(tmp_path):
    root = write_tiny_folder(
        tmp_path / "d",
        {"train": {"a.png": (1,), "b.png": (0,)}, "val": {"c.png": (1,)}},
        label_names=("x",),
        size=2,
    )
    # Train pixels: four of solid_colour(0) = (0, 0, 255), four of solid_colour(1).
    r1, g1, b1 = (v / 255 for v in solid_colour(1))
    mean = (r1 / 2, g1 / 2, (1 + b1) / 2)
    std = (r1 / 2, g1 / 2, (1 - b1) / 2)  # two values, half each: std = |difference| / 2
    val = TinyData("val", data_dir=root, normalization="train_split")
    assert val.norm_mean == pytest.approx(mean) and val.norm_std == pytest.approx(std)
    c = np.array(solid_colour(2)) / 255
    expected = [(c[k] - mean[k]) / std[k] for k in range(3)]
    assert val[0]["data"][:, 1, 1].tolist() == pytest.approx(expected, abs=1e-4)
    assert val.mean_std is None
    cache = json.loads((root / "mean_std_cache.json").read_text())
    assert cache["mean"] == pytest.approx(mean) and cache["n_images"] == 2
    # The imagenet default ignores the cache and the training images.
    assert TinyData("val", data_dir=root).norm_mean == IMAGENET_MEAN


def test_train_split_normalization_refuses_a_constant_channel(tmp_path):
    root = write_tiny_folder(tmp_path / "d", {"train": {"a.png": (1,)}}, label_names=("x",))
    with pytest.raises(DataError, match="constant"):
        TinyData("train", data_dir=root, normalization="train_split")


LABELS_GIVEN = ["a name in the folder", "a path elsewhere", "--set", "--labels-csv"]


@pytest.mark.parametrize("given", LABELS_GIVEN)
def test_a_label_csv_of_another_name_or_place(tmp_path, monkeypatch, given):
    """A multi-label folder of one's own, its CSV named as one likes: an argument, a config
    key or a flag, no code. A relative name is taken in the data folder, a flag's from the
    current folder, as every path flag's."""
    from src.cli import load_from_args, make_parser
    from src.train.build import build_dataset

    root = write_tiny_folder(
        tmp_path / "beach",
        {"train": {"a.png": (1, 0, 1), "b.png": (0, 1, 1)}, "val": {"c.png": (1, 1, 0)}},
        label_names=("sky", "sea", "sand"),
    )
    elsewhere = tmp_path / "labels" / "beach.csv"
    elsewhere.parent.mkdir()
    (root / "tiny_labels.csv").rename(elsewhere)  # no tiny_labels.csv left to read instead
    if given == "a name in the folder":
        elsewhere.rename(root / "beach.csv")
        ds = TinyData("train", data_dir=root, labels_csv="beach.csv")
    elif given == "a path elsewhere":
        ds = TinyData("train", data_dir=root, labels_csv=str(elsewhere))
    else:
        flags = ["--data-dir", str(root)]
        if given == "--set":
            elsewhere.rename(root / "beach.csv")
            flags += ["--set", "data.args.labels_csv=beach.csv"]
        else:
            monkeypatch.chdir(elsewhere.parent)
            flags += ["--labels-csv", "beach.csv"]
        demo2 = (
            Path(__file__).resolve().parent.parent / "experiments" / "demo2_tinyconv_tinydata.toml"
        )
        parsed = make_parser(str(demo2), "").parse_args(flags)
        config = load_from_args(parsed.config, parsed)
        wanted = "beach.csv" if given == "--set" else str(elsewhere)
        assert config.data.args["labels_csv"] == wanted
        ds = build_dataset(config, "train")
    assert ds.label_meanings == ["sky", "sea", "sand"]
    assert ds.image_ids == ["a.png", "b.png"] and ds.labels.tolist() == [[1, 0, 1], [0, 1, 1]]


def test_the_label_csv_is_tiny_labels_csv_unless_given(tmp_path):
    root = small_tiny_folder(tmp_path / "d")
    assert TinyData("train", data_dir=root).label_meanings == list(TINY_LABELS)
    with pytest.raises(DataError, match=r"d/beach.csv is missing; .* labels_csv=, --labels-csv"):
        TinyData("train", data_dir=root, labels_csv="beach.csv")


# ------------------------------------------------------------------ errors


def test_unknown_setname_and_normalization(tmp_path):
    with pytest.raises(DataError, match="'valid'.*'train', 'val', 'test'"):
        TinyData("valid")
    with pytest.raises(ValueError, match="'zscore'"):
        TinyData("train", normalization="zscore")


def test_missing_folder_csv_or_split(tmp_path):
    with pytest.raises(DataError, match="no-such-folder"):
        TinyData("train", data_dir=tmp_path / "no-such-folder")
    root = small_tiny_folder(tmp_path / "d")
    (root / "tiny_labels.csv").unlink()
    with pytest.raises(DataError, match="tiny_labels.csv is missing"):
        TinyData("train", data_dir=root)
    root = small_tiny_folder(tmp_path / "e")
    for png in (root / "test").iterdir():
        png.unlink()
    (root / "test").rmdir()
    with pytest.raises(DataError, match=r"split folder .*test is missing"):
        TinyData("test", data_dir=root)
    assert len(TinyData("val", data_dir=root)) == 1


def test_image_without_a_csv_row(tmp_path):
    root = small_tiny_folder(tmp_path / "d")
    write_png(root / "train" / "stray.png", np.zeros((32, 32, 3)))
    with pytest.raises(DataError, match=r"stray.png has no row in .*tiny_labels.csv"):
        TinyData("train", data_dir=root)
    assert len(TinyData("val", data_dir=root)) == 1  # other splits are unaffected


@pytest.mark.parametrize("bad", ["2", "yes", "", "-1", "0.5"])
def test_label_that_is_not_0_or_1(tmp_path, bad):
    root = small_tiny_folder(tmp_path / "d")
    write_labels_csv(
        root / "tiny_labels.csv",
        ["Filename", *TINY_LABELS],
        [["a.png", 1, 0, 1], ["b.png", 0, bad, 0], ["c.png", 0, 0, 0], ["d.png", 1, 1, 1]],
    )
    with pytest.raises(DataError, match=r"LabelBlue of b.png in .*tiny_labels.csv"):
        TinyData("val", data_dir=root)


def test_labels_written_as_floats_are_accepted(tmp_path):
    root = small_tiny_folder(tmp_path / "d")
    write_labels_csv(
        root / "tiny_labels.csv",
        ["Filename", *TINY_LABELS],
        [["a.png", "1.0", "0.0", "1"], ["b.png", 0, 1, 0], ["c.png", 0, 0, 0], ["d.png", 1, 1, 1]],
    )
    assert TinyData("train", data_dir=root).labels.tolist() == [[1, 0, 1], [0, 1, 0]]


def test_malformed_csv(tmp_path):
    root = small_tiny_folder(tmp_path / "d")
    write_labels_csv(root / "tiny_labels.csv", ["Filename"], [["a.png"]])
    with pytest.raises(DataError, match="header row"):
        TinyData("train", data_dir=root)
    write_labels_csv(root / "tiny_labels.csv", ["Filename", "x"], [["a.png", 1], ["a.png", 0]])
    with pytest.raises(DataError, match="a.png appears twice"):
        TinyData("train", data_dir=root)
    (root / "tiny_labels.csv").write_text("Filename,x,y\na.png,1,0\n\nb.png,1\n")
    with pytest.raises(DataError, match="Line 4 .* has 2 fields"):  # blank lines count
        TinyData("train", data_dir=root)
    (root / "tiny_labels.csv").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(DataError, match="not a readable CSV"):
        TinyData("train", data_dir=root)


def test_corrupt_image_is_named_when_read(tmp_path):
    root = small_tiny_folder(tmp_path / "d")
    png = root / "train" / "b.png"
    png.write_bytes(png.read_bytes()[:40])
    ds = TinyData("train", data_dir=root)
    assert ds[0]["label"].tolist() == [1, 0, 1]  # a.png is fine
    with pytest.raises(DataError, match=r"Cannot read image .*b.png"):
        ds[1]


# ------------------------------------------------------------------ make_tiny_data


def test_make_tiny_data_is_deterministic_and_its_labels_are_the_pixels(tmp_path):
    a = make_tiny_data(tmp_path / "a", seed=3, counts=(6, 3, 2))
    b = make_tiny_data(tmp_path / "b", seed=3, counts=(6, 3, 2))
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert len(files_a) == 12  # 11 images and the CSV
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)

    rows = read_csv_rows(a / "tiny_labels.csv")
    assert list(rows)[:2] == ["train_001.png", "train_002.png"] and len(rows) == 11
    for split in ("train", "val", "test"):
        ds = TinyData(split, data_dir=a)
        for name, labels in zip(ds.image_ids, ds.labels):
            pixels = np.asarray(Image.open(a / split / name))
            assert pixels.shape == (32, 32, 3)
            present = [
                float(np.all(pixels == np.array(rgb), axis=-1).any())
                for rgb in LABEL_COLOURS.values()
            ]
            assert present == labels.tolist(), name

    other = make_tiny_data(tmp_path / "c", seed=4, counts=(6, 3, 2))
    assert (other / "tiny_labels.csv").read_bytes() != (a / "tiny_labels.csv").read_bytes()


def test_make_tiny_data_rewrites_a_folder_without_stale_files(tmp_path, capsys):
    out = tmp_path / "td"
    make_tiny_data(out, seed=0, counts=(5, 2, 2))
    (out / "mean_std_cache.json").write_text("{}")
    main(["--out", str(out), "--seed", "1", "--counts", "3", "1", "1"])
    assert "Wrote 5 images" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        "train_001.png",
        "train_002.png",
        "train_003.png",
    ]
    assert not (out / "mean_std_cache.json").exists()
    assert len(TinyData("train", data_dir=out)) == 3


def test_decoded_images_are_kept_after_their_first_read(monkeypatch):
    """Later epochs decode nothing (the loop read the same 150 PNGs again every epoch), and a
    kept sample is the sample a fresh read gives, in a tensor of its own."""
    from load_dataset import custom_tiny

    reads = []
    real_open_rgb = custom_tiny.open_rgb
    monkeypatch.setattr(custom_tiny, "open_rgb", lambda p: reads.append(p) or real_open_rgb(p))
    kept, fresh = TinyData("val"), TinyData("val", keep_decoded=False)
    first = [kept[i]["data"] for i in range(len(kept))]
    again = [kept[i]["data"] for i in range(len(kept))]
    assert len(reads) == len(kept)  # once each
    for a, b, i in zip(first, again, range(len(kept))):
        assert torch.equal(a, b) and torch.equal(a, fresh[i]["data"])
    first[0].mul_(0)  # changing a returned sample does not change what is kept
    assert torch.equal(kept[0]["data"], fresh[0]["data"])
    monkeypatch.setattr(custom_tiny, "KEEP_DECODED_BYTES", 0)
    capped = TinyData("val")
    capped[0]
    assert capped._decoded == {} and capped._decoded_bytes == 0  # over the cap: not kept
