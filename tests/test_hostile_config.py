"""Hostile and broken input: a config or a stored run's config that names a function, numbers
that train to NaN, checkpoints edited after a run wrote them, checkpoints a team can read, and
seeds, names and sizes out of range.

Each case is a one-line error (exit code 2) that names the key and the value or file, before
anything is called, trained or written."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from src.cli import main as cli_main
from src.run_experiment import run
from src.tools.reproduce import main as reproduce_main
from tests.command_line import run_here
from tests.test_run_experiment import DEMO2, REPO, tiny_config


def cli(args: list[str], capsys, config: Path = DEMO2) -> tuple[int, str, str]:
    """Demo-2's command line in this process (as `demo_in_process` in test_resilience)."""
    capsys.readouterr()
    try:
        code = cli_main(args, default_config=str(config))
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def experiment_runs(uri: str, name: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    return [] if exp is None else client.search_runs([exp.experiment_id])


# ------------------------------------------------------------------ 1. configs are code

# A TOML that names a function where a class belongs, with the argument that would run a
# command if it were called: each is refused right after the import.
FUNCTION_AS_CLASS = {
    "model": (
        '[model]\nmodel = "os:system"\n\n[model.args]\ncommand = "touch {marker}"\n',
        "error: [model] model = 'os:system' is not an nn.Module class; name an nn.Module subclass.",
    ),
    "dataset": (
        '[data]\ndataset = "os:system"\n\n[data.args]\ncommand = "touch {marker}"\n',
        "error: [data] dataset = 'os:system' is not a torch.utils.data.Dataset class; name a "
        "Dataset subclass.",
    ),
    "transform": (
        '[data.args.transform]\nclass = "os:system"\ncommand = "touch {marker}"\n',
        "error: data.args.transform.class = 'os:system' is neither a torchvision.transforms "
        "class nor an nn.Module subclass; name a transform class.",
    ),
}


@pytest.mark.parametrize("where", sorted(FUNCTION_AS_CLASS))
def test_a_function_named_in_a_toml_is_refused_before_it_is_called(
    mlflow_uri, tmp_path, capsys, where
):
    marker = tmp_path / "touched-by-the-config"
    table, expected = FUNCTION_AS_CLASS[where]
    toml = tmp_path / "hostile.toml"
    toml.write_text(
        '[run]\nexperiment_name = "hostile"\nrun_name = "r"\ndevice = "cpu"\n\n'
        + table.format(marker=marker)
    )
    code, out, err = cli(["--epochs", "1", "--results-dir", str(tmp_path / "res")], capsys, toml)
    assert code == 2, out + err
    assert one_error_line(err) == expected
    assert not marker.exists()
    assert "Images:" not in out  # refused before any data was read
    assert experiment_runs(mlflow_uri, "hostile") == []


FOREIGN_MODULE = """
from pathlib import Path

from load_dataset.custom_tiny import TinyData
from load_dataset.errors import DataError

Path({imported!r}).touch()  # importing a module runs its code


class Data(TinyData):
    def __init__(self, *args, **kwargs):
        Path({called!r}).touch()
        raise DataError("the foreign dataset was called")
"""


def trained_run_with_edited_config(tmp_path: Path, monkeypatch, dataset: str):
    """A 1-epoch run whose stored config/config.toml was then edited (as anyone who can write
    to the tracking server can) to name `dataset`; a module `foreign_data` outside the
    repository, importable, leaves `imported` / `called` behind when it is imported / called."""
    foreign = tmp_path / "elsewhere"
    foreign.mkdir()
    marks = {"imported": foreign / "imported", "called": foreign / "called"}
    (foreign / "foreign_data.py").write_text(
        FOREIGN_MODULE.format(**{k: str(v) for k, v in marks.items()})
    )
    monkeypatch.syspath_prepend(str(foreign))
    original = run(tiny_config(tmp_path, **{"train.epochs": 1}))
    client = MlflowClient()
    stored = Path(client.download_artifacts(original.run_id, "config/config.toml", str(tmp_path)))
    text = stored.read_text()
    assert 'dataset = "load_dataset.custom_tiny:TinyData"' in text
    edited = text.replace("load_dataset.custom_tiny:TinyData", dataset)
    client.log_text(original.run_id, edited, "config/config.toml")
    return original, marks


def test_reproducing_a_run_whose_stored_config_names_a_foreign_class_is_refused(
    mlflow_uri, tmp_path, capsys, monkeypatch
):
    original, marks = trained_run_with_edited_config(tmp_path, monkeypatch, "foreign_data:Data")
    capsys.readouterr()
    assert reproduce_main([original.run_id]) == 2
    out, err = capsys.readouterr()
    line = one_error_line(err)
    assert line == (
        f"error: The stored config of run {original.run_id} imports 'foreign_data:Data' "
        "([data] dataset), from outside this repository's packages and torchvision; whoever "
        "can write to the MLflow store can edit that config, and an import runs code. Check "
        "the paths printed above, then rerun with --trust to use them."
    )
    # The paths it would use are printed first; nothing was imported, called or run.
    assert "[data] dataset = foreign_data:Data  (outside this repository" in out
    assert "[model] model = models.custom_models_base:TinyConv\n" in out
    assert not marks["imported"].exists() and not marks["called"].exists()
    assert [r.info.run_id for r in experiment_runs(mlflow_uri, "tiny-test")] == [original.run_id]


def test_trust_imports_a_foreign_class_but_never_calls_a_function(
    mlflow_uri, tmp_path, capsys, monkeypatch
):
    original, marks = trained_run_with_edited_config(tmp_path, monkeypatch, "foreign_data:Data")
    capsys.readouterr()
    # --trust lets the foreign class in: it is imported and called (it refuses, so no run).
    assert reproduce_main([original.run_id, "--trust"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == "error: the foreign dataset was called"
    assert marks["imported"].exists() and marks["called"].exists()
    # A function is still no class: trusted or not, it is never called.
    touched = tmp_path / "touched-by-the-config"
    text = Path(
        MlflowClient().download_artifacts(original.run_id, "config/config.toml", str(tmp_path))
    ).read_text()
    hostile = text.replace('"foreign_data:Data"', '"os:system"').replace(
        "[data.args]\n", f'[data.args]\ncommand = "touch {touched}"\n'
    )
    MlflowClient().log_text(original.run_id, hostile, "config/config.toml")
    capsys.readouterr()
    assert reproduce_main([original.run_id, "--trust"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: [data] dataset = 'os:system' is not a torch.utils.data.Dataset")
    assert not touched.exists()
    assert [r.info.run_id for r in experiment_runs(mlflow_uri, "tiny-test")] == [original.run_id]


# ------------------------------------------------------------------ 2. checkpoint permissions


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_checkpoints_follow_the_umask_as_every_other_output(tmp_path, umask, mode):
    from src.train.training_state import TrainingState

    model = torch.nn.Linear(2, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = TrainingState(model, optimizer, None, None, patience=0)
    improved = state.end_epoch({"val_loss": 0.5})
    previous = os.umask(umask)
    try:
        state.save(tmp_path, {"run": {}}, improved)
        (tmp_path / "other-output.txt").write_text("x")
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"best.pt": mode, "last.pt": mode, "other-output.txt": mode}


# ------------------------------------------------------------------ 3. optimizer numbers


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--set", "optimizer.lr=nan"], "[optimizer] lr = nan must be a finite number, 0 or more"),
        (["--lr", "inf"], "[optimizer] lr = inf must be a finite number, 0 or more"),
        (["--set", "optimizer.lr=-0.01"], "[optimizer] lr = -0.01 must be a finite number"),
        (
            ["--set", "optimizer.momentum=nan"],
            "[optimizer] momentum = nan must be a finite number, at least 0 and below 1",
        ),
        (["--set", "optimizer.momentum=1.5"], "[optimizer] momentum = 1.5 must be a finite"),
        (["--set", "optimizer.weight_decay=-1e-4"], "[optimizer] weight_decay = -0.0001 must be"),
        (["--set", "optimizer.gamma=-inf"], "[optimizer] gamma = -inf must be a finite number"),
    ],
)
def test_optimizer_numbers_that_cannot_train_are_one_line(
    mlflow_uri, tmp_path, capsys, args, expected
):
    code, out, err = cli(
        [
            "--experiment-name",
            "numbers",
            "--epochs",
            "1",
            "--results-dir",
            str(tmp_path / "r"),
            *args,
        ],
        capsys,
    )
    assert code == 2, out + err
    assert one_error_line(err).startswith(f"error: Config key {expected}")
    assert experiment_runs(mlflow_uri, "numbers") == []


def test_a_nan_learning_rate_in_a_toml_is_one_line(tmp_path, capsys):
    toml = tmp_path / "nan.toml"
    toml.write_text(DEMO2.read_text().replace("lr = 1e-3", "lr = nan"))
    code, _, err = cli(["--results-dir", str(tmp_path / "r")], capsys, toml)
    assert code == 2
    assert one_error_line(err) == (
        "error: Config key [optimizer] lr = nan must be a finite number, 0 or more; fix it in "
        "the TOML or on the command line."
    )


# ------------------------------------------------------------------ 4. edited checkpoints


@pytest.fixture(scope="module")
def trained_once(_store_template, tmp_path_factory) -> tuple[Path, Path, str]:
    """One 1-epoch run of TinyData: (its store, its results folder, its run id)."""
    folder = tmp_path_factory.mktemp("trained-once")
    shutil.copy(_store_template, folder / "mlflow.db")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        result = run(tiny_config(folder, **{"train.epochs": 1}))
    return folder / "mlflow.db", result.results_dir, result.run_id


def _model_of_another_shape(ckpt: dict) -> None:
    name = next(iter(ckpt["model"]))
    ckpt["model"][name] = torch.zeros(2, *ckpt["model"][name].shape[1:])


def _garbled_numpy_state(ckpt: dict) -> None:
    ckpt["rng"]["numpy"][1] = ckpt["rng"]["numpy"][1][:10]


def _momentum_of_another_shape(ckpt: dict) -> None:
    ckpt["optimizer"]["state"][0]["momentum_buffer"] = torch.zeros(7)


EDITS = {
    "model weights of another shape": (_model_of_another_shape, "its 'model' tensor"),
    "torch rng state not uint8": (
        lambda c: c["rng"].update(torch=c["rng"]["torch"].float()),
        "its 'rng.torch' is not torch's random state (a uint8 tensor)",
    ),
    "numpy rng state missing": (
        lambda c: c["rng"].pop("numpy"),
        "its 'rng' has no 'numpy' state",
    ),
    "numpy rng state garbled": (
        _garbled_numpy_state,
        "its 'rng.numpy' is not a state of NumPy's random generator",
    ),
    "momentum buffer of another shape": (
        _momentum_of_another_shape,
        "its 'optimizer' 'momentum_buffer' of parameter 0 has shape [7]",
    ),
    "history garbled": (
        lambda c: c.update(history=[{"epoch": 3}]),
        "its 'history' entry 0 is not epoch 1 with a val_loss",
    ),
}


# With these flags (and the run's --results-dir) the unedited checkpoint resumes: tiny_config's
# experiment, device and patience, one epoch more.
SAME_RUN = ["--experiment-name", "tiny-test", "--device", "cpu", "--patience", "0", "--epochs", "2"]


@pytest.mark.parametrize("case", sorted(EDITS))
def test_resuming_an_edited_checkpoint_is_one_line_and_changes_nothing(
    trained_once, tmp_path, capsys, monkeypatch, case
):
    store, results, run_id = trained_once
    shutil.copy(store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    folder = tmp_path / "results" / run_id
    shutil.copytree(results, folder)
    last = folder / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    edit, needle = EDITS[case]
    edit(ckpt)
    torch.save(ckpt, last)
    before = last.read_bytes()

    code, out, err = cli(
        ["--resume", str(folder), "--results-dir", str(results.parent.parent), *SAME_RUN], capsys
    )
    assert code == 2, out + err
    line = one_error_line(err)
    assert line.startswith(f"error: {last} cannot be resumed: ") and needle in line, line
    assert last.read_bytes() == before
    (r,) = experiment_runs(uri, "tiny-test")
    assert r.info.status == "FINISHED"  # not reopened, so never left RUNNING


def test_predicting_with_a_best_pt_of_other_shapes_is_one_line(mlflow_uri, tmp_path, capsys):
    """The same check as resume, for `--task predict_on_valid`: a best.pt whose weights have
    other shapes than the model (its config left as it was) is one line, not a traceback."""
    trained = run(tiny_config(tmp_path, **{"train.epochs": 1}))
    best = trained.results_dir / "best.pt"
    state = torch.load(best, weights_only=True)
    name = next(iter(state["model"]))
    state["model"][name] = torch.zeros(7)
    torch.save(state, best)
    capsys.readouterr()
    code = cli_main(
        ["--task", "predict_on_valid", "--set", f"run.checkpoint={trained.results_dir}"]
        + ["--results-dir", str(tmp_path / "results"), "--epochs", "1"],
        default_config=str(DEMO2),
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.strip().splitlines() == [
        f"error: {best} does not fit this model: its 'model' tensor {name!r} is torch.float32 "
        f"[7], the model's torch.float32 [{', '.join(map(str, _shape_of(name)))}]; predict "
        "with the config of the run that wrote it."
    ]


def _shape_of(name: str) -> list[int]:
    from src.config import load
    from src.train.build import build_model

    return list(build_model(load(DEMO2)).state_dict()[name].shape)


def test_a_loss_that_is_nan_in_the_first_epoch_names_no_checkpoint(mlflow_uri, tmp_path, capsys):
    """The message named a last.pt that did not exist when the first epoch failed."""
    results = tmp_path / "results"
    capsys.readouterr()
    code = cli_main(
        ["--epochs", "2", "--results-dir", str(results), "--experiment-name", "nan1"]
        + ["--set", 'data.dataset="tests.faulty_data:NaNAfterTinyData"']
        + ["--set", "data.args.good_samples=0"],
        default_config=str(DEMO2),
    )
    err = capsys.readouterr().err
    assert code == 2, err
    (line,) = err.strip().splitlines()
    assert "no epoch completed, so there is no checkpoint" in line and "last.pt" not in line
    assert not list(results.glob("**/*.pt"))


# ------------------------------------------------------------------ 5. out of range

DEMO2_SCRIPT = [str(REPO / "Demo-2-TinyConv-TinyData.py")]
RUN_DEMO2 = ["-m", "src.run_experiment", str(DEMO2)]
SEED_RANGE = "must be from 0 to 2**32 - 1 (4294967295)."
# 128 two-byte characters: a folder name of 256 bytes (file systems take 255).
WIDE = "é" * 128
# (program, flags, the one line) of each case; {tmp}: the test's folder. Each value flows into
# a seed (NumPy's), a folder or file name, a name MLflow keeps, or a size.
OUT_OF_RANGE = {
    "seed -1": (DEMO2_SCRIPT, ["--seed", "-1"], f"[run] seed = -1 {SEED_RANGE}"),
    "seed 2**40": (
        DEMO2_SCRIPT,
        ["--seed", "1099511627776"],
        f"[run] seed = 1099511627776 {SEED_RANGE}",
    ),
    "one of --seeds 2**32": (
        DEMO2_SCRIPT,
        ["--seeds", "0", "4294967296"],
        f"[run] seed = 4294967296 {SEED_RANGE}",
    ),
    "seed -1 in the TOML": (
        ["-m", "src.run_experiment", "{tmp}/seed.toml"],
        [],
        f"[run] seed = -1 {SEED_RANGE}",
    ),
    "seed 2**32 by --set": (
        RUN_DEMO2,
        ["--set", "run.seed=4294967296"],
        f"[run] seed = 4294967296 {SEED_RANGE}",
    ),
    "experiment name of 300 characters": (
        DEMO2_SCRIPT,
        ["--experiment-name", "e" * 300],
        "[run] experiment_name must have 1 to 255 characters, not only spaces (it names a "
        "folder); it has 300.",
    ),
    "experiment name of spaces": (
        RUN_DEMO2,
        ["--experiment-name", "  "],
        "[run] experiment_name must have 1 to 255 characters, not only spaces (it names a "
        "folder); it has 2.",
    ),
    "run name of 251 characters": (
        DEMO2_SCRIPT,
        ["--run-name", "r" * 251],
        "[run] run_name must have at most 250 characters; it has 251.",
    ),
    "registered model name of 257 characters": (
        DEMO2_SCRIPT,
        ["--register-model", "m" * 257],
        f"[run] register_model = '{'m' * 257}' is not a usable model name; use up to 256 "
        "letters, digits, '-', '_', '.' or spaces (no '/', ':' or '%').",
    ),
    "results folder name of 256 bytes": (
        DEMO2_SCRIPT,
        ["--results-dir", f"{{tmp}}/{WIDE}/results"],
        f"[run] results_dir = '{{tmp}}/{WIDE}/results' has a folder name longer than 255 "
        "bytes, which file systems refuse.",
    ),
    "batch size 2**63": (
        DEMO2_SCRIPT,
        ["--batch-size", str(2**63)],
        "[data] batch_size = 9223372036854775808 is beyond 64-bit integers.",
    ),
}


def store_contents(uri: str) -> tuple[list[str], list[str]]:
    """(experiment names, run ids) of the store, deleted ones included."""
    client = MlflowClient(uri)
    experiments = client.search_experiments(view_type=ViewType.ALL)
    ids = [e.experiment_id for e in experiments]
    runs = client.search_runs(ids, run_view_type=ViewType.ALL)
    return sorted(e.name for e in experiments), [r.info.run_id for r in runs]


@pytest.mark.parametrize("case", OUT_OF_RANGE)
def test_seeds_names_and_sizes_out_of_range_are_one_line_before_anything_is_made(
    mlflow_uri, tmp_path, capsys, monkeypatch, case
):
    program, flags, expected = OUT_OF_RANGE[case]
    (tmp_path / "seed.toml").write_text(DEMO2.read_text().replace("seed = 0", "seed = -1"))
    # A results folder in tmp_path, unless the case names its own (flags: the last wins).
    argv = [*program, "--results-dir", "{tmp}/results", *flags]
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    before_store, before_files = store_contents(mlflow_uri), sorted(tmp_path.rglob("*"))
    assert before_store == (["Default"], [])

    out = run_here(argv, tmp_path, capsys, monkeypatch)

    assert out.returncode == 2, out.stdout + out.stderr
    line = "error: Config key " + expected.replace("{tmp}", str(tmp_path))
    assert out.stderr.splitlines() == [line]
    assert store_contents(mlflow_uri) == before_store  # no experiment, no run
    assert sorted(tmp_path.rglob("*")) == before_files  # no results folder, no artifacts


def test_a_sweep_at_the_largest_seed_draws_its_next_trial_with_a_seed_that_wraps_around():
    """A trial's sampler seed is the sweep's seed plus the trials before it: after a sweep at
    the largest seed a config allows (2**32 - 1), the next trial draws with seed 0."""
    import optuna

    from src.sweep.space import SweepSpace, make_sampler

    space = SweepSpace(
        {"x": {"type": "float", "low": 0.0, "high": 1.0}}, sampler={"name": "random"}
    )

    def first_draw(sampler) -> float:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return optuna.create_study(sampler=sampler).ask().suggest_float("x", 0.0, 1.0)

    assert first_draw(make_sampler(space, 2**32 - 1, offset=1)) == first_draw(
        make_sampler(space, 0)
    )
    assert first_draw(make_sampler(space, 2**32 - 1)) != first_draw(make_sampler(space, 0))
