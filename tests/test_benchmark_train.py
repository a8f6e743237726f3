"""benchmarks.train on the CPU with TinyConv (figures are printed, never asserted): the
rows, CSV and chart of the step benchmark, both default models, a failing variant as a row,
one-line argument errors, the FLOP count, the GPU peak table, and the pieces of --whole-run
(which itself takes minutes and is not run here)."""

from __future__ import annotations

import csv
import os
import sys

import numpy as np
import pytest

import benchmarks.train as bench
from benchmarks.loader import cpu_model
from src.config import load
from tests.test_evaluate import png_pixels

TINYCONV = ["--config", str(bench.DEMO2_CONFIG), "--batch-size", "4"]
QUICK = ["--device", "cpu", "--steps", "2", "--warmup", "1", "--repeats", "2"]
COLUMNS = [
    "device", "model", "image_size", "batch", "amp", "channels_last", "compile",
    "repo_images_per_s", "bare_images_per_s", "overhead_ratio", "data_wait_fraction", "mfu",
    "note",
]  # fmt: skip
BLUE, GREY = (31, 119, 180), (127, 127, 127)  # tab:blue (repo step), tab:gray (bare step)


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_step_benchmark_prints_every_row_and_writes_csv_and_png(tmp_path, capsys):
    out = tmp_path / "out"
    argv = TINYCONV + QUICK + ["--channels-last", "off", "on", "--out", str(out)]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "model: TinyConv (1,827 parameters, 3 outputs, random init) at 32 px, batch 4" in printed
    assert "1 warm-up steps, then 2 x 2 steps of each" in printed
    for layout in ("off", "on"):
        assert f"amp off, channels_last {layout}, compile off " in printed
    assert "failed" not in printed
    header, rows = read_csv(out / "results.csv")
    assert header == COLUMNS
    assert [(r["amp"], r["channels_last"], r["compile"]) for r in rows] == [
        ("off", "False", "False"),
        ("off", "True", "False"),
    ]
    for r in rows:
        assert (r["device"], r["model"], r["image_size"], r["batch"]) == (
            cpu_model(),
            "TinyConv",
            "32",
            "4",
        )
        repo, bare = float(r["repo_images_per_s"]), float(r["bare_images_per_s"])
        assert repo > 0 and bare > 0
        # The ratio of seconds per step is the inverse ratio of images/s (rounded to 2 places).
        assert float(r["overhead_ratio"]) == pytest.approx(bare / repo, rel=0.01)
        assert 0 <= float(r["data_wait_fraction"]) < 1
        assert r["mfu"] == "" and r["note"] == ""  # MFU is for CUDA only
    # figsize (8, 0.8 * 2 variants + 1.6) at 120 dpi; both steps' bars drawn.
    pixels = png_pixels(out / "images_per_s.png", (960, 384))
    for colour in (BLUE, GREY):
        assert (pixels == colour).all(axis=-1).sum() > 100


