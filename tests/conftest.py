"""Shared fixtures: a real SQLite MLflow store per test, copied from one made per session."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs the tests in one worker per core (pytest-xdist): one thread each, and
    # the same for the processes the tests start, or the workers fight for the cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def _store_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, fully migrated SQLite store (creating one takes seconds: do it once)."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("store-template")
    db = folder / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def mlflow_uri(_store_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A private copy of the store for this test, set as MLFLOW_TRACKING_URI."""
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(_store_template, store / "mlflow.db")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The `slow` tests (seconds to a minute each) first: with one worker per core
    (`make test`), the short ones then fill the gaps instead of one long test ending last."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
