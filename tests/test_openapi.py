"""Swagger UI is a first-class interface: every schema and field of ours is described, with examples."""

from __future__ import annotations

import re

import pytest

from app.main import create_app
from core.config import Settings

FASTAPI_OWN = {"HTTPValidationError", "ValidationError"}
# Fields without an example on purpose: Swagger's "Try it out" pre-fills examples, and an invented
# model id would make the first try a 404 (task's example, mnist_lenet5, is enough).
NO_EXAMPLE = {"Body_predict_image_predict_post.model_id"}


@pytest.fixture(scope="module")
def schema() -> dict:
    return create_app(Settings(_env_file=None, environment="development")).openapi()


def _is_ref(prop: dict) -> bool:
    return (
        "$ref" in prop or "$ref" in prop.get("items", {}) or any("$ref" in x for x in prop.get("anyOf", []))
    )


def test_every_schema_is_described_with_examples(schema):
    problems = []
    for name, component in schema["components"]["schemas"].items():
        if name in FASTAPI_OWN:
            continue
        if not name.startswith("Body_") and not component.get("description"):
            problems.append(f"{name}: no description")
        props = component.get("properties", {})
        has_schema_example = bool(component.get("examples"))
        for prop_name, prop in props.items():
            if not prop.get("description") and not _is_ref(prop):
                problems.append(f"{name}.{prop_name}: no description")
            is_file = prop.get("format") == "binary" or "contentMediaType" in prop
            if f"{name}.{prop_name}" in NO_EXAMPLE:
                continue
            if not has_schema_example and not _is_ref(prop) and "examples" not in prop and not is_file:
                problems.append(f"{name}.{prop_name}: no example")
    assert not problems, "\n".join(problems)


def test_job_submission_has_named_examples(schema):
    examples = schema["paths"]["/jobs"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    assert {e["value"]["task"] for e in examples.values()} == {
        "mnist_lenet5",
        "cifar10_dense",
        "hymenoptera_resnet18",
    }


def test_docs_pages_work_offline():
    """/docs and /redoc load their JavaScript from this server, not a CDN, and Swagger UI is v5
    (v4 cannot render the OpenAPI 3.1 document FastAPI produces)."""
    from fastapi.testclient import TestClient

    app = create_app(Settings(_env_file=None, environment="development"))
    client = TestClient(app)  # no `with`: the lifespan (Redis) is not needed for static pages
    for page in ("/docs", "/redoc"):
        html = client.get(page)
        assert html.status_code == 200, page
        scripts = re.findall(r'src="([^"]+)"', html.text)
        assert scripts and all(src.startswith("/static-docs/") for src in scripts), scripts
        assert "cdn." not in html.text
        for src in scripts:
            assert client.get(src).status_code == 200, src
    bundle = client.get("/static-docs/swagger-ui-bundle.js").text
    assert re.search(r'"5\.\d+\.\d+"', bundle)
    assert client.get("/openapi.json").json()["openapi"].startswith("3.1")


def test_protected_operations_document_401(schema):
    open_paths = {"/healthz", "/readyz"}
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            has_401 = "401" in operation["responses"]
            assert has_401 == (path not in open_paths), (method, path)
