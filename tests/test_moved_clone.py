"""A clone moved or copied elsewhere: its runs resume there and a sweep's best config runs there.

The code finds the repository by where it lies, so only a process started in a copy sees the
copy: the tests copy the repository's working tree (the code under test) into folders of their
own and run the commands there as real processes, as the user of a moved clone would. A run or
sweep of this checkout itself runs in the tests' process.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

import src.cli as cli
from src.run_experiment import run
from src.sweep.command import main as sweep
from tests.test_resilience import wait_for_epoch
from tests.test_run_experiment import QUICK_END

REPO = Path(__file__).resolve().parent.parent
DEMO = "Demo-2-TinyConv-TinyData.py"
DEMO2 = "experiments/demo2_tinyconv_tinydata.toml"
TINY = "load_dataset/tiny_data"
# The data's folders given as flags, relative to the clone the command runs in.
DATA = ["--data-dir", TINY, "--labels-csv", f"{TINY}/tiny_labels.csv"]
STORED_DATA = {
    "data.args.data_dir": TINY,
    "data.args.labels_csv": f"{{repo}}/{TINY}/tiny_labels.csv",
}
TWO_EPOCHS = [
    *QUICK_END,
    *DATA,
    "--epochs",
    "2",
    "--max-batches",
    "3",
    "--experiment-name",
    "moved",
]
# 0.02 s a sample: epochs of about 2 s (3 batches of 16 to train on, 3 to validate), time to
# SIGKILL a run in its second; the resume pays them again (the same config), and its closing
# evaluation of best.pt a third time (0.05 s made the test 28 s, 0.02 s about 22 s).
SLOW = ["--set", 'data.dataset="tests.faulty_data:SlowTinyData"', "--set", "data.args.delay_s=0.02"]


def copy_of_repository(to: Path) -> Path:
    """The working tree's files (those git tracks or would track, edits included; no runs, data
    or caches) copied to `to`: a clone of the code under test."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout  # fmt: skip
    for name in filter(None, listed.decode().split("\0")):
        if (REPO / name).is_file():
            (to / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, to / name)
    return to


def in_clone(clone: Path, args: list[str]) -> subprocess.CompletedProcess:
    """`python ARGS` run in the folder `clone`, with its code."""
    return subprocess.run(
        [sys.executable, *args], cwd=clone, capture_output=True, text=True, timeout=600
    )


def killed_in_a_clone_then_moved(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """A run SIGKILLed in its second epoch in one clone, then the clone moved (`mv`)."""
    first = copy_of_repository(tmp_path / "first")
    proc = subprocess.Popen(
        [sys.executable, DEMO, *TWO_EPOCHS, *SLOW], cwd=first, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    was = wait_for_epoch(first / "results", 1, proc)  # <results>/<experiment>/<run id>
    proc.kill()
    proc.communicate()
    clone = first.rename(tmp_path / "moved")
    return clone, clone / was.relative_to(first), SLOW


def stopped_here_then_copied(tmp_path: Path, uri: str, monkeypatch) -> tuple[Path, Path, list]:
    """A run of this checkout stopped after epoch 1 (as by Ctrl-C), its results folder outside
    the repository; the run's folder copied into another clone's results folder."""
    monkeypatch.chdir(REPO)  # the flags' relative folders: this checkout's
    argv = [*TWO_EPOCHS, "--results-dir", str(tmp_path / "results")]
    args = cli.make_parser(DEMO2, "").parse_args(argv)

    def ctrl_c(epoch: int, metrics: dict) -> bool:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(cli.load_from_args(DEMO2, args), on_epoch=ctrl_c)
    (was,) = (tmp_path / "results" / "moved").iterdir()
    clone = copy_of_repository(tmp_path / "second")
    folder = shutil.copytree(was, clone / "results" / "moved" / was.name)
    # The store named by a flag this time (the first run found it in the environment).
    return clone, folder, ["--tracking-uri", uri]


def stored_config_text(uri: str, run_id: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        return Path(
            MlflowClient(uri).download_artifacts(run_id, "config/config.toml", tmp)
        ).read_text()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["clone moved", "run folder copied into another clone"])
def test_a_stopped_run_resumes_where_it_now_is(mlflow_uri, tmp_path, case, monkeypatch):
    if case == "clone moved":
        clone, folder, flags = killed_in_a_clone_then_moved(tmp_path)
    else:
        clone, folder, flags = stopped_here_then_copied(tmp_path, mlflow_uri, monkeypatch)
    resume = ["--resume", str(folder.relative_to(clone))]
    resumed = in_clone(clone, [DEMO, *TWO_EPOCHS, *flags, *resume])
    assert resumed.returncode == 0, resumed.stderr

    client = MlflowClient(mlflow_uri)
    run_id = folder.name
    got = client.get_run(run_id)  # the same MLflow run, finished
    assert got.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [1, 2]
    last = torch.load(folder / "last.pt", weights_only=True)
    assert last["epoch"] == 2
    # What the run stores names the folders of a clone relative to it.
    params, tags = got.data.params, got.data.tags
    assert {k: params[k] for k in STORED_DATA} == STORED_DATA
    assert last["config"]["run"]["results_dir"] == "results"
    if case == "clone moved":
        assert params["run.results_dir"] == "results"
    else:  # the first run's results folder, outside the repository, is a path as it was
        assert params["run.results_dir"] == str(tmp_path / "results")
        assert tags["resumed.run.results_dir"] == "results"
        assert tags["resumed.run.tracking_uri"] == mlflow_uri
    stored = repr([params, last["config"], stored_config_text(mlflow_uri, run_id)])
    for place in (REPO, tmp_path / "first", clone):
        assert str(place) not in stored


@pytest.mark.slow
def test_a_sweeps_best_config_runs_in_another_clone(mlflow_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the flags' relative folders: this checkout's
    space = tmp_path / "lr.sweep.toml"
    space.write_text(
        'metric = "val_auroc_mean"\nsampler = { name = "random" }\npruner = "none"\n[space]\n'
        '"optimizer.lr" = { type = "float", low = 1e-4, high = 1e-1, log = true }\n'
    )
    out = tmp_path / "results"
    fast = [*QUICK_END, *DATA, "--epochs", "1", "--max-batches", "2", "--device", "cpu"]
    assert (
        sweep([DEMO2, "--space", str(space), "--trials", "1", "--results-dir", str(out), *fast])
        == 0
    )
    (best,) = out.glob("*/sweeps/*/best_config.toml")
    text = best.read_text()
    assert str(REPO) not in text
    assert f'data_dir = "{TINY}"' in text.splitlines()
    assert f'labels_csv = "{{repo}}/{TINY}/tiny_labels.csv"' in text.splitlines()

    clone = copy_of_repository(tmp_path / "second")
    shutil.copy(best, clone / "best.toml")
    trial = set(out.glob("*/*/best.pt"))
    trained = in_clone(clone, ["-m", "src.run_experiment", "best.toml"])
    assert trained.returncode == 0, trained.stderr
    (new,) = set(out.glob("*/*/best.pt")) - trial
    got = MlflowClient(mlflow_uri).get_run(new.parent.name)
    assert got.info.status == "FINISHED"
    assert {k: got.data.params[k] for k in STORED_DATA} == STORED_DATA
