"""src.sweep.multirun: a set of seeds as child runs of one parent with the mean and std."""

from __future__ import annotations

import csv
import runpy
import statistics
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from src.sweep.multirun import run_children, run_seeds
from tests.test_run_experiment import QUICK_END, tiny_config

REPO = Path(__file__).resolve().parent.parent


def children_of(client: MlflowClient, parent) -> list:
    runs = client.search_runs(
        [parent.info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        order_by=["attributes.start_time ASC"],
    )
    return list(runs)


def test_demo_cli_with_seeds_makes_a_parent_with_mean_and_std_of_the_children(
    mlflow_uri, tmp_path, monkeypatch, capsys
):
    """`--seeds 0 1` on a Demo's command line: a parent run and one child run per seed, in
    order, the parent holding their mean and std and a table of the children; the command
    prints the parent's id and the link to its page. `run_seeds` itself runs as the command
    calls it; what it returns is kept to check against the store."""
    import src.cli

    returned = []

    def keeping_what_it_returns(config, seeds):
        returned.append(run_seeds(config, seeds))
        return returned[-1]

    monkeypatch.setattr(src.cli, "run_seeds", keeping_what_it_returns)
    argv = [
        "Demo-2-TinyConv-TinyData.py",
        "--seeds", "0", "1",
        "--epochs", "1",
        "--results-dir", str(tmp_path / "r"),
        "--experiment-name", "seeds-cli",
        *QUICK_END,
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(REPO / "Demo-2-TinyConv-TinyData.py"), run_name="__main__")
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "best_val_auroc_mean.std" in out
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("seeds-cli").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(runs) == 3 and len(parents) == 1
    # The parent's id and the link to its page: the group's summary is there.
    parent = parents[0]
    pid, eid = parent.info.run_id, parent.info.experiment_id
    assert f"Parent run of the 2 seeds: {pid}" in out
    link = f"http://127.0.0.1:5000/#/experiments/{eid}/runs/{pid}/model-metrics"
    assert f"This run: {link}?workflowType=machine_learning\n" in out

    ((parent_id, results),) = returned
    assert parent_id == pid
    children = children_of(client, parent)
    assert [c.info.run_id for c in children] == [r.run_id for r in results]
    assert [c.info.run_name for c in children] == ["tinyconv-seed0", "tinyconv-seed1"]
    assert [c.data.params["run.seed"] for c in children] == ["0", "1"]
    assert all(c.data.tags["mlflow.parentRunId"] == parent_id for c in children)
    assert parent.info.run_name == "tinyconv-seeds" and parent.info.status == "FINISHED"
    assert parent.data.tags["seeds"] == "0 1"

    values = [c.data.metrics["best_val_auroc_mean"] for c in children]
    assert values[0] != values[1]  # different seeds, different runs: the std means something
    metrics = parent.data.metrics
    assert metrics["best_val_auroc_mean.mean"] == pytest.approx(statistics.fmean(values), abs=1e-12)
    assert metrics["best_val_auroc_mean.std"] == pytest.approx(statistics.stdev(values), abs=1e-12)
    ap = [c.data.metrics["best_val_ap_mean"] for c in children]
    assert metrics["best_val_ap_mean.mean"] == pytest.approx(statistics.fmean(ap), abs=1e-12)

    table = client.download_artifacts(parent_id, "summary/children.csv", str(tmp_path))
    with open(table) as f:
        rows = list(csv.DictReader(f))
    assert [r["run_id"] for r in rows] == [r.run_id for r in results]
    assert [float(r["best_val_auroc_mean"]) for r in rows] == pytest.approx(values)


def test_seeds_and_resume_cannot_be_combined(mlflow_uri, tmp_path, capsys):
    from src.cli import main

    argv = ["--seeds", "0", "1", "--resume", str(tmp_path), "--results-dir", str(tmp_path)]
    assert (
        main(argv, default_config=str(REPO / "experiments" / "demo2_tinyconv_tinydata.toml")) == 2
    )
    assert "--seeds and --resume cannot be combined" in capsys.readouterr().err


def test_a_failing_child_fails_the_parent(mlflow_uri, tmp_path):
    from load_dataset.errors import DataError

    config = tiny_config(tmp_path, **{"run.run_name": "broken"})
    missing = str(tmp_path / "no-such-folder")
    with pytest.raises(DataError):
        run_children(config, [("broken-0", {"data.args.data_dir": missing})], "broken-grid")
    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name(config.run.experiment_name)
    (parent,) = client.search_runs(
        [experiment.experiment_id], "attributes.run_name = 'broken-grid'"
    )
    assert parent.info.status == "FAILED"


def all_runs(client: MlflowClient) -> list:
    """Every run in the store, in any experiment, deleted ones included."""
    from mlflow.entities import ViewType

    experiments = client.search_experiments(view_type=ViewType.ALL)
    return list(
        client.search_runs([e.experiment_id for e in experiments], run_view_type=ViewType.ALL)
    )


def test_only_rank_0_creates_the_parent_run(mlflow_uri, tmp_path, monkeypatch):
    import src.sweep.multirun
    from src.distributed import is_main_process
    from src.run_experiment import RunResult

    # Every rank runs every child; the real `run` would wait for the other torchrun ranks
    # here, so a stand-in records what each child was given.
    given_parents: list[str | None] = []

    def fake_run(child, parent_run_id=None):
        given_parents.append(parent_run_id)
        metrics = {"best_val_auroc_mean": 0.5 + len(given_parents) / 10}
        return RunResult(f"child-{len(given_parents)}", "", None, 1, metrics)

    monkeypatch.setattr(src.sweep.multirun, "run", fake_run)
    config = tiny_config(tmp_path)
    children = [("c0", {"run.seed": 0}), ("c1", {"run.seed": 1})]
    client = MlflowClient(mlflow_uri)

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not is_main_process()
    parent_id, results = run_children(config, children, "p")
    assert parent_id == "" and given_parents == ["", ""]
    assert [r.run_id for r in results] == ["child-1", "child-2"]  # the children still ran
    assert all_runs(client) == []  # rank 1 wrote no parent (and no summary) to the store

    given_parents.clear()
    monkeypatch.setenv("RANK", "0")
    assert is_main_process()
    parent_id, _ = run_children(config, children, "p")
    (parent,) = all_runs(client)
    assert parent.info.run_id == parent_id and given_parents == [parent_id, parent_id]
    assert parent.info.run_name == "p" and parent.info.status == "FINISHED"
    assert parent.data.metrics["best_val_auroc_mean.mean"] == pytest.approx(0.65)

    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("RANK", "1")
    assert is_main_process()  # RANK alone is not a torchrun launch
