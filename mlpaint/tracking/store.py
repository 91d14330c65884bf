"""Where MLflow runs go: the tracking URI, a client on it, the embedded SQLite store (created
and migrated once, under a lock; a half-migrated one repaired), and the experiment.

The tracking URI is `MLFLOW_TRACKING_URI` when set, else a SQLite store in `.mlpaint/` under
the working directory, with artifacts beside it. Nothing is configured at import time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mlpaint.processes import sqlite_files_state
from mlpaint.storage.catalog import LOCAL_STORE_DIR

logger = logging.getLogger(__name__)

# The MLflow UI opens an experiment of this kind on its training runs (not on GenAI traces).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def resolve_tracking_uri() -> str:
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    folder = Path.cwd() / LOCAL_STORE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def tracking_client(tracking_uri: str):
    """An MlflowClient whose tracking store is also its model registry. A SQLite store is
    created or migrated under a lock first (see `prepare_sqlite_store`)."""
    from mlflow import MlflowClient

    if tracking_uri.startswith(SQLITE_PREFIX):
        prepare_sqlite_store(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


SQLITE_PREFIX = "sqlite:///"
_prepared_stores: set[str] = set()


def _sqlite_artifact_root(tracking_uri: str) -> str:
    """Artifacts of a SQLite store: an `artifacts/` folder beside the database."""
    return (Path(tracking_uri.removeprefix(SQLITE_PREFIX)).parent / "artifacts").resolve(
    ).as_uri()


def prepare_sqlite_store(tracking_uri: str) -> None:
    """Create or migrate a SQLite MLflow store, one process at a time.

    MLflow builds and migrates a SQLite store's schema when a process first opens it, with
    no lock: two runs started together on a new store both migrated it and left it half
    done (`table _alembic_tmp_experiments already exists`), for them and every later run.
    Here the first open happens under a file lock beside the database; whoever comes second
    finds the schema complete. A client that takes no such lock (`mlflow ui`, a script) is
    kept out another way: a new store is built whole in a file of its own and linked into
    place only once complete, and a store that such a client is creating is waited for
    rather than migrated a second time beside it. Once per store per process."""
    if tracking_uri in _prepared_stores:
        return
    from alembic.util.exc import CommandError
    from filelock import FileLock
    from mlflow.exceptions import MlflowException
    from mlflow.store.model_registry.sqlalchemy_store import (
        SqlAlchemyStore as RegistryStore,
    )
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingStore
    from sqlalchemy.exc import SQLAlchemyError

    database = Path(tracking_uri.removeprefix(SQLITE_PREFIX))
    database.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{database}.lock"):
        if not database.exists():
            _create_store_aside(database)
        _await_other_clients_migration(database)
        _repair_interrupted_migration(database)
        try:
            # Opening the stores runs MLflow's migrations of an older schema.
            TrackingStore(tracking_uri, _sqlite_artifact_root(tracking_uri))
            RegistryStore(tracking_uri)
        except (SQLAlchemyError, sqlite3.Error, CommandError, MlflowException) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise TrackingStoreError(
                f"{database}: MLflow could not open or upgrade this store ({first_line}). If "
                f"another MLflow client (mlflow ui, mlflow server) has it open, stop that "
                f"client and run again; otherwise back the file up, then run "
                f"`mlflow db upgrade {tracking_uri}`, or move the file away to start a new "
                "store") from exc
    _prepared_stores.add(tracking_uri)


def _create_store_aside(database: Path) -> None:
    """A new store's whole schema built in a file beside `database`, then linked into place
    (which fails if the name exists), so no other client ever opens a half-built store. If
    one created its own there meanwhile, that one is kept and this one dropped."""
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables

    aside = database.with_name(f"{database.name}.creating-{os.getpid()}")
    aside.unlink(missing_ok=True)
    engine = sqlalchemy.create_engine(f"{SQLITE_PREFIX}{aside}")
    try:
        _initialize_tables(engine)
    finally:
        engine.dispose()
    try:
        os.link(aside, database)
    except FileExistsError:
        logger.info("%s: another MLflow client created this store meanwhile; using it",
                    database)
    finally:
        aside.unlink(missing_ok=True)


# How long a store that is not at MLflow's newest schema must stay untouched before it is
# taken as nobody's work in progress (an older store, or one a killed client left): MLflow
# commits each of its migrations as it goes, a fraction of a second apart even on a busy
# machine, and its first commit comes after its imports.
_MIGRATION_QUIET_S = 10.0
_MIGRATION_LIMIT_S = 600.0


def _await_other_clients_migration(database: Path) -> None:
    """Return once the store is at MLflow's newest schema, or once it has gone
    `_MIGRATION_QUIET_S` without any change (nobody is migrating it: MLflow's own upgrade
    then takes it from where it is)."""
    from mlflow.store.db.utils import _get_latest_schema_revision

    newest = _get_latest_schema_revision()
    started = last_change = time.monotonic()
    last_state = None
    waiting_said = False
    while True:
        state = _schema_state(database)
        if state[0] == newest:
            return
        now = time.monotonic()
        if state != last_state:
            last_state, last_change = state, now
        elif now - last_change > _MIGRATION_QUIET_S:
            return
        if now - started > _MIGRATION_LIMIT_S:
            raise TrackingStoreError(
                f"{database}: another MLflow client has been creating or upgrading this store "
                f"for {_MIGRATION_LIMIT_S / 60:.0f} minutes; stop it (mlflow ui, mlflow server) "
                "and run again")
        if not waiting_said:
            logger.info("%s: not yet at MLflow's schema %s; waiting while another client "
                        "may be creating or upgrading it", database, newest)
            waiting_said = True
        time.sleep(0.1)


def _schema_state(database: Path) -> tuple:
    """What changes while a client migrates the store: its schema revision (None before
    Alembic's first), whether a write is under way, and the files' sizes and times."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True,
                                                timeout=0)) as connection:
            rows = connection.execute("SELECT version_num FROM alembic_version").fetchall()
        revision = rows[0][0] if rows else None
    except sqlite3.OperationalError as exc:  # no table yet, or a write holds the file
        revision = None if "no such table" in str(exc) else f"busy: {exc}"
    return revision, sqlite_files_state(database)


