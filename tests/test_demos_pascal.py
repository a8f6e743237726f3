"""Demo-0, Demo-3 and Demo-4 as a user runs them, against a tiny VOC + SBD tree on disk."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from load_dataset.generators.pascal_tree import VOC_VAL, make_pascal_tree
from tests.command_line import run_here
from tests.test_run_experiment import QUICK_END

pytestmark = pytest.mark.slow  # whole Demos: seconds each

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def tree(tmp_path: Path):
    return make_pascal_tree(tmp_path / "data")


def demo_here(script: str, args: list[str], cwd: Path, capsys, monkeypatch):
    """`python SCRIPT ARGS` in this process (tests/command_line.py), without 10 s of imports
    for a new interpreter. `capfd` as `capsys` takes the output of Demo-0's pytest child too."""
    return run_here([str(REPO / script), *args], cwd, capsys, monkeypatch)


def runs_of(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    return client.search_runs([exp.experiment_id])


def artifact_paths(uri: str, run_id: str, folder: str = "") -> list[str]:
    client, out = MlflowClient(uri), []
    for item in client.list_artifacts(run_id, folder or None):
        out.extend(artifact_paths(uri, run_id, item.path) if item.is_dir else [item.path])
    return sorted(out)


def colour_count(png) -> dict[tuple[int, int, int], int]:
    """Pixels of each RGB colour in a PNG."""
    rgb = Image.open(png).convert("RGB")
    return Counter({c: n for n, c in rgb.getcolors(maxcolors=rgb.width * rgb.height)})


def test_demo0_runs_the_tests_then_draws_voc_samples_and_the_gallery(
    mlflow_uri, tree, tmp_path, capfd, monkeypatch
):
    out = demo_here(
        "Demo-0-Unit-Tests-and-Visualization.py",
        [
            "--voc-dir",
            str(tree.voc_dir),
            "--n-images",
            "2",
            "--image-size",
            "32",
            "--tests",
            "tests/test_utils.py",
            "--results-dir",
            str(tmp_path / "r"),
        ],
        tmp_path,
        capfd,
        monkeypatch,
    )
    assert out.returncode == 0, out.stderr
    assert "7 passed" in out.stdout  # pytest ran the chosen test file
    (run,) = runs_of(mlflow_uri, "Demo-0-Unit-Tests-and-Visualization")
    assert run.info.status == "FINISHED"
    val_ids = sorted(VOC_VAL)
    expected = [f"voc_val/{i}{suffix}.png" for i in val_ids for suffix in ("", "_resampled_32")]
    assert artifact_paths(mlflow_uri, run.info.run_id) == sorted(
        ["augmentation_gallery.png", *expected]
    )
    folder = tmp_path / "r" / "Demo-0" / run.info.run_id
    # 2008_000010 holds a bird (VOC colour (128, 128, 0)), 2008_000011 a tv_monitor
    # ((0, 64, 128)): each picture shows its own mask's colour and not the other's.
    bird = colour_count(folder / "voc_val" / "2008_000010.png")
    tv = colour_count(folder / "voc_val" / "2008_000011.png")
    assert bird[(128, 128, 0)] > 200 and bird[(0, 64, 128)] == 0
    assert tv[(0, 64, 128)] > 200 and tv[(128, 128, 0)] == 0
    # One row of images and one of masks per augmentation setting: 4 settings -> 8 rows
    # of 190 px, plus 40 px of title.
    gallery = Image.open(folder / "augmentation_gallery.png")
    assert gallery.size[1] == 1560
    assert len(colour_count(folder / "augmentation_gallery.png")) > 100  # drawn, not blank
    assert "skipped" not in out.stdout


def test_demo0_without_voc_still_tests_and_draws_the_gallery_on_tinydata(
    mlflow_uri, tmp_path, capfd, monkeypatch
):
    missing = tmp_path / "no_voc_here"
    # A test file of its own, which imports nothing: the child pytest starts in about a second
    # (the test above runs the tutorial's tests/test_utils.py, torch and all).
    passing = tmp_path / "test_passes.py"
    passing.write_text("def test_passes():\n    assert 1 + 1 == 2\n")
    out = demo_here(
        "Demo-0-Unit-Tests-and-Visualization.py",
        ["--voc-dir", str(missing), "--tests", str(passing)]
        + ["--results-dir", str(tmp_path / "r"), "--augment", "none", "flip"],
        tmp_path,
        capfd,
        monkeypatch,
    )
    assert out.returncode == 0, out.stderr
    assert "1 passed" in out.stdout
    assert f"skipped: the VOC pictures (PASCAL VOC 2012 folder not found at {missing}" in out.stdout
    assert "gallery on TinyData" in out.stdout
    (run,) = runs_of(mlflow_uri, "Demo-0-Unit-Tests-and-Visualization")
    assert artifact_paths(mlflow_uri, run.info.run_id) == ["augmentation_gallery.png"]
    # No masks for a TinyData image: one row per setting.
    gallery = tmp_path / "r" / "Demo-0" / run.info.run_id / "augmentation_gallery.png"
    assert Image.open(gallery).size[1] == 420  # two rows of 190 px, 40 px of title
    assert len(colour_count(gallery)) > 100


def test_demo0_stops_when_a_unit_test_fails(mlflow_uri, tmp_path, capfd, monkeypatch):
    failing = tmp_path / "test_fails.py"
    failing.write_text("def test_fails():\n    assert 1 == 2\n")
    out = demo_here(
        "Demo-0-Unit-Tests-and-Visualization.py",
        ["--tests", str(failing), "--results-dir", str(tmp_path / "r")],
        tmp_path,
        capfd,
        monkeypatch,
    )
    assert out.returncode == 1
    assert "error: the unit tests failed" in out.stderr
    assert (
        MlflowClient(mlflow_uri).get_experiment_by_name("Demo-0-Unit-Tests-and-Visualization")
        is None
    )


SMOKE = ["--epochs", "1", "--batch-size", "2", "--max-batches", "2", "--image-size", "96"]
SMOKE += ["--no-pretrained", "--num-workers", "0", "--device", "cpu"]


def test_demo3_one_epoch_on_the_fixture_tree(mlflow_uri, tree, tmp_path, capsys, monkeypatch):
    out = demo_here(
        "Demo-3-VGG16-PASCAL.py",
        # its MLflow model at 96 px: tests/test_model_package.py; the whole Demo as a process
        # of its own: make smoke
        ["--voc-dir", str(tree.voc_dir), "--sbd-dir", str(tree.sbd_dir), *SMOKE, *QUICK_END]
        + ["--results-dir", str(tmp_path / "r")],
        tmp_path,
        capsys,
        monkeypatch,
    )
    assert out.returncode == 0, out.stderr
    assert "ui --backend-store-uri" in out.stdout
    (run,) = runs_of(mlflow_uri, "Demo-3-VGG16-PASCAL")
    assert run.info.status == "FINISHED"
    params, tags = run.data.params, run.data.tags
    assert params["model.args.pretrained"] == "False"
    assert params["data.args.image_size"] == params["model.args.image_size"] == "96"
    assert params["train.max_batches"] == "2"
    # 3 VOC train + 4 SBD train_noval - 2 ids in both = 5 training images, 2 val images.
    assert (tags["data.train.count"], tags["data.val.count"]) == ("5", "2")
    assert tags["data.train.duplicates_dropped"] == "2"
    client = MlflowClient(mlflow_uri)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [1]
    # val = one bird image and one tv_monitor image: only these two classes have both a
    # positive and a negative; every other class gets NaN, which is not logged.
    assert {k for k in run.data.metrics if k.startswith("val_auroc/")} == {
        "val_auroc/bird",
        "val_auroc/tv_monitor",
    }


def test_demo3_pointed_at_a_missing_folder_says_so_in_one_line(
    mlflow_uri, tmp_path, capsys, monkeypatch
):
    missing = tmp_path / "nowhere"
    args = ["--voc-dir", str(missing), *SMOKE]
    out = demo_here("Demo-3-VGG16-PASCAL.py", args, tmp_path, capsys, monkeypatch)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: PASCAL VOC 2012 folder not found")
    assert str(missing) in lines[0] and "data_README.md" in lines[0]
    assert "Traceback" not in out.stderr


def test_demo4_grid_of_random_init_children_under_one_parent(
    mlflow_uri, tree, tmp_path, capsys, monkeypatch
):
    """Two cells at once (`--workers 2`, two worker processes) under one parent; a cell's
    metrics are those of the same cell trained on its own, as the same seed gives."""
    data = ["--voc-dir", str(tree.voc_dir), "--sbd-dir", str(tree.sbd_dir), *SMOKE]
    data += ["--results-dir", str(tmp_path / "r")]
    grid = ["--conv-types", "512to64_1x1", "512to256to64_1x1", "--workers", "2", *QUICK_END]
    out = demo_here(
        "Demo-4-VGG16Customizable-PASCAL.py", [*data, *grid], tmp_path, capsys, monkeypatch
    )
    assert out.returncode == 0, out.stderr
    assert "ui --backend-store-uri" in out.stdout
    runs = runs_of(mlflow_uri, "Demo-4-VGG16Customizable-PASCAL")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.info.run_name for r in children) == [
        "512to256to64_1x1-random",
        "512to64_1x1-random",
    ]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert {r.data.params["model.args.vgginit"] for r in children} == {"random"}
    assert artifact_paths(mlflow_uri, parents[0].info.run_id) == ["summary/children.csv"]
    assert "best_val_auroc_mean.mean" in parents[0].data.metrics

    # A cell again, on its own (in this process): the same metrics.
    cells = ["--conv-types", "512to64_1x1", "--workers", "1", *QUICK_END]
    one = demo_here(
        "Demo-4-VGG16Customizable-PASCAL.py",
        [*data, *cells, "--experiment-name", "one-at-a-time"],
        tmp_path,
        capsys,
        monkeypatch,
    )
    assert one.returncode == 0, one.stderr
    alone = {r.info.run_name: r.data.metrics for r in runs_of(mlflow_uri, "one-at-a-time")}
    for r in children:
        if r.info.run_name in alone:
            for key in ("best_val_loss", "best_val_auroc_mean"):
                # equal up to the order of float sums: a worker uses its share of the cores
                expected = pytest.approx(r.data.metrics[key], rel=1e-6)
                assert alone[r.info.run_name][key] == expected, (r.info.run_name, key)
    assert len(set(alone) & {r.info.run_name for r in children}) == 1


