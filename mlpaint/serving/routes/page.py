"""The drawing page; its script and styles are static files (mounted by the app), so the
Content-Security-Policy can forbid inline code."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def page() -> str:
    return resources.files("mlpaint.serving").joinpath("static/index.html").read_text()
