"""scripts/up.sh and scripts/down.sh, run for real from a copy of the checkout (so that a stack the
developer runs from this checkout is never touched)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import httpx
import psutil
import pytest

from tests.conftest import REPO, free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def checkout(tmp_path):
    """A checkout in tmp_path: scripts copied (they locate the project from their own path), code
    and the installed .venv linked."""
    root = tmp_path / "checkout"
    root.mkdir()
    shutil.copytree(REPO / "scripts", root / "scripts")
    for name in ("app", "worker", "core", "models_store", "pyproject.toml", ".venv"):
        (root / name).symlink_to(REPO / name)
    yield root
    subprocess.run([root / "scripts" / "down.sh", "--quiet"], check=False, timeout=60)


def run_script(checkout, env, *args):
    return subprocess.run(
        [checkout / "scripts" / args[0], *args[1:]], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def env(stack):
    """The process environment for the scripts: a private stack's settings (key prefix, queue,
    folders) on a free port, without API keys."""
    environ = {k: v for k, v in os.environ.items() if k != "API_KEYS"}
    return {**environ, **stack.env, "PORT": str(free_port())}


def test_up_starts_a_local_only_stack_restarts_parts_and_down_stops_it(checkout, env):
    up = run_script(checkout, env, "up.sh")
    assert up.returncode == 0, up.stderr + up.stdout
    url = f"http://127.0.0.1:{env['PORT']}"
    assert httpx.get(f"{url}/readyz").json()["workers"]
    api_pid = (checkout / "var" / "run" / "api.pid").read_text()
    listening = {
        c.laddr.ip for c in psutil.Process(int(api_pid)).net_connections("tcp") if c.status == "LISTEN"
    }
    assert listening == {"127.0.0.1"}  # no API keys: not reachable from other machines
    worker = run_script(checkout, env, "up.sh", "worker")
    assert worker.returncode == 0 and "worker up" in worker.stdout, worker.stderr
    assert (checkout / "var" / "run" / "api.pid").read_text() == api_pid  # the API kept running
    down = run_script(checkout, env, "down.sh")
    assert down.returncode == 0 and "stopped api" in down.stdout and "stopped worker" in down.stdout
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/healthz", timeout=2)


def test_up_refuses_a_port_another_process_holds(checkout, env):
    with socket.socket() as other:
        other.bind(("127.0.0.1", int(env["PORT"])))
        other.listen()
        up = run_script(checkout, env, "up.sh", "api")
    assert up.returncode == 1
    assert f"port {env['PORT']} on 127.0.0.1 is already in use" in up.stderr
    assert not (checkout / "var" / "run" / "api.pid").exists()