def test_demo4_no_pretrained_contradicting_vgginits_is_refused(
    mlflow_uri, tree, tmp_path, capsys, monkeypatch
):
    out = demo_here(
        "Demo-4-VGG16Customizable-PASCAL.py",
        ["--voc-dir", str(tree.voc_dir), "--no-pretrained", "--vgginits", "pretrained"],
        tmp_path,
        capsys,
        monkeypatch,
    )
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "error: --no-pretrained and --vgginits pretrained contradict each other."
    )


@pytest.mark.parametrize("flags", [["--resume", "results/x"], ["--seeds", "0", "1"]])
def test_demo4_refuses_flags_that_do_not_apply_to_a_grid(
    mlflow_uri, tmp_path, flags, capsys, monkeypatch
):
    out = demo_here("Demo-4-VGG16Customizable-PASCAL.py", flags, tmp_path, capsys, monkeypatch)
    assert out.returncode == 2
    assert out.stderr.startswith(f"error: {flags[0]} does not apply to the Demo-4 grid")


def test_demo3_without_imagenet_weights_offline_says_where_to_put_them(
    mlflow_uri, tree, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no weights file there
    # and no way to download it: refused at once
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    out = demo_here(
        "Demo-3-VGG16-PASCAL.py",
        ["--voc-dir", str(tree.voc_dir), "--sbd-dir", str(tree.sbd_dir)]
        + ["--epochs", "1", "--max-batches", "1", "--image-size", "96"],
        tmp_path,
        capsys,
        monkeypatch,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("error: The VGG-16 ImageNet weights vgg16-397923af.pth are not in")
    assert str(tmp_path / "torch-home" / "hub" / "checkpoints") in lines[0]
    assert "--no-pretrained" in lines[0]
    assert MlflowClient(mlflow_uri).get_experiment_by_name("Demo-3-VGG16-PASCAL") is None


@pytest.mark.parametrize("damage", ["truncated jpeg", "mask value 21"])
def test_demo3_on_damaged_data_fails_in_one_line_naming_the_file(
    mlflow_uri, tree, tmp_path, damage, capsys, monkeypatch
):
    from load_dataset.generators.pascal_tree import write_voc_mask

    if damage == "truncated jpeg":
        # The second val image: every epoch reads all of val (a training image may be the one
        # the shuffle leaves out of the last, partial batch), and the contract check before
        # the run reads only the first sample of each split: found mid-epoch.
        path = tree.voc_image("2008_000011")
        path.write_bytes(path.read_bytes()[:200])
    else:
        path = tree.voc_mask("2008_000005")
        mask = tree.voc_masks["2008_000005"].copy()
        mask[0, 0] = 21  # found when the labels are computed, before the run starts
        write_voc_mask(path, mask)
    results = tmp_path / "r"
    args = ["--voc-dir", str(tree.voc_dir), "--sbd-dir", str(tree.sbd_dir), *SMOKE]
    args += ["--max-batches", "10", "--results-dir", str(results)]
    # The same kind of error from a process of its own: test_resilience's corrupt png.
    out = demo_here("Demo-3-VGG16-PASCAL.py", args, tmp_path, capsys, monkeypatch)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and path.name in lines[0], out.stderr
    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("Demo-3-VGG16-PASCAL")
    runs = [] if experiment is None else client.search_runs([experiment.experiment_id])
    assert [r.info.status for r in runs] == (["FAILED"] if damage == "truncated jpeg" else [])
    assert not list(results.glob("**/*.pt"))  # nothing was checkpointed, nothing half-written


@pytest.mark.slow
def test_demo0_draws_what_a_trained_tinydata_model_looks_at(
    _store_template, tmp_path, capfd, monkeypatch
):
    """With a finished Demo-2 run in the store (named by --explain-model, or the newest one),
    Demo-0 loads its MLflow model from that store and logs plots of its heatmaps."""
    from tests.trained_runs import train_tiny

    trained = train_tiny(tmp_path, _store_template, **{"explain.gallery": False})
    for source in ([trained.run_id], []):
        more = ["--explain-model", *source] if source else []
        out = demo_here(
            "Demo-0-Unit-Tests-and-Visualization.py",
            ["--skip-tests", "--voc-dir", str(tmp_path / "no_voc"), "--n-images", "2"]
            + ["--tracking-uri", trained.uri, "--results-dir", str(tmp_path / "r"), *more],
            tmp_path,
            capfd,
            monkeypatch,
        )
        assert out.returncode == 0, out.stderr
        assert f"== what the TinyData model {trained.run_id} looks at" in out.stdout
    runs = runs_of(trained.uri, "Demo-0-Unit-Tests-and-Visualization")
    assert len(runs) == 2
    for run in runs:
        assert "explanations.png" in artifact_paths(trained.uri, run.info.run_id)