def test_default_models_are_vgg16_at_96_px_and_tinyconv_at_32_px(tmp_path, capsys):
    argv = ["--device", "cpu", "--batch-size", "2", "--steps", "1", "--warmup", "1"]
    assert bench.main(argv + ["--repeats", "1", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "model: VGG16 (14,874,004 parameters, 20 outputs, random init) at 96 px, batch 2 " in (
        printed
    )  # 14,714,688 features + 147,776 head + linear 64 * 3 * 3 * 20 + 20 = 11,540
    assert "of uint8 images" in printed
    assert "model: TinyConv (1,827 parameters, 3 outputs, random init) at 32 px, batch 2 " in (
        printed
    )
    assert "of float32 images" in printed
    summary = [line for line in printed.splitlines() if line.startswith("repo / bare step")]
    assert len(summary) == 1 and "VGG16 at 96 px " in summary[0]
    assert "TinyConv at 32 px " in summary[0] and summary[0].endswith("(goal <= 1.10x each)")
    _, rows = read_csv(tmp_path / "results.csv")
    assert [(r["model"], r["image_size"]) for r in rows] == [("VGG16", "96"), ("TinyConv", "32")]


def test_steps_default_to_a_pass_of_about_a_second(tmp_path, capsys):
    argv = ["--config", str(bench.DEMO2_CONFIG), "--device", "cpu", "--repeats", "1"]
    assert bench.main(argv + ["--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "at 32 px, batch 16 of float32 images" in printed  # Demo-2's batch
    timing = [line for line in printed.splitlines() if line.startswith("timing: ")]
    steps = int(timing[0].split(" x ")[1].split()[0])
    assert steps >= 3


def test_a_failing_variant_is_a_row_with_a_note(tmp_path, capsys, monkeypatch):
    import torch

    class BrokenCompiled(torch.nn.Module):  # fails at its first call, as Inductor does
        def forward(self, x):
            raise RuntimeError("C++ compile error\nInductor gave up\n  at line 3")

    def broken_compile(model):
        return BrokenCompiled()

    monkeypatch.setattr(torch, "compile", broken_compile)
    argv = TINYCONV + QUICK + ["--compile", "off", "on", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    note = "RuntimeError: C++ compile error Inductor gave up at line 3"
    failed = [line for line in captured.out.splitlines() if "failed" in line]
    assert len(failed) == 1 and failed[0].startswith("amp off, channels_last off, compile on ")
    assert failed[0].endswith(f" failed: {note}")
    _, rows = read_csv(tmp_path / "results.csv")
    assert [r["compile"] for r in rows] == ["False", "True"]
    assert float(rows[0]["repo_images_per_s"]) > 0 and rows[0]["note"] == ""
    assert rows[1]["repo_images_per_s"] == rows[1]["overhead_ratio"] == ""
    assert rows[1]["note"] == note


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--repeats", "0"], "error: --repeats must be at least 1, not 0"),
        (["--epochs", "3"], "error: --epochs goes with --whole-run"),
        (["--whole-run", "--amp", "off"], "error: --amp applies to the step benchmark, not"),
        (["--whole-run", "--set", "a=1"], "error: --set applies to the step benchmark, not"),
        (["--compile", "maybe"], "error: argument --compile: takes on or off, not 'maybe'"),
        (["--amp", "bf16", "--device", "cpu"], "error: --amp bf16/fp16 needs CUDA"),
        (["--device", "cpu", "--image-size", "64"], "error: [model.args] do not fit"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(argv, message, tmp_path, capsys):
    try:
        code = bench.main(argv + ["--out", str(tmp_path)])
    except SystemExit as e:
        code = e.code
    assert code == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(message) and captured.err.count("\n") == 1
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written


def test_training_step_flops_of_tinyconv_by_hand():
    tinyconv = {"model.model": "models.custom_models_base:TinyConv", "model.args": {"n_outputs": 3}}
    config = load(bench.DEFAULT_CONFIGS[0], tinyconv)
    # Per image, 2 FLOPs per multiply-add. conv1 3->8, 3x3 stride 3: 32 -> 10 x 10 outputs,
    # 2 * 800 * 27 = 43,200; conv2 8->16: 10 -> 3 x 3, 2 * 144 * 72 = 20,736; linear 144->3:
    # 864. Backward: conv1 its weight gradient only (the images need none) 43,200; conv2 input
    # and weight gradients 2 * 20,736; linear both, 2 * 864. Sum 151,200; two images.
    assert bench.training_step_flops(config, (2, 3, 32, 32), 3) == 2 * 151_200


def test_bf16_peak_by_device_name():
    assert bench.bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert bench.bf16_peak_tflops("NVIDIA H100 PCIe") == 756
    assert bench.bf16_peak_tflops("NVIDIA H200") == 989
    assert bench.bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert bench.bf16_peak_tflops("NVIDIA L40S") == 362
    assert bench.bf16_peak_tflops("NVIDIA GeForce RTX 4090") == 165
    assert bench.bf16_peak_tflops("Tesla T4") is None


def test_summary_line():
    runs = {"Demo-2": [12.3, 14.0, 11.0], "bare loop": [8.1, 10.0, 8.0]}
    # medians 12.3 / 8.1 = 1.518; rounds 1.519, 1.400, 1.375
    assert bench.summary_line(runs) == (
        "whole run: Demo-2 12.3 s, bare loop 8.1 s, ratio 1.52 (round by round 1.40, 1.38-1.52; "
        "goal <= 1.6x)"
    )


def test_time_processes_takes_turns_and_stops_at_a_failing_process(tmp_path):
    log = tmp_path / "order.txt"
    append = "import sys; open(sys.argv[1], 'a').write(sys.argv[2])"
    commands = {name: [sys.executable, "-c", append, str(log), name] for name in ("a", "b")}
    runs = bench.time_processes(commands, 2, dict(os.environ), tmp_path)
    assert log.read_text() == "abab"
    assert [len(seconds) for seconds in runs.values()] == [2, 2]
    assert all(s > 0 for seconds in runs.values() for s in seconds)

    failing = "import sys; print('boom', file=sys.stderr); sys.exit(1)"
    commands["c"] = [sys.executable, "-c", failing]
    with pytest.raises(bench.ProcessFailed, match=r"^c exited with code 1: boom$"):
        bench.time_processes(commands, 3, dict(os.environ), tmp_path)
    assert log.read_text() == "abab" + "ab"  # stopped in the first round, at c


def test_bare_demo2_script_trains_and_validates(capsys):
    config = load(bench.DEMO2_CONFIG)
    script = bench.bare_demo2_script(config, epochs=1)
    assert "lr=0.001, momentum=0.99" in script and "batch_size=16" in script
    exec(compile(script, "bare_demo2", "exec"), {"__name__": "__main__"})  # as `python -c` would
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("epoch 1  val_loss ")
    auroc = float(lines[0].split("val_auroc_mean ")[1])
    assert 0 <= auroc <= 1 and not np.isnan(auroc)