def prepare_store_meanwhile(tracking_uri: str) -> Callable[[], None]:
    """`prepare_sqlite_store` on a thread, begun now; the function returned waits for it and
    raises what it raised. Nothing to do for a tracking server.

    A new SQLite store's schema is seconds of Python (all of MLflow's migrations). Inside
    the training flow it held the GIL against the data fetch beside it, slowing that many
    times over, then the fits waited for the experiment's id; `mlpaint train` begins it
    while the temporary Prefect server starts, which the command waits for anyway."""
    if not tracking_uri.startswith(SQLITE_PREFIX):
        return lambda: None
    pool = ThreadPoolExecutor(1, thread_name_prefix="prepare-mlflow-store")
    prepared = pool.submit(prepare_sqlite_store, tracking_uri)
    pool.shutdown(wait=False)  # its one thread ends with the job
    return prepared.result


class TrackingStoreError(RuntimeError):
    """A local MLflow store that cannot be opened: the message says what to do."""


_ALEMBIC_TMP_PREFIX = "_alembic_tmp_"


def _repair_interrupted_migration(database: Path) -> list[str]:
    """Finish what an interrupted schema migration left, before MLflow migrates again.

    On SQLite, Alembic changes a table by copying it to `_alembic_tmp_<table>`, dropping the
    original and renaming the copy. A migration killed between the copy and the drop, or
    two run at once (older mlpaint, or MLflow without its own lock), leaves the copy beside
    an intact original, and every later open fails with `table _alembic_tmp_<table> already
    exists`. Such a copy holds nothing the original lacks: it is dropped, after a backup of
    the database beside it, and the migration then runs again. A copy whose original is gone
    is not guessed at: the error names the command that finishes it. Returns the tables
    repaired."""
    if not database.is_file():
        return []
    with contextlib.closing(sqlite3.connect(database)) as connection:
        tables = {row[0] for row in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        leftovers = sorted(t for t in tables if t.startswith(_ALEMBIC_TMP_PREFIX))
        if not leftovers:
            return []
        orphans = [t for t in leftovers if t.removeprefix(_ALEMBIC_TMP_PREFIX) not in tables]
        if orphans:
            commands = "; ".join(f"ALTER TABLE {t} RENAME TO "
                                 f"{t.removeprefix(_ALEMBIC_TMP_PREFIX)}" for t in orphans)
            raise TrackingStoreError(
                f"{database}: an interrupted MLflow migration left {', '.join(orphans)} "
                f"without its original table. Back the file up, then run "
                f"`sqlite3 {database} '{commands}'` and "
                f"`mlflow db upgrade {SQLITE_PREFIX}{database}`")
        backup = database.with_name(f"{database.name}.before-repair-{int(time.time())}")
        with contextlib.closing(sqlite3.connect(backup)) as copy:
            connection.backup(copy)
        for table in leftovers:
            connection.execute(f'DROP TABLE "{table}"')
        connection.commit()
    logger.warning("%s: dropped %s, left by an interrupted MLflow schema migration (backup "
                   "at %s); the migration runs again", database, ", ".join(leftovers), backup)
    return leftovers


def ensure_experiment(client, name: str, tracking_uri: str) -> str:
    """The experiment's id, creating it if needed. For the local SQLite store its artifacts go
    to `.mlpaint/artifacts`, not to an `mlruns/` folder wherever the command happened to run."""
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        if existing.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            client.set_experiment_tag(existing.experiment_id, EXPERIMENT_KIND_TAG,
                                      EXPERIMENT_KIND)
        return existing.experiment_id
    artifact_location = (_sqlite_artifact_root(tracking_uri)
                         if tracking_uri.startswith(SQLITE_PREFIX) else None)
    return client.create_experiment(name, artifact_location=artifact_location,
                                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
