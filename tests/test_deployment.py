"""docker-compose.yml and Dockerfile.gpu (Docker cannot run here, so their content is checked)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_services_and_dependencies(compose):
    services = compose["services"]
    assert set(services) == {"redis", "api", "worker"}
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        assert services[name]["build"]["dockerfile"] == "Dockerfile.gpu"
    assert "8000" in services["api"]["ports"][0]
    assert services["worker"]["command"][:4] == ["celery", "-A", "worker.celery_app", "worker"]


def test_worker_reserves_the_gpu(compose):
    (device,) = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["count"] >= 1
    assert compose["services"]["worker"]["environment"]["DEVICE"] == "cuda"


def test_redis_is_append_only_and_persisted(compose):
    redis = compose["services"]["redis"]
    assert (
        "--appendonly" in redis["command"]
        and redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    )
    assert "redis-data:/data" in redis["volumes"]


def test_named_volumes_for_models_data_and_torch_cache(compose):
    assert {"models", "data", "cache", "torch-cache", "redis-data"} <= set(compose["volumes"])
    worker_mounts = dict(v.split(":") for v in compose["services"]["worker"]["volumes"])
    assert worker_mounts == {
        "models": "/models",
        "data": "/data",
        "cache": "/cache",
        "torch-cache": "/torch-cache",
    }
    assert "models:/models" in compose["services"]["api"]["volumes"]
    env = compose["services"]["worker"]["environment"]
    assert (
        env["MODELS_DIR"] == "/models" and env["DATA_DIR"] == "/data" and env["TORCH_HOME"] == "/torch-cache"
    )


def test_every_service_has_a_healthcheck(compose):
    for name, service in compose["services"].items():
        check = service["healthcheck"]
        assert check["test"][0] in ("CMD", "CMD-SHELL") and check["interval"], name
    assert "/healthz" in " ".join(compose["services"]["api"]["healthcheck"]["test"])


def test_api_keys_are_required(compose):
    text = (REPO / "docker-compose.yml").read_text()
    assert re.search(r"API_KEYS: \$\{API_KEYS:\?[^}]+\}", text)
    assert compose["services"]["api"]["environment"]["API_KEYS"].startswith("${API_KEYS:?")


def test_dockerfile_pins_the_same_torch_as_pyproject():
    pins = [
        d
        for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
        if d.startswith("torch")
    ]
    dockerfile = (REPO / "Dockerfile.gpu").read_text()
    assert {pin.split("==")[0] for pin in pins} == {"torch", "torchvision"}
    for pin in pins:
        assert re.search(rf"pip install .*\s{re.escape(pin)}(\s|$)", dockerfile, re.MULTILINE), pin
    for package in ("app", "core", "models_store", "tasks", "worker"):
        assert f"COPY {package} ./{package}" in dockerfile


def _dockerfile_env() -> dict[str, str]:
    """The variables the Dockerfile's ENV instructions set (``NAME=value`` forms)."""
    text = (REPO / "Dockerfile.gpu").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(item.split("=", 1) for item in line[4:].split())
    return env


def test_api_processes_share_their_http_metrics(compose):
    """Several API processes (WEB_CONCURRENCY) in the image: without PROMETHEUS_MULTIPROC_DIR each
    process counted only the requests it answered, and /metrics depended on which one answered."""
    folder = _dockerfile_env()["PROMETHEUS_MULTIPROC_DIR"]
    assert folder.startswith("/tmp/")  # writable by the image's unprivileged user
    assert "PROMETHEUS_MULTIPROC_DIR" not in compose["services"]["api"]["environment"]
    dockerfile = (REPO / "Dockerfile.gpu").read_text()
    assert 'CMD ["python", "-m", "app.serve"' in dockerfile  # which empties the folder at start
    assert "command" not in compose["services"]["api"]


def test_app_serve_creates_and_empties_the_metrics_folder(tmp_path, monkeypatch):
    from app.serve import prepare_metrics_dir

    folder = tmp_path / "prometheus" / "nested"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))
    prepare_metrics_dir()
    assert folder.is_dir()
    (folder / "counter_12345.db").write_bytes(b"an earlier run's")
    (folder / "notes.txt").write_text("not a metric file")
    prepare_metrics_dir()
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    prepare_metrics_dir()  # unset: nothing to do


def test_dockerignore_keeps_the_venv_and_runtime_state_out():
    patterns = {
        line.strip().rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", "var", ".env", ".git"} <= patterns
    assert not any(p.startswith("!") for p in patterns)  # nothing of those let back in


def test_torch_index_url_chooses_the_cuda_build(compose):
    dockerfile = (REPO / "Dockerfile.gpu").read_text()
    assert re.search(r"^ARG TORCH_INDEX_URL=", dockerfile, re.MULTILINE)
    (install,) = [line for line in dockerfile.splitlines() if re.match(r"RUN pip install .*torch==", line)]
    assert '${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}' in install
    assert dockerfile.index("ARG TORCH_INDEX_URL") < dockerfile.index(install)
    for name in ("api", "worker"):
        assert compose["services"][name]["build"]["args"]["TORCH_INDEX_URL"] == "${TORCH_INDEX_URL:-}"


def test_worker_healthcheck_asks_redis_for_its_registration(compose):
    check = compose["services"]["worker"]["healthcheck"]
    assert check["test"][0] == "CMD-SHELL"
    assert check["test"][1].split()[:3] == ["python", "-m", "worker.healthcheck"]
    # the node name the worker's command gives itself ($$ is compose's escape for $)
    command = compose["services"]["worker"]["command"]
    node = command[command.index("-n") + 1]
    assert check["test"][1].split()[3] == node.replace("%h", "$$HOSTNAME")
