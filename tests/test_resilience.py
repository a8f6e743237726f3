"""Runs that survive: resume, SIGKILL, Ctrl-C, and bad input that fails in one clear line."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from load_dataset.custom_tiny import TinyData
from models.custom_models_base import TinyConv
from src.errors import UserError
from src.run_experiment import run
from src.train.checkpoint import CheckpointError
from tests.command_line import run_here
from tests.faulty_data import CTRL_C_IN_FINALIZER_AT
from tests.pausing import PAUSE_AT, wait_until_paused
from tests.test_run_experiment import DEMO2, QUICK_END, REPO, all_series, tiny_config
from tests.test_tracking_in_process import STORE_FAULTS, _as_a_user, _demo2

DEMO = str(REPO / "Demo-2-TinyConv-TinyData.py")
TINY = REPO / "load_dataset" / "tiny_data"
# TinyConv that holds still at the training step PAUSE_AT names (tests/pausing.py): a signal
# lands where the test means it to, however busy the machine.
PAUSING = ["--set", 'model.model="tests.pausing:PausingTinyConv"']


def demo(args: list[str], tmp_path: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, DEMO, *QUICK_END, "--results-dir", str(tmp_path / "results"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        **kw,
    )


def start_demo(args: list[str], tmp_path: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, DEMO, *QUICK_END, "--results-dir", str(tmp_path / "results"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        **kw,
    )


def runs_of(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def wait_for_epoch(results: Path, epoch: int, proc: subprocess.Popen, limit_s: float = 300):
    """Wait until some run's last.pt has reached `epoch`; return that run's folder."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        for last in results.glob("*/*/last.pt"):
            try:
                if torch.load(last, weights_only=True)["epoch"] >= epoch:
                    return last.parent
            except Exception:  # being replaced right now
                pass
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint of epoch {epoch} within {limit_s} s")


def test_resumed_run_equals_uninterrupted_run(mlflow_uri, tmp_path):
    """Stopped after epoch 1 and trained longer, a run logs, bit for bit, what the
    uninterrupted run logged: the learning-rate schedule (halved after every epoch) goes on
    where it stopped, and so does torch's global random state, from which the data draws noise
    per training sample (the samples, and so every metric, equal the uninterrupted run's only
    if that state is the one the interrupted process had after its last complete epoch)."""
    client = MlflowClient(mlflow_uri)
    step = {"optimizer.scheduler": "step", "optimizer.step_size": 1, "optimizer.gamma": 0.5}
    noisy = {"data.dataset": "tests.random_data:NoisyTinyData", "data.num_workers": 0}
    full = run(
        tiny_config(tmp_path, **{**step, **noisy, "train.epochs": 3, "run.run_name": "full"})
    )
    # One epoch, then "train longer": resume the same run up to epoch 3.
    part = run(
        tiny_config(tmp_path, **{**step, **noisy, "train.epochs": 1, "run.run_name": "part"})
    )
    assert torch.load(part.results_dir / "last.pt", weights_only=True)["epoch"] == 1
    torch.manual_seed(12345)  # whatever this process did since must not matter
    resumed = run(
        tiny_config(tmp_path, **{**step, **noisy, "train.epochs": 3, "run.run_name": "part"}),
        resume=part.results_dir,
    )
    assert resumed.run_id == part.run_id
    full_series, resumed_series = (
        all_series(client, full.run_id),
        all_series(client, resumed.run_id),
    )
    assert full_series.keys() == resumed_series.keys()
    assert {"train_loss", "val_loss", "val_auroc_mean", "lr"} <= full_series.keys()
    for key, series in full_series.items():
        if key.startswith("best_"):
            # The best-epoch summary is logged each time the run finishes: the part run
            # logged one at its end (step 1), the resumed run the final one (step 3).
            assert resumed_series[key][-1] == series[-1], key
        else:
            assert resumed_series[key] == series, key  # bit for bit
    assert [s for s, _ in resumed_series["val_loss"]] == [1, 2, 3]
    assert client.get_run(part.run_id).data.tags["resumed.train.epochs"] == "3"
    lr = [(m.step, m.value) for m in client.get_metric_history(part.run_id, "lr")]
    assert lr == [(1, 1e-3), (2, 5e-4), (3, 2.5e-4)]
    # The noise is there: without it the same seed trains to other figures (epoch 1 tells).
    plain = run(tiny_config(tmp_path, **{**step, "train.epochs": 1, "run.run_name": "plain"}))
    assert all_series(client, plain.run_id)["train_loss"] != full_series["train_loss"][:1]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume(mlflow_uri, tmp_path, capsys):
    args = ["--epochs", "2", "--experiment-name", "kill", *PAUSING]
    # Killed at step 4 of epoch 2 (9 steps an epoch), once epoch 1's last.pt is written.
    proc = start_demo(args, tmp_path, env={**os.environ, PAUSE_AT: "13"})
    wait_until_paused(proc)
    folder = wait_for_epoch(tmp_path / "results", 1, proc)
    proc.kill()
    proc.wait()
    (run_before,) = runs_of(mlflow_uri, "kill")
    assert run_before.info.status == "RUNNING"  # what SIGKILL leaves; resume takes it over
    code, out, err = demo_in_process([*args, "--resume", str(folder)], tmp_path, capsys)
    assert code == 0, err
    (run_after,) = runs_of(mlflow_uri, "kill")
    assert run_after.info.status == "FINISHED"
    steps = [
        m.step
        for m in MlflowClient(mlflow_uri).get_metric_history(run_after.info.run_id, "val_loss")
    ]
    assert steps == [1, 2]


def _first_checkpoint(results: Path, proc: subprocess.Popen, limit_s: float = 300) -> None:
    """Wait until the run has written its first last.pt, whatever its epoch number."""
    deadline = time.monotonic() + limit_s
    while not any(results.glob("*/*/last.pt")):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(
                f"no last.pt within {limit_s} s; exit code {proc.returncode}\n"
                f"--- stdout\n{out}\n--- stderr\n{err}"
            )
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["from outside", "inside a finalizer", "SIGTERM"])
def test_ctrl_c_marks_killed_and_says_how_to_resume(mlflow_uri, tmp_path, where, capsys):
    """Ctrl-C ends the run KILLED with exit code 130 and the command that resumes it, also
    when Python raises the KeyboardInterrupt inside a finalizer (a `__del__`), where CPython
    drops it: SIGINT can arrive while one runs (SQLAlchemy's, for one), and the run then went
    on and ended FINISHED with exit code 0. SIGTERM (what SLURM, Kubernetes and spot
    instances send) does the same with exit code 143, and the DataLoader's worker processes
    end with the run (they outlived it by 5-13 s when SIGTERM killed it outright)."""
    # SlowTinyData for its Ctrl-C inside a finalizer, without a delay: the pause at a training
    # step, or that Ctrl-C at a training read, puts the signal in epoch 2.
    args = [
        "--epochs",
        "2",
        "--experiment-name",
        "intr",
        "--set",
        'data.dataset="tests.faulty_data:SlowTinyData"',
        "--set",
        "data.args.delay_s=0",
        *PAUSING,
    ]
    if where == "SIGTERM":
        args += ["--num-workers", "2"]
    env = dict(os.environ)
    if where == "inside a finalizer":
        env[CTRL_C_IN_FINALIZER_AT] = "160"  # a read of the second epoch (150 images)
    else:  # the signal comes at step 4 of epoch 2 (9 steps an epoch)
        env[PAUSE_AT] = "13"
    proc = subprocess.Popen(
        [sys.executable, DEMO, *QUICK_END, "--results-dir", str(tmp_path / "results"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=env,
        # Ctrl-C as in a terminal. Started in the background by a non-interactive shell
        # (`make test &`, nohup), pytest inherits SIGINT ignored and so does this child:
        # Python then has no KeyboardInterrupt to raise and the run ends FINISHED, exit code 0.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    workers, before = [], ""
    if where == "from outside":
        before = wait_until_paused(proc)
        proc.send_signal(signal.SIGINT)  # to the run's process only, as the tests can
    elif where == "SIGTERM":
        before = wait_until_paused(proc)
        workers = _loader_workers(proc)
        proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    out = before + out
    shown = f"exit code {proc.returncode}\n--- stdout\n{out}\n--- stderr\n{err}"
    assert proc.returncode == (143 if where == "SIGTERM" else 130), shown
    (last,) = (tmp_path / "results").glob("*/*/last.pt")
    assert f"--resume {last.parent}" in err, shown
    (r,) = runs_of(mlflow_uri, "intr")
    assert r.info.status == "KILLED", shown
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
    if where != "SIGTERM":
        return  # resuming after Ctrl-C is the same as after SIGTERM
    assert "Stopped by SIGTERM; last.pt holds the last complete epoch." in err, shown
    code, out, err = demo_in_process([*args, "--resume", str(last.parent)], tmp_path, capsys)
    assert code == 0, out + err
    (r,) = runs_of(mlflow_uri, "intr")
    assert r.info.status == "FINISHED", out + err
    steps = [m.step for m in MlflowClient(mlflow_uri).get_metric_history(r.info.run_id, "val_loss")]
    assert steps == [1, 2]


def _loader_workers(proc: subprocess.Popen, limit_s: float = 300) -> list:
    """The run's DataLoader worker processes, once an epoch has started them."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        children = psutil.Process(proc.pid).children()
        if len(children) >= 2:
            return children
        time.sleep(0.01)
    raise AssertionError(f"no DataLoader workers within {limit_s} s")


def _tiny_copy(tmp_path: Path) -> Path:
    data = tmp_path / "tiny"
    shutil.copytree(TINY, data)
    return data


def _bad_csv_row(tmp_path: Path) -> list[str]:
    data = _tiny_copy(tmp_path)
    csv = data / "tiny_labels.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(lines[:1] + lines[2:]) + "\n")  # drop the first image's row
    return ["--data-dir", str(data)]


def _bad_label(tmp_path: Path) -> list[str]:
    data = _tiny_copy(tmp_path)
    csv = data / "tiny_labels.csv"
    lines = csv.read_text().splitlines()
    name = lines[1].split(",")[0]
    lines[1] = f"{name},2,0,1"
    csv.write_text("\n".join(lines) + "\n")
    return ["--data-dir", str(data)]


def _corrupt_png(tmp_path: Path) -> list[str]:
    data = _tiny_copy(tmp_path)
    png = sorted((data / "train").glob("*.png"))[3]
    png.write_bytes(png.read_bytes()[:40])
    return ["--data-dir", str(data)]


def _write_toml(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "bad.toml"
    path.write_text(DEMO2.read_text() + text)
    return ["--config", str(path)]


BAD_INPUT = {
    "missing data folder": (lambda p: ["--data-dir", str(p / "no-such-folder")], "no-such-folder"),
    "csv without a row": (_bad_csv_row, "tiny_labels.csv"),
    "non 0/1 label": (_bad_label, "tiny_labels.csv"),
    "corrupt png": (_corrupt_png, ".png"),
    "unknown key": (lambda p: ["--set", "train.epochz=3"], "epochz"),
    "unknown dataset": (
        lambda p: ["--set", 'data.dataset="load_dataset.nope:X"'],
        "load_dataset.nope",
    ),
    "unknown model": (lambda p: ["--set", 'model.model="models.custom_models_base:Nope"'], "Nope"),
    "wrong type": (lambda p: ["--set", 'data.batch_size="big"'], "batch_size"),
    "predict_on_test without use_test_set": (
        lambda p: ["--task", "predict_on_test"],
        "use_test_set",
    ),
    "n_outputs that does not fit the labels": (
        lambda p: ["--set", "model.args.n_outputs=4"],
        "n_outputs = 3",
    ),
    "device gpu": (lambda p: ["--device", "gpu"], "device = 'gpu' is not one of auto, cpu"),
    "dataset without label_meanings": (
        lambda p: ["--set", 'data.dataset="tests.contract_data:NoMeaningsTinyData"'],
        "NoMeaningsTinyData ('train' split) has no label_meanings",
    ),
    "uint8 images without mean_std": (
        lambda p: ["--set", 'data.dataset="tests.contract_data:Uint8TinyData"'],
        "returns uint8 images but has no mean_std",
    ),
    "integer class in a multilabel task": (
        lambda p: ["--set", 'data.dataset="tests.contract_data:IntClassTinyData"'],
        'set [data] problem = "multiclass"',
    ),
    "a function named as the dataset": (
        lambda p: ["--set", 'data.dataset="os:system"'],
        "is not a torch.utils.data.Dataset class",
    ),
    "a function named as the model": (
        lambda p: ["--set", 'model.model="os:system"'],
        "is not an nn.Module class",
    ),
    "model argument the model refuses": (
        lambda p: [
            "--set",
            'model.model="models.custom_models_base:VGG16Customizable"',
            "--set",
            'model.args.conv_type="bad"',
        ],
        "conv_type='bad' is not known",
    ),
    "resume path that is no checkpoint": (
        lambda p: ["--resume", str(Path(p / "x.pt").write_text("x") and p / "x.pt")],
        "x.pt",
    ),
}


def demo_in_process(args: list[str], tmp_path: Path, capsys) -> tuple[int, str, str]:
    """Demo-2's command line (`src.cli.main` with its config) in this process: exit code,
    stdout, stderr. The same code as `python Demo-2-TinyConv-TinyData.py ARGS` without paying
    for a new interpreter; `test_bad_input_in_a_real_process` runs two cases in a process."""
    from src.cli import main

    capsys.readouterr()
    try:
        code = main(["--results-dir", str(tmp_path / "results"), *args], default_config=str(DEMO2))
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_fails_in_one_clear_line(mlflow_uri, tmp_path, case, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_args, needle = BAD_INPUT[case]
    code, out, err = demo_in_process(
        ["--epochs", "2", "--experiment-name", "bad", *make_args(tmp_path)], tmp_path, capsys
    )
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0]
    # A corrupt image is found while training, after the run started; the rest before.
    runs = runs_of(mlflow_uri, "bad")
    assert len(runs) == (1 if case in RUN_STARTS_BEFORE_THE_ERROR else 0)
    assert all(r.info.status == "FAILED" for r in runs)


RUN_STARTS_BEFORE_THE_ERROR = {"corrupt png"}


# Command lines run one after another in one interpreter (`run_in_sequence`), each as
# `__main__` with its own argv, environment and working folder, its stdout and stderr (file
# descriptors 1 and 2: what a logger or a C library writes goes there too) in files of its
# own and its exit code from SystemExit, as the interpreter would give it. The last one ends
# the process: its exit code and output are a real process's, interpreter shutdown included.
IN_SEQUENCE = r"""
import json, os, runpy, sys, traceback, warnings

commands, folder = json.loads(sys.argv[1]), sys.argv[2]
sys.path.insert(0, os.getcwd())  # the repository, as `python -m` has it


def run(argv):
    module = argv[1] if argv[0] == "-m" else None
    sys.argv = [module or argv[0], *(argv[2:] if module else argv[1:])]
    with warnings.catch_warnings():  # "... found in sys.modules": run by an earlier command
        warnings.simplefilter("ignore", RuntimeWarning)
        if module:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(argv[0], run_name="__main__")


for i, (argv, env, cwd) in enumerate(commands):
    os.environ.update(env)
    os.chdir(cwd)
    if i == len(commands) - 1:
        run(argv)
        sys.exit(0)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(f"{folder}/{i}.out", "w") as out, open(f"{folder}/{i}.err", "w") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            run(argv)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
    with open(f"{folder}/{i}.code", "w") as f:
        f.write(str(code))
"""


def run_in_sequence(
    commands: list[tuple[list[str], dict[str, str], Path]], folder: Path, **popen
) -> list[subprocess.CompletedProcess]:
    """`python ARGV` (or `python -m MODULE ARGS`) for each (argv, environment added, working
    folder) of `commands`, one after another in one new interpreter, which pays the imports
    (about 7 s of CPU) once: the exit code, stdout and stderr of each. The last command's
    are those of the process itself (it exits with it); `popen` goes to its Popen."""
    folder.mkdir(parents=True, exist_ok=True)
    plan = [[list(argv), env, str(cwd)] for argv, env, cwd in commands]
    proc = subprocess.run(
        [sys.executable, "-c", IN_SEQUENCE, json.dumps(plan), str(folder)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        **popen,
    )
    done = [
        subprocess.CompletedProcess(
            argv,
            int((folder / f"{i}.code").read_text()),
            (folder / f"{i}.out").read_text(),
            (folder / f"{i}.err").read_text(),
        )
        if (folder / f"{i}.code").exists()
        else subprocess.CompletedProcess(argv, None, "", f"never ran:\n{proc.stderr}")
        for i, (argv, _, _) in enumerate(commands[:-1])
    ]
    return [
        *done,
        subprocess.CompletedProcess(commands[-1][0], proc.returncode, proc.stdout, proc.stderr),
    ]


@pytest.mark.slow
def test_bad_input_in_a_real_process(mlflow_uri, tmp_path, _store_template):
    """Bad input from the command line of a process of its own, as a user (not root): stores
    that cannot be used (not a database, in a read-only folder, a read-only file, a folder
    named mlflow.db, a path under a file), an error found before the run starts (device gpu)
    and one found while it trains (a corrupt png). Each: one `error:` line (naming the store,
    for a store) and exit code 2, no traceback; what is at a store's path is left as it was
    (a file that is not a database keeps its text; no database is made in a read-only folder).
    The command lines run one after another in one interpreter (`run_in_sequence`: one start,
    about 7 s of imports, for all); the last, the corrupt png, is the process's real exit,
    interpreter shutdown included."""

    def what_is_there(db: Path) -> object:
        if db.is_dir():
            return sorted(os.listdir(db))
        return db.is_file() and db.read_bytes()

    checks, commands = [], []
    for fault, make in STORE_FAULTS.items():
        folder = tmp_path / fault.replace(" ", "-")
        (folder / "store").mkdir(parents=True)
        db = make(folder / "store", _store_template)
        checks.append((fault, f"sqlite:///{db}", db, what_is_there(db)))
        commands.append(_demo2(f"sqlite:///{db}", folder))
    for case in ["device gpu", "corrupt png"]:
        folder = tmp_path / case.replace(" ", "-")
        folder.mkdir()
        make_args, needle = BAD_INPUT[case]
        args = ["--epochs", "2", "--experiment-name", "bad", *make_args(folder)]
        argv = [DEMO, *QUICK_END, "--results-dir", str(folder / "results"), *args]
        checks.append((case, needle, None, None))
        commands.append((argv, {"MLFLOW_TRACKING_URI": mlflow_uri, "HOME": str(folder)}, folder))
    done = run_in_sequence(commands, tmp_path / "sequence", preexec_fn=_as_a_user)
    for (case, needle, db, before), out in zip(checks, done, strict=True):
        shown = f"{case}: exit code {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
        assert out.returncode == 2, shown
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), shown
        assert needle in lines[0] and "Traceback" not in out.stderr, shown
        if db is not None:
            assert what_is_there(db) == before, shown
    (_, _, db, _) = checks[list(STORE_FAULTS).index("not a database")]
    assert db.read_text().startswith("these are my notes")
    (_, _, db, _) = checks[list(STORE_FAULTS).index("in a read-only folder")]
    assert not db.exists()


@pytest.mark.slow
def test_a_resume_that_does_not_fit_is_refused_and_keeps_the_checkpoint(
    mlflow_uri, tmp_path, capsys, monkeypatch
):
    """The checkpoint of one run: resumed with other model args, the resume is refused with the
    key and both values; resumed by another experiment's Demo (Demo-1's model), it is exit
    code 2 and one message naming model.model. Either way last.pt stays as it was and the
    run FINISHED."""
    first = run(tiny_config(tmp_path, **{"train.epochs": 1}))
    before = (first.results_dir / "last.pt").read_bytes()
    with pytest.raises(CheckpointError, match=r"model\.args\.n_outputs = 3, the config says 4"):
        run(
            tiny_config(tmp_path, **{"train.epochs": 2, "model.args.n_outputs": 4}),
            resume=first.results_dir,
        )
    assert (first.results_dir / "last.pt").read_bytes() == before
    demo1 = str(REPO / "Demo-1-TinyConvWithoutSequential-TinyData.py")
    args = ["--resume", str(first.results_dir), "--experiment-name", "tiny-test"]
    out = run_here([demo1, *args], tmp_path, capsys, monkeypatch)
    assert out.returncode == 2
    assert "does not fit this experiment" in out.stderr and "model.model" in out.stderr
    assert (first.results_dir / "last.pt").read_bytes() == before
    assert MlflowClient(mlflow_uri).get_run(first.run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(mlflow_uri, tmp_path, capsys, monkeypatch):
    args = [
        "--epochs",
        "4",
        "--experiment-name",
        "nan",
        "--set",
        'data.dataset="tests.faulty_data:NaNAfterTinyData"',
        "--results-dir",
        str(tmp_path / "results"),
    ]
    out = run_here([DEMO, *args], tmp_path, capsys, monkeypatch)
    assert out.returncode == 2
    assert "loss became nan" in out.stderr.lower() and "last.pt" in out.stderr
    (r,) = runs_of(mlflow_uri, "nan")
    assert r.info.status == "FAILED"
    (last,) = (tmp_path / "results").glob("*/*/last.pt")
    assert torch.load(last, weights_only=True)["epoch"] == 1
    assert os.path.exists(last.parent / "best.pt")


def _read_only(tmp_path: Path) -> tuple[Path, str]:
    if os.geteuid() == 0:  # root writes to any folder of mode 555: /proc takes no file of anyone
        return Path("/proc/self/results").resolve(), "No such file or directory"
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder, "Permission denied"


def _a_file(tmp_path: Path) -> tuple[Path, str]:
    (tmp_path / "notes").write_text("my notes")
    return tmp_path / "notes", f"{tmp_path / 'notes'} is a file, not a folder"


def _under_a_file(tmp_path: Path) -> tuple[Path, str]:
    (tmp_path / "notes").write_text("my notes")
    return tmp_path / "notes" / "results", f"{tmp_path / 'notes'} is a file, not a folder"


# A results folder that cannot be written -> (the folder, why).
RESULTS_FOLDER_FAULTS = {"read-only": _read_only, "a file": _a_file, "under a file": _under_a_file}


@pytest.mark.parametrize("fault", sorted(RESULTS_FOLDER_FAULTS))
def test_a_results_folder_that_cannot_be_written_is_one_line_before_the_run(
    mlflow_uri, tmp_path, fault, capsys
):
    folder, why = RESULTS_FOLDER_FAULTS[fault](tmp_path)
    args = ["--epochs", "1", "--experiment-name", "bad", "--results-dir", str(folder)]
    code, out, err = demo_in_process(args, tmp_path, capsys)
    assert code == 2, out + err
    assert err == (
        f"error: The results folder {folder} cannot be written ({why}); pass another "
        "--results-dir, or make that one a folder you can write to.\n"
    )
    assert runs_of(mlflow_uri, "bad") == []  # said before an MLflow run started


class HeavyTinyConv(TinyConv):
    """TinyConv with 4 MB more weights: its checkpoints outgrow the MLflow store's 1 MB file."""

    def __init__(self, n_outputs: int = 3) -> None:
        super().__init__(n_outputs)
        self.register_buffer("ballast", torch.zeros(1_000_000))


class GatedTinyData(TinyData):
    """TinyData whose training reads after the first `after` wait until the file `gate`
    exists: the run holds still in epoch 2 until the test opens the gate, however fast or slow
    the machine. (The dataset check reads one sample before training, each epoch reads 144: 9
    batches of 16; the 150th read is the 5th of epoch 2.) A run resumed once the gate is open
    does not wait."""

    def __init__(self, setname: str, gate: str = "", after: int = 149, **kwargs) -> None:
        super().__init__(setname, **kwargs)
        self.gate = Path(gate) if gate and setname == "train" else None
        self.after = after
        self.reads = 0

    def __getitem__(self, i: int) -> dict:
        self.reads += 1
        if self.gate is not None and self.reads > self.after:
            deadline = time.monotonic() + 300
            while not self.gate.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            self.gate = None
        return super().__getitem__(i)


# Once epoch 1 is saved, no write past this many bytes of any file of the run's process
# (RLIMIT_FSIZE: EFBIG, what ENOSPC is on a full disk) -> the flags of the run: its 4 MB
# checkpoints fail while the store takes its writes, or the reverse with 33 kB checkpoints.
DISK_FULL = {
    "checkpoint": (2_000_000, ["--set", 'model.model="tests.test_resilience:HeavyTinyConv"']),
    "store": (64_000, []),
}


@pytest.mark.slow
@pytest.mark.parametrize("full", sorted(DISK_FULL))
def test_a_disk_that_fills_up_mid_run_is_one_line_and_the_run_resumes(
    mlflow_uri, tmp_path, full, capsys
):
    """One line naming the checkpoint or the store, with the command that resumes; last.pt
    stays the last complete epoch. A store that cannot take the status leaves the run RUNNING
    until the next run started on it marks it FAILED; the run then resumes to its end."""
    limit, model = DISK_FULL[full]
    gate = tmp_path / "disk-is-full"
    gated = [
        "--set",
        'data.dataset="tests.test_resilience:GatedTinyData"',
        "--set",
        f'data.args.gate="{gate}"',
    ]
    args = ["--epochs", "2", "--experiment-name", "full", *model, *gated]
    proc = start_demo(args, tmp_path)
    # Epoch 1 saved, epoch 2 waiting at the gate: the disk fills up, then epoch 2 goes on.
    folder = wait_for_epoch(tmp_path / "results", 1, proc)
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
    gate.touch()
    out, err = proc.communicate(timeout=300)
    (r,) = runs_of(mlflow_uri, "full")
    what = {
        "checkpoint": f"The checkpoint {folder}/",
        "store": f"The MLflow store {mlflow_uri} cannot be used: ",
    }[full]
    why = {
        "checkpoint": " could not be written (File too large); its folder needs room on its disk "
        "and must be writable.",
        "store": f"; run {r.info.run_id} stopped (the store needs room on its disk and write "
        "access).",
    }[full]
    resume = (
        f"{why} Once that is fixed, resume from the last complete epoch with the same command "
        f"and flags plus: --resume {folder}"
    )
    assert proc.returncode == 2 and len(err.splitlines()) == 1, out + err
    assert err.startswith(f"error: {what}") and err.endswith(f"{resume}\n"), err
    assert torch.load(folder / "last.pt", weights_only=True)["epoch"] >= 1
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    if full == "store":
        assert r.info.status == "RUNNING"  # the store took no status
        quick = ["--epochs", "1", "--max-batches", "1", "--experiment-name", "next", *QUICK_END]
        code, out, err = demo_in_process(quick, tmp_path, capsys)
        assert code == 0, err
        assert err.splitlines() == [
            f"warning: run {r.info.run_id} ('tinyconv') was RUNNING but its process {proc.pid} on "
            f"{socket.gethostname()} ended without ending it; marked FAILED."
        ]
    (r,) = runs_of(mlflow_uri, "full")
    assert r.info.status == "FAILED"
    code, out, err = demo_in_process([*QUICK_END, *args, "--resume", str(folder)], tmp_path, capsys)
    assert code == 0, out + err
    (r,) = runs_of(mlflow_uri, "full")
    assert r.info.status == "FINISHED" and "status.reason" not in r.data.tags
    steps = [m.step for m in MlflowClient(mlflow_uri).get_metric_history(r.info.run_id, "val_loss")]
    assert steps == [1, 2]


def test_a_file_in_the_way_of_the_outputs_is_one_line_and_the_run_resumes(mlflow_uri, tmp_path):
    """A write into the run's folder that fails at its end (here a file where the plots go; a
    full disk alike) is one line naming the path and the command that resumes the run."""

    def block_the_plots(epoch: int, metrics: dict) -> bool:
        (folder,) = (tmp_path / "results").glob("*/*/")
        (folder / "plots").write_text("not a folder")
        return False

    config = tiny_config(tmp_path, **{"train.epochs": 1})
    with pytest.raises(UserError) as e:
        run(config, on_epoch=block_the_plots)
    (folder,) = (tmp_path / "results").glob("*/*/")
    assert str(e.value).startswith(f"Not a directory: {folder / 'plots'}")
    assert str(e.value).endswith(
        ". Once that is fixed, resume from the last complete epoch with the same command and "
        f"flags plus: --resume {folder}"
    )
    assert MlflowClient(mlflow_uri).get_run(folder.name).info.status == "FAILED"
    (folder / "plots").unlink()
    result = run(config, resume=folder)
    assert MlflowClient(mlflow_uri).get_run(result.run_id).info.status == "FINISHED"
    assert (folder / "plots").is_dir()
