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

from tests.conftest import REPO, free_port, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def checkout(tmp_path):
    """A checkout in tmp_path: scripts copied (they locate the project from their own path), code
    and the installed .venv linked."""
    root = tmp_path / "checkout"
    root.mkdir()
    shutil.copytree(REPO / "scripts", root / "scripts")
    for name in ("app", "worker", "core", "models_store", "tasks", "pyproject.toml", ".venv"):
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


def test_up_starts_a_local_only_stack_restarts_parts_and_down_stops_it(checkout, env, tmp_path):
    del env["DATA_DIR"]  # from .env instead; the environment's MODELS_DIR wins over .env's
    (checkout / ".env").write_text(
        f"data_dir={tmp_path / 'from-dotenv'}\nMODELS_DIR=/nonexistent\nROOT=/elsewhere\nMY-VAR=1\n"
    )
    metrics = checkout / "var" / "prometheus"  # PROMETHEUS_MULTIPROC_DIR: emptied at start
    metrics.mkdir(parents=True)
    (metrics / "counter_999999.db").write_bytes(b"an earlier run's")
    up = run_script(checkout, env, "up.sh")
    assert up.returncode == 0, up.stderr + up.stdout
    assert f"data: {tmp_path / 'from-dotenv'}" in up.stdout and f"models: {env['MODELS_DIR']}" in up.stdout
    assert not (metrics / "counter_999999.db").exists()
    url = f"http://127.0.0.1:{env['PORT']}"
    [first_worker] = [w["name"] for w in httpx.get(f"{url}/readyz").json()["workers"]]
    wait_for(lambda: list(metrics.glob("*.db")), timeout=10, what="this run's metric files")
    api_pid = (checkout / "var" / "run" / "api.pid").read_text()
    api = psutil.Process(int(api_pid))  # app.serve: its processes listen (SO_REUSEPORT)
    listening = {
        c.laddr.ip
        for process in [api, *api.children(recursive=True)]
        for c in process.net_connections("tcp")
        if c.status == "LISTEN"
    }
    assert listening == {"127.0.0.1"}  # no API keys: not reachable from other machines
    worker = run_script(checkout, env, "up.sh", "worker")
    assert worker.returncode == 0 and "worker up" in worker.stdout, worker.stderr
    assert (checkout / "var" / "run" / "api.pid").read_text() == api_pid  # the API kept running
    listed = [w["name"] for w in httpx.get(f"{url}/readyz").json()["workers"]]
    assert len(listed) == 1 and listed[0] != first_worker  # each start has a node name of its own
    down = run_script(checkout, env, "down.sh")
    assert down.returncode == 0 and "stopped api" in down.stdout and "stopped worker" in down.stdout
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/healthz", timeout=2)
    assert list((checkout / "var" / "run").iterdir()) == []  # no stale pid or port files
    assert list(metrics.glob("*.db")) == []  # nor metric files


def test_up_refuses_a_port_another_process_holds(checkout, env):
    with socket.socket() as other:
        other.bind(("127.0.0.1", int(env["PORT"])))
        other.listen()
        up = run_script(checkout, env, "up.sh", "api")
    assert up.returncode == 1
    assert f"port {env['PORT']} on 127.0.0.1 is already in use" in up.stderr
    assert not (checkout / "var" / "run" / "api.pid").exists()


def test_a_refused_start_leaves_the_running_stack_alone(checkout, env):
    up = run_script(checkout, env, "up.sh", "api")
    assert up.returncode == 0 and "API up" in up.stdout, up.stderr
    api_pid = int((checkout / "var" / "run" / "api.pid").read_text())
    with socket.socket() as other:
        other.bind(("127.0.0.1", free_port()))
        other.listen()
        taken = {**env, "PORT": str(other.getsockname()[1])}
        refused = run_script(checkout, taken, "up.sh", "api")
    assert refused.returncode == 1 and "already in use" in refused.stderr
    assert (
        psutil.pid_exists(api_pid) and httpx.get(f"http://127.0.0.1:{env['PORT']}/healthz").status_code == 200
    )


def test_down_never_kills_a_stranger_with_a_recycled_pid(checkout, env):
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        (checkout / "var" / "run").mkdir(parents=True)
        (checkout / "var" / "run" / "api.pid").write_text(str(stranger.pid))
        down = run_script(checkout, env, "down.sh", "api")
        assert down.returncode == 0 and "stopped" not in down.stdout
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_up_warns_when_the_resnet18_weights_need_an_impossible_download(checkout, env, tmp_path):
    warned = {**env, "RESNET18_WEIGHTS": "IMAGENET1K_V1", "TORCH_HOME": str(tmp_path / "empty-torch-home")}
    warned.pop("ALLOW_DOWNLOAD", None)
    up = run_script(checkout, warned, "up.sh", "api")
    assert up.returncode == 0, up.stderr
    assert "RESNET18_WEIGHTS=IMAGENET1K_V1 needs" in up.stderr and "ALLOW_DOWNLOAD is off" in up.stderr
    hub = tmp_path / "torch-home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "resnet18-f37072fd.pth").write_bytes(b"cached")
    quiet = run_script(checkout, {**warned, "TORCH_HOME": str(tmp_path / "torch-home")}, "up.sh", "api")
    assert quiet.returncode == 0 and "RESNET18_WEIGHTS" not in quiet.stderr, quiet.stderr
    # ALLOW_DOWNLOAD as the service reads it (pydantic's booleans): on in any of its spellings
    for value, warns in (("1", False), ("On", False), ("no", True)):
        up = run_script(checkout, {**warned, "ALLOW_DOWNLOAD": value}, "up.sh", "api")
        assert up.returncode == 0, up.stderr
        assert ("ALLOW_DOWNLOAD is off" in up.stderr) is warns, (value, up.stderr)
