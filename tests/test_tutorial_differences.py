"""benchmarks.tutorial_differences: the label comparison on hand-made masks, the printed table."""

from __future__ import annotations

import re

import numpy as np

import benchmarks.tutorial_differences as diffs
from load_dataset.generators.pascal_tree import make_pascal_tree

BOTTLE, PERSON, SHEEP = 5, 15, 17  # mask values; label index = value - 1


def test_one_pixel_wide_object_between_sampled_columns_is_lost_big_one_stays():
    # 500 wide x 375 high -> 320 x 320 with PIL NEAREST: output column x reads input column
    # floor((x + 0.5) * 500 / 320) = 0, 2, 3, 5, 7, 8, ...; column 1 is never read, column 2 is.
    mask = np.zeros((375, 500), dtype=np.uint8)
    mask[:, 1] = BOTTLE
    mask[:, 2] = SHEEP
    mask[100:200, 200:300] = PERSON
    lost, gained = diffs.label_changes(mask, 320)
    assert lost == [BOTTLE - 1]
    assert gained == []


def test_nothing_changes_when_every_class_is_sampled():
    mask = np.zeros((375, 500), dtype=np.uint8)
    mask[:, 0] = BOTTLE  # output column 0 reads input column 0
    mask[100:200, 200:300] = PERSON
    assert diffs.label_changes(mask, 320) == ([], [])


def test_abs_diff_stats_mean_percentile_and_max():
    stats = diffs.AbsDiffStats(bin_width=0.5, top=10.0)
    stats.add(np.array([-1.0, 0.2, 0.2, 0.2]))
    stats.add(np.array([0.2, 0.2, 0.2, 0.2, 0.2, 3.1]))
    assert stats.n == 10
    assert np.isclose(stats.mean(), (1.0 + 8 * 0.2 + 3.1) / 10)
    assert stats.max == 3.1
    assert stats.percentile(80) == 0.5  # 8 of 10 values lie in the bin [0, 0.5)
    assert stats.percentile(90) == 1.5  # the 9th, 1.0, in [1.0, 1.5)
    assert stats.percentile(99) == 3.5  # the 10th, 3.1, in [3.0, 3.5)


def test_tiny_tree_train_split_with_sbd(tmp_path, capsys):
    # VOC train: 2008_000002 (person, bicycle), 2008_000003 (car), 2008_000005 (dog and a
    # one-pixel bottle at row 45, column 61). 64 x 48 -> 8 x 8 with PIL NEAREST reads rows
    # 3, 9, .., 45 and columns 4, 12, .., 60: the bottle is lost, nothing else.
    # SBD train_noval: 4 ids, 2 of them also in VOC train.
    tree = make_pascal_tree(tmp_path)
    argv = ["--voc-dir", str(tree.voc_dir), "--sbd-dir", str(tree.sbd_dir)]
    assert diffs.main([*argv, "--split", "train", "--image-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "VOC 2012 train, 3 images compared at 8 x 8" in out
    assert re.search(r"images with another label vector\s+1 / 3 \(33\.3%\)", out)
    assert re.search(r"class labels lost by the resize\s+1 of 5 present \(20\.0%\); gained 0", out)
    assert re.search(r"most often lost\s+bottle 1\n", out)
    assert re.search(r"VOC train \+ SBD train_noval\s+7 entries", out)
    assert re.search(r"unique image ids\s+5\n", out)
    assert re.search(r"duplicates\s+2 \(28\.6% of the entries", out)


def test_synthetic_run_prints_the_table(capsys):
    assert diffs.main(["--synthetic", "3", "--image-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "data: synthetic 3 " in out and "VOC 2012 val, 3 images compared at 64 x 64" in out
    assert re.search(r"images with another label vector\s+\d+ / 3 \(\d+\.\d%\)", out)
    assert re.search(r"class labels lost by the resize\s+\d+ of [1-9]\d* present", out)
    assert "most often lost" in out
    number = r"\s+(\d+\.\d+)"
    for name in ("mean", "99th percentile", "max"):
        normalized, grey = map(float, re.search(rf"{name}{number}{number}\n", out).groups())
        assert normalized > 0 and grey > 0  # two different resizes never agree everywhere
    assert "duplicates" in out and "not measured (no --sbd-dir)" in out


def test_missing_folder_is_one_line_error(tmp_path, capsys):
    assert diffs.main(["--voc-dir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
