"""Swagger UI is a first-class interface: every schema and field of ours is described, with examples."""

from __future__ import annotations

import re

import pytest

from app.main import create_app
from core.config import Settings

FASTAPI_OWN = {"HTTPValidationError", "ValidationError"}
# Fields without an example on purpose: Swagger's "Try it out" pre-fills examples, and an invented
# model id would make the first try a 404 (task's example, mnist_lenet5, is enough).
# Swagger pre-fills examples: an invented model id or alias would turn "Try it out" into a 404.
NO_EXAMPLE = {
    "PredictForm.model_id",
    "PredictForm.alias",
    "PredictForm.dataset",
}


@pytest.fixture(scope="module")
def schema() -> dict:
    """The document of a server with API keys (the production setting)."""
    return create_app(Settings(_env_file=None, environment="production", api_keys=["k" * 24])).openapi()


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
            assert ("security" in operation) == (path not in open_paths), (method, path)


def test_without_keys_no_operation_claims_to_need_one():
    """A server without API_KEYS never answers 401: its document says so (no Authorize button)."""
    schema = create_app(Settings(_env_file=None, environment="development")).openapi()
    assert "securitySchemes" not in schema["components"]
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            assert "security" not in operation and "401" not in operation["responses"], (method, path)


def _operations(schema):
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            yield path, method, operation


def test_every_error_status_has_an_example_of_its_own(schema):
    """No 413 or 422 that reads like a 404: each status's example body fits that status."""
    for path, method, operation in _operations(schema):
        for status, response in operation["responses"].items():
            if not status.startswith(("4", "5")):
                continue
            content = response["content"]["application/json"]
            examples = [content["example"]] if "example" in content else []
            examples += [e["value"] for e in content.get("examples", {}).values()]
            if content["schema"] == {"$ref": "#/components/schemas/ErrorPublic"}:
                assert examples, (method, path, status)  # else Swagger shows ErrorPublic's generic one
            for example in examples:
                if status != "404":
                    assert "no job with id" not in str(example), (method, path, status)
    predict = schema["paths"]["/predict"]["post"]["responses"]
    assert "MAX_UPLOAD_BYTES" in predict["413"]["content"]["application/json"]["example"]["detail"]
    assert "Content-Encoding" in predict["415"]["description"]


def test_every_status_the_middleware_answers_is_documented(schema):
    for path, method, operation in _operations(schema):
        responses = operation["responses"]
        assert "414" in responses, (method, path)
        if method == "post" and "requestBody" in operation:
            assert {"413", "415"} <= set(responses), (method, path)
    assert "400" in schema["paths"]["/jobs"]["post"]["responses"]  # body not decodable as JSON


def test_422_bodies_are_documented_as_sent(schema):
    """FastAPI's list of field errors everywhere; /predict, POST /datasets and POST /jobs also send a
    sentence, documented as such."""
    validation = {"$ref": "#/components/schemas/HTTPValidationError"}
    for path, method, operation in _operations(schema):
        if "422" not in operation["responses"]:
            continue
        got = operation["responses"]["422"]["content"]["application/json"]["schema"]
        if path in ("/predict", "/datasets", "/jobs") and method == "post":  # sentences too
            assert got == {"anyOf": [validation, {"$ref": "#/components/schemas/ErrorPublic"}]}
        else:
            assert got == validation, (method, path)
    assert "422" in schema["paths"]["/models/{model_id}"]["get"]["responses"]


def test_constraints_and_headers_are_declared(schema):
    model_id = schema["paths"]["/models/{model_id}"]["get"]["parameters"][0]["schema"]
    assert model_id["pattern"] == "^[a-z0-9][a-z0-9_-]{0,127}$" and model_id["maxLength"] == 128
    job_id = schema["paths"]["/jobs/{job_id}"]["get"]["parameters"][0]["schema"]
    assert job_id["pattern"] == "^[0-9a-f]{32}$"
    body_ref = schema["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    form = schema["components"]["schemas"][body_ref["$ref"].rsplit("/", 1)[-1]]
    assert [one["required"] for one in form["anyOf"]] == [["task"], ["model_id"], ["dataset"]]
    created = schema["paths"]["/jobs"]["post"]["responses"]["202"]["headers"]
    assert {"Location", "Idempotent-Replayed"} <= set(created)
    for path, method, operation in _operations(schema):
        responses = operation["responses"]
        if "401" in responses:
            assert "WWW-Authenticate" in responses["401"]["headers"], (method, path)
        if "503" in responses and path != "/readyz":
            assert "Retry-After" in responses["503"]["headers"], (method, path)


def test_swagger_prefills_only_values_that_work(schema):
    """Try it out pre-fills examples (else defaults): no invented model id, and top_k's example
    is its default, the default the README states."""
    body_ref = schema["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    props = schema["components"]["schemas"][body_ref["$ref"].rsplit("/", 1)[-1]]["properties"]
    assert "examples" not in props["model_id"] and "default" not in props["model_id"]
    for name in ("model_id", "alias", "dataset"):  # Swagger UI would invent a value from the pattern
        assert props[name]["example"] == "" and props[name]["pattern"].startswith("^$|"), name
        assert re.fullmatch(props[name]["pattern"].removeprefix("^$|").rstrip("$").lstrip("^"), "") is None
    assert props["task"]["examples"] == ["mnist_lenet5"]
    assert props["top_k"]["default"] == props["top_k"]["examples"][0] == 5
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "`top_k` (1–100, default 5)" in readme


def test_predict_form_fields_are_text_or_absent_and_unknown_ones_refused(schema):
    """Multipart fields cannot be null (the form has no null); unknown fields get a 422."""
    body_ref = schema["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    form = schema["components"]["schemas"][body_ref["$ref"].rsplit("/", 1)[-1]]
    assert form["additionalProperties"] is False
    for name, prop in form["properties"].items():
        assert {"type": "null"} not in prop.get("anyOf", []), name
    # models of uploaded datasets (custom_resnet18) are chosen by dataset, not by task
    assert form["properties"]["task"]["enum"] == ["cifar10_dense", "mnist_lenet5", "hymenoptera_resnet18"]
    assert form["not"]["anyOf"] == [
        {"required": [a, b], "properties": {a: {"minLength": 1}, b: {"minLength": 1}}}
        for a, b in (("model_id", "alias"), ("task", "dataset"))
    ]
