"""The embedded SQLite MLflow store: one left half-migrated (as two first opens at once used
to leave it) is repaired on the next open, with a backup; one that cannot be repaired safely
is reported with the commands that finish it, never as a raw SQL error; one that a plain
MLflow client (`mlflow ui`, which takes no lock of mlpaint's) is creating is waited for, and
one mlpaint creates is never seen half built."""

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import sqlalchemy
from alembic import command
from mlflow import MlflowClient
from mlflow.store.db.utils import _get_alembic_config
from mlflow.store.tracking.dbmodels.initial_models import Base as InitialBase

from mlpaint.processes import free_port, stop_service
from mlpaint.tracking import TrackingStoreError, prepare_sqlite_store, prepare_store_meanwhile
from mlpaint.tracking.store import _create_store_aside
from tests.conftest import wait_for

pytestmark = pytest.mark.integration

# The MLflow schema revision just before the migration that rebuilds `experiments` (adding
# workspace columns, by Alembic's copy-and-rename on SQLite). Revisions are never removed, so
# newer MLflow versions still migrate through it.
BEFORE_EXPERIMENTS_REBUILD = "c8d9e0f1a2b3"


def _interrupted_store(folder: Path) -> tuple[Path, str]:
    """A store whose migration of `experiments` died after copying the table: the schema at
    the revision before, plus the copy Alembic had made."""
    database = folder / "mlflow.db"
    uri = f"sqlite:///{database}"
    engine = sqlalchemy.create_engine(uri)
    InitialBase.metadata.create_all(engine)
    config = _get_alembic_config(uri)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, BEFORE_EXPERIMENTS_REBUILD)
    engine.dispose()
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TABLE _alembic_tmp_experiments AS SELECT * FROM experiments")
    return database, uri


def _orphaned_copy_store(folder: Path) -> tuple[Path, str]:
    """An interrupted store whose original `experiments` table is gone too: only the copy
    is left, which the repair does not guess at."""
    database, uri = _interrupted_store(folder)
    with sqlite3.connect(database) as connection:
        connection.execute("DROP TABLE experiments")
    return database, uri


def _tables(database: Path) -> set[str]:
    with sqlite3.connect(database) as connection:
        return {row[0] for row in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_a_half_migrated_store_is_repaired_and_backed_up(tmp_path):
    database, uri = _interrupted_store(tmp_path)
    prepare_sqlite_store(uri)
    assert not {t for t in _tables(database) if t.startswith("_alembic_tmp_")}
    backups = list(tmp_path.glob("mlflow.db.before-repair-*"))
    assert len(backups) == 1 and "_alembic_tmp_experiments" in _tables(backups[0])
    client = MlflowClient(uri, uri)
    experiment = client.create_experiment("after-repair")
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "accuracy", 0.9)
    assert client.get_run(run.info.run_id).data.metrics == {"accuracy": 0.9}


def test_a_copy_without_its_original_is_reported_with_the_fix(tmp_path):
    database, uri = _orphaned_copy_store(tmp_path)
    with pytest.raises(TrackingStoreError, match=r"ALTER TABLE _alembic_tmp_experiments "
                                                 r"RENAME TO experiments.*mlflow db upgrade"):
        prepare_sqlite_store(uri)
    assert "_alembic_tmp_experiments" in _tables(database)  # nothing guessed at


def test_a_store_prepared_meanwhile_is_complete_once_waited_for(tmp_path):
    """What `mlpaint train` does while the temporary Prefect server starts: the schema is
    built on a thread, and waiting returns only when a client can use it."""
    database = tmp_path / "new" / "mlflow.db"
    wait = prepare_store_meanwhile(f"sqlite:///{database}")
    wait()
    assert {"alembic_version", "experiments", "runs", "registered_models"} <= _tables(database)
    assert MlflowClient(f"sqlite:///{database}").search_experiments()


def test_waiting_for_a_store_prepared_meanwhile_raises_what_preparing_raised(tmp_path):
    _, uri = _orphaned_copy_store(tmp_path)
    wait = prepare_store_meanwhile(uri)
    with pytest.raises(TrackingStoreError, match="mlflow db upgrade"):
        wait()


def test_a_tracking_server_needs_no_preparing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert prepare_store_meanwhile("http://127.0.0.1:5000")() is None
    assert not any(tmp_path.iterdir())  # no database, folder or lock made for it


def _mlflow_server(uri: str, port: int, folder: Path) -> subprocess.Popen:
    """`mlflow server` on the store, as `mlflow ui` runs it: a plain MLflow client."""
    return subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host",
         "127.0.0.1", "--port", str(port), "--workers", "1", "--backend-store-uri", uri,
         "--default-artifact-root", str(folder / "artifacts")],
        stdout=(folder / "server.log").open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True)


def _use(uri: str, experiment: str) -> None:
    client = MlflowClient(uri, uri)
    run = client.create_run(client.create_experiment(experiment))
    client.log_metric(run.info.run_id, "accuracy", 0.9)
    client.set_terminated(run.info.run_id)
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def test_a_store_an_mlflow_server_is_creating_is_waited_for_not_migrated_again(tmp_path):
    """`mlflow ui` opened on a new store just before a training run: the run finds the
    server's half-built store, waits for it instead of migrating it a second time beside it
    (which broke the run with `Online migration expected to match one row`), and both work."""
    database = tmp_path / "mlflow.db"
    uri = f"sqlite:///{database}"
    port = free_port()
    log = tmp_path / "server.log"
    server = _mlflow_server(uri, port, tmp_path)
    try:
        wait_for(database.exists, "the server to begin creating its store", timeout_s=180,
                 interval_s=0.01)
        prepare_sqlite_store(uri)
        _use(uri, "after-the-race")
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/health"), "the server",
                 timeout_s=180)
        assert server.poll() is None, log.read_text()
        assert "Online migration" not in log.read_text()
        experiments = MlflowClient(f"http://127.0.0.1:{port}").search_experiments()
        assert "after-the-race" in {e.name for e in experiments}
    finally:
        stop_service(server)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_a_store_mlpaint_creates_appears_whole_to_an_mlflow_server(tmp_path):
    """The other order: mlpaint creates the store while a server starts on it. The server
    either opens the complete store or creates its own first, which mlpaint then keeps."""
    database = tmp_path / "mlflow.db"
    uri = f"sqlite:///{database}"
    port = free_port()
    process = _mlflow_server(uri, port, tmp_path)
    try:
        prepare_sqlite_store(uri)
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/health"), "the server",
                 timeout_s=180)
        _use(f"http://127.0.0.1:{port}", "through-the-server")
        _use(uri, "in-the-store")
        assert not list(tmp_path.glob("mlflow.db.creating-*"))
    finally:
        stop_service(process)


def test_a_store_created_meanwhile_by_another_client_is_kept(tmp_path):
    """mlpaint builds a new store aside; if another client made one at the name meanwhile,
    that one stays (with what it already holds) and mlpaint's copy is dropped."""
    database = tmp_path / "mlflow.db"
    uri = f"sqlite:///{database}"
    prepare_sqlite_store(uri)
    experiment = MlflowClient(uri, uri).create_experiment("theirs")
    _create_store_aside(database)
    assert MlflowClient(uri, uri).get_experiment(experiment).name == "theirs"
    assert not list(tmp_path.glob("mlflow.db.creating-*"))
