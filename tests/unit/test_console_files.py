"""The console's files: served at /ui/ without a key, / redirects there, nothing loads off the host,
and the vendored chart library keeps its licence."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from app.api.routes.ui import UI_DIR
from app.main import create_app
from core.config import Settings


def client(**settings) -> TestClient:
    # No `with`: the lifespan (Redis) is not needed for static files; settings go on app.state by hand.
    settings = Settings(_env_file=None, environment="development", **settings)
    app = create_app(settings)
    app.state.settings = settings
    return TestClient(app)


def test_root_redirects_to_the_console_and_files_need_no_key():
    c = client(api_keys=["k" * 20])
    assert c.get("/", follow_redirects=False).headers["location"] == "/ui/"
    assert c.get("/ui", follow_redirects=False).headers["location"] == "/ui/"
    page = c.get("/ui/")
    assert page.status_code == 200 and "<title>imgclf console</title>" in page.text
    for path in ("/ui/js/main.js", "/ui/app.css", "/ui/vendor/uplot/uPlot.iife.min.js", "/ui/favicon.svg"):
        assert c.get(path).status_code == 200, path
    assert c.get("/ui/config.json").json() == {"auth_required": True}
    assert client().get("/ui/config.json").json() == {"auth_required": False}
    leak = c.get("/ui/..%2Fcore%2Fconfig.py")
    assert leak.status_code == 404 and "Settings" not in leak.text
    assert c.get("/jobs").status_code == 401  # the API itself still needs the key


def test_nothing_is_loaded_from_another_host():
    for path in UI_DIR.rglob("*"):
        if path.suffix not in {".html", ".js", ".css"} or "vendor" in path.parts:
            continue
        text = path.read_text()
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", text), path
        assert not re.search(r"""(fetch|import)\(\s*["'`](https?:)?//""", text), path
        assert not re.search(r"""from\s+["'](https?:)?//""", text), path
        assert "url(http" not in text, path


def test_vendored_chart_library_keeps_its_licence():
    vendor = UI_DIR / "vendor" / "uplot"
    assert "MIT License" in (vendor / "LICENSE").read_text()
    assert (vendor / "uPlot.iife.min.js").stat().st_size > 10_000
    assert '<script src="vendor/uplot/uPlot.iife.min.js">' in (UI_DIR / "index.html").read_text()
