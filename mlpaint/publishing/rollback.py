"""Rollback: LATEST (and the registry's champion alias) moved back to a bundle already
published, under the publish lock, with nothing rebuilt."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from mlpaint.publishing.bundle import (
    BUNDLE_ROOT_TAG,
    HISTORY,
    LATEST,
    MANIFEST,
    PUBLISH_LOCK,
    VERSIONS,
    BundleInfo,
    HistoryEntry,
    LatestChange,
    latest_history,
    read_latest,
    record_latest_move,
)
from mlpaint.storage.stores import ObjectStore, store_for
from mlpaint.tracking.publication import CHAMPION

logger = logging.getLogger(__name__)


class RollbackError(ValueError):
    """A rollback that cannot be done as asked; the message says what to do instead."""


@dataclass(frozen=True)
class RollbackResult:
    destination: str
    entry: HistoryEntry
    champion_alias: str | None  # the model version `champion` names now; None: not moved

    def to_json(self) -> dict:
        return {"destination": self.destination, **self.entry.to_json(),
                "champion_alias": self.champion_alias}


def _previous_latest(store: ObjectStore, current: str | None) -> str:
    """The bundle LATEST named before the current one became LATEST, from the history."""
    made_current = [e for e in latest_history(store) if e.bundle_version == current]
    if not made_current or not made_current[-1].previous:
        raise RollbackError(f"{store.describe(HISTORY)}: no bundle before {current} is "
                            "recorded; name one with --bundle-version")
    return made_current[-1].previous


def rollback(destination: str, *, bundle_version: str | None, reason: str, by: str,
             tracking_client=None) -> RollbackResult:
    """Point LATEST back at `bundle_version` (default: the one it named before the current
    one), record why in the history, and, where `tracking_client` is given and the registry's
    model version was published to this destination, move its `champion` alias to that
    bundle's model version: all under the destination's publish lock, so no publisher moves
    either in between. Nothing is built or uploaded; a server following LATEST swaps to it."""
    store = store_for(destination)
    with store.lock(PUBLISH_LOCK):
        current = read_latest(store)
        target = bundle_version or _previous_latest(store, current)
        if target == current:
            raise RollbackError(f"{store.describe(LATEST)} already names {target}")
        info_bytes = store.get_bytes(f"{VERSIONS}/{target}/bundle.json")
        if info_bytes is None or store.get_bytes(f"{VERSIONS}/{target}/{MANIFEST}") is None:
            kept = ", ".join(store.list_folders(VERSIONS)) or "none"
            raise RollbackError(f"{store.describe(VERSIONS)}: no whole bundle {target} is kept "
                                f"here (kept: {kept})")
        info = BundleInfo(**json.loads(info_bytes))
        store.put_bytes(LATEST, (target + "\n").encode())
        entry = record_latest_move(store, target, current, LatestChange(
            "rollback", reason or f"rolled back from {current}", by=by,
            model_version=info.model_version))
        alias = (_move_champion_alias(tracking_client, info, store)
                 if tracking_client is not None else None)
    logger.info("%s: LATEST %s -> %s (rollback)", store.describe(), current, target)
    return RollbackResult(store.describe(), entry, alias)


def _move_champion_alias(client, info: BundleInfo, store: ObjectStore) -> str | None:
    """Give `champion` to the model version this bundle was made from, if the registry
    records its bundle at this destination (a staging destination leaves it alone)."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version(info.model_name, info.model_version)
    except MlflowException as exc:
        logger.warning("the registry has no %s version %s (%s): alias not moved",
                       info.model_name, info.model_version, exc)
        return None
    root = version.tags.get(BUNDLE_ROOT_TAG)
    if root is None or store_for(root).describe() != store.describe():
        return None
    client.set_registered_model_alias(info.model_name, CHAMPION, info.model_version)
    return info.model_version
