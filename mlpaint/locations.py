"""Where mlpaint keeps things by default, in one place.

Everything lives under `.mlpaint/` in the working directory unless a setting says otherwise,
so `make run` on a fresh clone needs no configuration and leaves nothing elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

from mlpaint.storage import sibling_uri

LOCAL_STORE_DIR = ".mlpaint"
BUNDLE_DIR_ENV = "MLPAINT_BUNDLE_DIR"
FEEDBACK_STORE_ENV = "MLPAINT_FEEDBACK_STORE"
FEEDBACK_OFF = "off"


def default_bundle_destination() -> str:
    """`$MLPAINT_BUNDLE_DIR`, else `.mlpaint/bundles` under the working directory."""
    return os.environ.get(BUNDLE_DIR_ENV) or str(Path.cwd() / LOCAL_STORE_DIR / "bundles")


def default_feedback_store(bundle_uri: str | None = None) -> str:
    """`$MLPAINT_FEEDBACK_STORE`, else a `feedback` folder (or prefix) beside the bundle
    destination a server follows; for a registry URI (`models:/…`) or none, beside the
    default bundle destination."""
    if os.environ.get(FEEDBACK_STORE_ENV):
        return os.environ[FEEDBACK_STORE_ENV]
    if bundle_uri is None or bundle_uri.startswith("models:/"):
        bundle_uri = default_bundle_destination()
    return sibling_uri(bundle_uri, "feedback")


def feedback_store_option(value: str | None, bundle_uri: str | None = None) -> str | None:
    """A `--feedback-store` value as a location, or None for `off`."""
    if value is not None and value.strip().lower() == FEEDBACK_OFF:
        return None
    return value or default_feedback_store(bundle_uri)
