"""Prefect artifacts that show pictures."""

from __future__ import annotations

import base64
from pathlib import Path

from prefect.artifacts import create_image_artifact


def create_png_artifact(png: Path, key: str, description: str) -> None:
    """Show a PNG on the run's Artifacts tab. The UI puts an image artifact's URL in an
    `<img>`, so the picture travels inside it as a data URI: nothing has to serve it, and it
    stays readable as long as the run's record does. (The sample grids are about 50 KB.)"""
    encoded = base64.b64encode(png.read_bytes()).decode("ascii")
    create_image_artifact(image_url=f"data:image/png;base64,{encoded}", key=key,
                          description=description)
