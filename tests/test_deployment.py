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
    assert sorted(pins) == ["torch==2.14.1", "torchvision==0.29.1"]
    for pin in pins:
        assert pin in dockerfile
    for package in ("app", "core", "models_store", "tasks", "worker"):
        assert f"COPY {package} ./{package}" in dockerfile
