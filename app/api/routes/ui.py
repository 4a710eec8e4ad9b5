"""The web console: static files under /ui/ (no API key needed to load them; the API calls they make
carry the key), `/` redirecting there, and /ui/config.json telling the page whether to ask for a key."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from app.api.deps import SettingsDep

UI_DIR = Path(__file__).resolve().parents[2] / "ui" / "static"

router = APIRouter(include_in_schema=False)


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui")
def ui_without_slash() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui/config.json")
def ui_config(settings: SettingsDep) -> dict[str, bool]:
    """Whether the API wants a bearer key (so the page shows its key box before a call fails)."""
    return {"auth_required": bool(settings.api_keys)}


def is_ui_path(path: str) -> bool:
    """``/``, ``/ui`` and everything under ``/ui/``: open without an API key."""
    return path in ("/", "/ui") or path.startswith("/ui/")


def mount_ui(app: FastAPI) -> None:
    """Serve the console's files at /ui/ (index.html for /ui/). Call after the API routers."""
    app.mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="ui")
