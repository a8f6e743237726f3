"""What a run's MLflow page shows besides its metrics: its datasets (the runs table's Dataset
column), the machine's system metrics, and the registry alias of its model; real tiny runs in a
real SQLite store."""

from __future__ import annotations

import json
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

import src.config as cfg
from load_dataset.custom_tiny import SHIPPED_DATA_DIR
from src.run_experiment import run
from tests.command_line import run_here
from tests.test_run_experiment import DEMO2, tiny_config


def dataset_inputs(client: MlflowClient, run_id: str) -> dict[str, tuple[str, str, dict, str]]:
    """name -> (digest, source folder, profile, context) of the run's dataset inputs."""
    out = {}
    for i in client.get_run(run_id).inputs.dataset_inputs:
        d, tags = i.dataset, {t.key: t.value for t in i.tags}
        source = json.loads(d.source)["uri"]
        out[d.name] = (d.digest, source, json.loads(d.profile), tags["mlflow.data.context"])
    return out


def system_keys(client: MlflowClient, run_id: str) -> set[str]:
    return {k for k in client.get_run(run_id).data.metrics if k.startswith("system/")}


def monitor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor" and t.is_alive()]


def test_datasets_and_system_metrics_of_a_run_and_its_resume(mlflow_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    client = MlflowClient(mlflow_uri)
    sampled = []

    def wait_for_a_sample(epoch: int, metrics: dict) -> bool:
        """The first epoch waits (60 s at most) until the monitor has logged a sample."""
        run_id = client.search_runs([client.get_experiment_by_name("tiny-test").experiment_id])
        run_id = run_id[0].info.run_id
        deadline = time.monotonic() + 60
        while not sampled and time.monotonic() < deadline:
            sampled.extend(system_keys(client, run_id))
            time.sleep(0.05)
        return False

    first = run(tiny_config(tmp_path, **{"train.epochs": 2}), on_epoch=wait_for_a_sample)
    tags = client.get_run(first.run_id).data.tags
    expected = {
        f"TinyData-{split}": (
            tags[f"data.{split}.fingerprint"],
            str(SHIPPED_DATA_DIR),
            {"num_rows": int(tags[f"data.{split}.count"])},
            split,
        )
        for split in ("train", "val")
    }
    assert dataset_inputs(client, first.run_id) == expected
    assert len(expected["TinyData-train"][0]) == 16  # the fingerprint, not an empty digest
    # What MLflow names them; GPU figures only on a machine with one.
    keys = system_keys(client, first.run_id)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys
    assert not monitor_threads()  # stopped at the end of the run

    # Resumed to train longer: the same inputs, not logged twice; the sampling goes on.
    resumed = run(tiny_config(tmp_path, **{"train.epochs": 3}), resume=first.results_dir)
    assert resumed.run_id == first.run_id
    assert len(client.get_run(first.run_id).inputs.dataset_inputs) == 2
    assert dataset_inputs(client, first.run_id) == expected
    assert not monitor_threads()


def test_system_metrics_off_and_a_failed_run_stops_the_monitor(mlflow_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    client = MlflowClient(mlflow_uri)
    seen = []

    def watch(epoch: int, metrics: dict) -> bool:
        seen.append(len(monitor_threads()))
        time.sleep(0.5)  # five sampling intervals: a monitor would have logged
        return False

    off = run(tiny_config(tmp_path, **{"run.system_metrics": False}), on_epoch=watch)
    assert seen == [0, 0, 0]
    assert system_keys(client, off.run_id) == set()
    assert len(client.get_run(off.run_id).inputs.dataset_inputs) == 2  # datasets all the same

    def fail(epoch: int, metrics: dict) -> bool:
        seen.append(len(monitor_threads()))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run(tiny_config(tmp_path, **{"run.run_name": "failing"}), on_epoch=fail)
    assert seen[-1] == 1  # it was running, and the failed run stopped it
    assert not monitor_threads()
    failed = client.search_runs(
        [off.experiment_id], "attributes.run_name = 'failing'", max_results=1
    )[0]
    assert failed.info.status == "FAILED"


@pytest.mark.slow
def test_registered_version_gets_the_alias(mlflow_uri, tmp_path):
    overrides = {
        "run.log_model": True,
        "run.register_model": "tiny-aliased",
        "run.model_alias": "candidate",
        "train.epochs": 1,
    }
    result = run(tiny_config(tmp_path, **overrides))
    version = MlflowClient(mlflow_uri).get_model_version_by_alias("tiny-aliased", "candidate")
    assert (str(version.version), version.run_id) == ("1", result.run_id)


@pytest.mark.parametrize("alias", ["latest", "Latest", "v3", "V12", "no/slash", "a b"])
def test_reserved_or_malformed_alias_is_refused(alias):
    settings = {"run.register_model": "m", "run.model_alias": alias}
    with pytest.raises(cfg.ConfigError, match=r"\[run\] model_alias = .* not a usable alias"):
        cfg.load(DEMO2, settings)


def test_alias_flag_refused_in_one_line_before_the_run(mlflow_uri, tmp_path, capsys, monkeypatch):
    argv = ["-m", "src.run_experiment", str(DEMO2), "--register-model", "m", "--alias", "latest"]
    out = run_here([*argv, "--results-dir", str(tmp_path / "r")], tmp_path, capsys, monkeypatch)
    assert out.returncode == 2
    assert out.stderr.startswith("error: Config key [run] model_alias = 'latest'")
    assert len(out.stderr.strip().splitlines()) == 1
    client = MlflowClient(mlflow_uri)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
    # An alias without a registered model has nothing to name.
    with pytest.raises(cfg.ConfigError, match="model_alias needs register_model"):
        cfg.load(DEMO2, {"run.model_alias": "candidate"})
