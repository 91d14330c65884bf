"""The embedded SQLite MLflow store: one left half-migrated (as two first opens at once used
to leave it) is repaired on the next open, with a backup; one that cannot be repaired safely
is reported with the commands that finish it, never as a raw SQL error."""

import sqlite3
from pathlib import Path

import pytest
import sqlalchemy
from alembic import command
from mlflow import MlflowClient
from mlflow.store.db.utils import _get_alembic_config
from mlflow.store.tracking.dbmodels.initial_models import Base as InitialBase

from mlpaint.tracking import TrackingStoreError, prepare_sqlite_store, prepare_store_meanwhile

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
