"""benchmarks.loader on a tiny synthetic tree (figures are printed, never asserted), the
synthetic VOC writer, and the training loop's speed switches on the CPU."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import benchmarks.loader as bench
from load_dataset.custom_pascal import PascalVOC2012
from load_dataset.generators.make_synthetic_voc import SIZES, write_synthetic_voc
from tests.test_evaluate import png_pixels

REPO = Path(__file__).resolve().parent.parent
PIPELINES = ["tutorial", "uncached", "cached", "decode"]
BAR_COLOURS = {"blue": (31, 119, 180), "grey": (127, 127, 127)}  # tab:blue, tab:gray


def bar_colours_top_to_bottom(pixels: np.ndarray) -> list[str]:
    """The bars' colours met going down one pixel column just right of where the horizontal
    bars start (the leftmost blue pixel: the bars all start at the axes' left edge)."""
    blue, grey = ((pixels == rgb).all(axis=-1) for rgb in BAR_COLOURS.values())
    x = int(np.flatnonzero(blue.any(axis=0))[0]) + 2
    column = np.where(blue[:, x], "blue", np.where(grey[:, x], "grey", ""))
    # one entry per run of equal pixels at least 5 high (a bar, not an anti-aliased edge)
    return [str(name) for name, run in itertools.groupby(column) if name and len(list(run)) >= 5]


def test_synthetic_run_prints_every_row_and_writes_csv_and_png(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--synthetic", "8", "--num-workers", "0", "1", "--repeats", "1"]
    argv += ["--batch-size", "4", "--image-size", "32", "--out", str(out)]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    for pipeline in PIPELINES:
        assert f"1 core   {pipeline}" in printed
    assert "loader   uncached        0" in printed and "loader   uncached        1" in printed
    assert "uncached / tutorial:" in printed and "target >= 5x" in printed
    assert "uncached / decode:" in printed and "cached / tutorial:" in printed
    assert "fastest loader: --num-workers" in printed
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["stage"], r["pipeline"], r["num_workers"]) for r in rows] == [
        ("1 core", "tutorial", ""),
        ("1 core", "uncached", ""),
        ("1 core", "cached", ""),
        ("1 core", "decode", ""),
        ("loader", "uncached", "0"),
        ("loader", "uncached", "1"),
    ]
    # 8 images on one core; the loader counts the batches after the first: 8 - 4.
    assert [int(r["images"]) for r in rows] == [8, 8, 8, 8, 4, 4]
    assert all(float(r["images_per_s"]) > 0 for r in rows)
    assert float(rows[0]["x_tutorial"]) == 1.0
    # figsize (8, 0.45 * 6 rows + 1.4) at 120 dpi. One bar per row, top to bottom in the
    # table's order: the four one-core pipelines in blue, then the two loader rows in grey.
    pixels = png_pixels(out / "images_per_s.png", (960, 492))
    assert bar_colours_top_to_bottom(pixels) == ["blue"] * 4 + ["grey"] * 2


def test_cached_sweep_reads_the_cache(tmp_path, capsys):
    argv = ["--synthetic", "3", "--num-workers", "0", "--repeats", "1", "--cached"]
    argv += ["--image-size", "16", "--out", str(tmp_path), "--cache-dir", str(tmp_path / "c")]
    assert bench.main(argv) == 0
    assert "loader   cached          0       3" in capsys.readouterr().out
    assert len(list((tmp_path / "c").glob("pascal_train_16px_*.images.npy"))) == 1


def test_missing_folder_is_one_line_and_exit_2(tmp_path, capsys):
    assert bench.main(["--voc-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: PASCAL VOC 2012 folder not found at ")
    assert "nowhere" in err and "data_README.md" in err and err.count("\n") == 1


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        bench.main(["--synthetic", "0"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        bench.main([])  # neither --voc-dir nor --synthetic
    assert "--synthetic" in capsys.readouterr().err


def test_target_verdicts_and_default_worker_list():
    speed = {"tutorial": 100.0, "uncached": 600.0, "cached": 4000.0, "decode": 1000.0}
    lines = bench.target_lines(speed)
    assert "6.00x" in lines[0] and lines[0].endswith("met")  # 600 / 100 >= 5
    assert "0.60x" in lines[1] and lines[1].endswith("met")  # 600 / 1000 >= 0.6
    assert "40.00x" in lines[2] and lines[2].endswith("MISSED")  # 4000 / 100 < 50
    assert bench.default_workers(1) == [0, 1]
    assert bench.default_workers(2) == [0, 1, 2]
    assert bench.default_workers(6) == [0, 1, 2, 4, 6]
    assert bench.default_workers(8) == [0, 1, 2, 4, 8]


def test_tutorial_sample_is_the_float_pipeline(tmp_path):
    root = write_synthetic_voc(tmp_path, 1, 1)
    ds = PascalVOC2012("train", root, image_size=20)
    entry = ds.entries[0]
    x, label = bench.tutorial_sample(entry.image_path, entry.mask_path, 20)
    assert x.shape == (3, 20, 20) and x.dtype.is_floating_point
    assert label == ds.labels[0].astype(int).tolist()
    assert bench.decode_alone(entry.image_path).shape[2] == 3


def test_synthetic_tree_is_a_voc_tree(tmp_path):
    root = write_synthetic_voc(tmp_path, 3, 2)
    lists = root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation"
    assert (lists / "train.txt").read_text() == "2012_000000\n2012_000001\n2012_000002\n"
    assert (lists / "val.txt").read_text() == "2012_000003\n2012_000004\n"
    for n in range(5):
        jpeg = root / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"2012_{n:06d}.jpg"
        with Image.open(jpeg) as im:
            assert im.format == "JPEG" and (im.height, im.width) in SIZES
        with Image.open(str(jpeg).replace("JPEGImages", "SegmentationClass")[:-3] + "png") as m:
            assert m.mode == "P" and m.size == im.size
            values = set(np.unique(np.asarray(m)).tolist())
        assert 0 in values and 255 in values and values <= set(range(21)) | {255}
        assert len(values - {0, 255}) >= 1  # at least one object class
    assert len(PascalVOC2012("train", root, image_size=16)) == 3
    # The same seed writes the same files.
    again = write_synthetic_voc(tmp_path / "again", 3, 2)
    first = (root / "VOCdevkit/VOC2012/JPEGImages/2012_000004.jpg").read_bytes()
    assert (again / "VOCdevkit/VOC2012/JPEGImages/2012_000004.jpg").read_bytes() == first
