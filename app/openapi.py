"""The OpenAPI document, completed with what holds for every operation (middleware answers that
no route declares), so that every status an operation can return is in it, with its body."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from app.protocol import MAX_URL_BYTES
from app.schemas import ERROR_EXAMPLES, PredictForm

ERROR_REF = "#/components/schemas/ErrorPublic"
VALIDATION_REF = "#/components/schemas/HTTPValidationError"
BODY_METHODS = {"post", "put", "patch"}
# Multipart bodies whose form needs one of these fields (declared as anyOf-required).
# (`alias` goes with `task`, so it is not one of them.)
ONE_OF_FIELDS: dict[str, tuple[str, ...]] = {"/predict": ("task", "model_id", "dataset")}
# Pairs of multipart fields that exclude each other (a 422 when sent together).
EXCLUSIVE_FIELDS: dict[str, list[tuple[str, str]]] = {
    "/predict": [("model_id", "alias"), ("task", "dataset")]
}
# Forms that routes read with app.forms.read_form (one model, not FastAPI Form() parameters):
# their schemas join the document's components (the routes refer to them with multipart_body), and
# they refuse unknown fields (a typo such as `topk` is a 422, not ignored).
FORM_MODELS: tuple[type[BaseModel], ...] = (PredictForm,)
FORM_MODEL_NAMES = frozenset(model.__name__ for model in FORM_MODELS)
# The documentation's sections, in this order (Swagger UI and ReDoc follow it), whatever the order
# in which the routers were included (app/api/main.py puts the hot path first).
TAGS: list[dict[str, str]] = [
    {"name": "health", "description": "Probes: is the API up, can it reach Redis and the model store."},
    {"name": "jobs", "description": "Training jobs: submit, follow (progress, curves, live events), cancel."},
    {"name": "models", "description": "Trained checkpoints: list, inspect, alias (pin), export, delete."},
    {"name": "predict", "description": "Classify an uploaded image with a trained checkpoint."},
    {"name": "datasets", "description": "Your own photos: upload a zip of class folders, inspect, delete."},
]


def multipart_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` of a route that reads its form with ``app.forms.read_form``: ``model`` as
    its required multipart/form-data body (``FORM_MODELS`` lists the models)."""
    ref = f"#/components/schemas/{model.__name__}"
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {"$ref": ref}}}}}


def _add_form_models(components: dict[str, Any]) -> None:
    for model in FORM_MODELS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema


def _error(description: str, status_code: int) -> dict[str, Any]:
    return {
        "description": description,
        "content": {
            "application/json": {
                "schema": {"$ref": ERROR_REF},
                "example": {"detail": ERROR_EXAMPLES[status_code]},
            }
        },
    }


def _fix_422(response: dict[str, Any]) -> None:
    """A 422 is FastAPI's list of field errors (request validation); a route that also raises its
    own 422 with a sentence (``ErrorPublic``) documents both shapes."""
    content = response.setdefault("content", {}).setdefault("application/json", {})
    schema = content.get("schema", {})
    if schema.get("$ref") == ERROR_REF:
        content["schema"] = {"anyOf": [{"$ref": VALIDATION_REF}, {"$ref": ERROR_REF}]}
        content.pop("example", None)
        content["examples"] = {
            "fields": {
                "summary": "A field is invalid (FastAPI's list of errors)",
                "value": {
                    "detail": [
                        {
                            "type": "less_than_equal",
                            "loc": ["body", "top_k"],
                            "msg": "Input should be less than or equal to 100",
                            "input": 101,
                            "ctx": {"le": 100},
                        }
                    ]
                },
            },
            "sentence": {
                "summary": "The request as a whole is invalid",
                "value": {"detail": ERROR_EXAMPLES[422]},
            },
        }
    elif not schema:
        content["schema"] = {"$ref": VALIDATION_REF}


def _no_nulls_in_form(form: dict[str, Any]) -> None:
    """A multipart field cannot be null (it is text or absent): ``anyOf [X, null]`` becomes X, and
    a null default goes (absent is the default)."""
    for name, prop in form.get("properties", {}).items():
        if "default" in prop and prop["default"] is None:
            del prop["default"]
        variants = prop.get("anyOf", [])
        others = [v for v in variants if v != {"type": "null"}]
        if len(others) == 1 and len(variants) == 2:
            rest = {k: v for k, v in prop.items() if k != "anyOf"}
            form["properties"][name] = {**others[0], **rest}


def _no_null_headers(operation: dict[str, Any]) -> None:
    """A header is text or absent, never null: an optional header's ``anyOf [X, null]`` becomes X
    (a client reading the spec would otherwise send the text "null")."""
    for parameter in operation.get("parameters", []):
        schema = parameter.get("schema", {})
        variants = schema.get("anyOf", [])
        others = [v for v in variants if v != {"type": "null"}]
        if parameter.get("in") == "header" and len(others) == 1 and len(variants) == 2:
            rest = {k: v for k, v in schema.items() if k != "anyOf"}
            parameter["schema"] = {**others[0], **rest}


def _empty_means_absent(form: dict[str, Any]) -> None:
    """An optional text field sent empty counts as absent (FastAPI's rule for forms), so its
    pattern admits the empty string. Its example is empty too: Swagger UI would otherwise fill it
    with a random string matching the pattern (an invented model id, alias or dataset id), and
    "Try it out" would fail with 404. Swagger UI sends its empty fields."""
    required = set(form.get("required", []))
    for name, prop in form.get("properties", {}).items():
        if name in required or "pattern" not in prop:
            continue
        prop["pattern"] = "^$|" + prop["pattern"]
        prop.pop("minLength", None)
        if "example" not in prop and "examples" not in prop:
            prop["example"] = ""


def _order_paths_by_tag(schema: dict[str, Any]) -> None:
    """List the paths in the order of ``TAGS`` (stable: within a tag, as the routes were added)."""
    rank = {tag["name"]: i for i, tag in enumerate(TAGS)}

    def first_tag(operations: dict[str, Any]) -> int:
        tags = [t for op in operations.values() if isinstance(op, dict) for t in op.get("tags", [])]
        return rank.get(tags[0], len(rank)) if tags else len(rank)

    schema["paths"] = dict(sorted(schema.get("paths", {}).items(), key=lambda item: first_tag(item[1])))


def complete_openapi(schema: dict[str, Any], auth: bool = True) -> dict[str, Any]:
    """Add the statuses that middleware answers (414 everywhere; 413 and 415 for request bodies),
    give every 422 its real shape, and declare the constraints of forms (one of these fields, no
    unknown fields). Without ``auth`` (the server has no API_KEYS) no operation needs a key, so
    the document drops its security requirements and 401s."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    _order_paths_by_tag(schema)
    _add_form_models(components)
    if not auth:
        schema["components"].pop("securitySchemes", None)
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            _no_null_headers(operation)
            if not auth:
                operation.pop("security", None)
                responses.pop("401", None)
            responses.setdefault(
                "414", _error(f"The URL (path and query) is over {MAX_URL_BYTES} bytes.", 414)
            )
            if method in BODY_METHODS:
                responses.setdefault("413", _error("The request body is over the limit.", 413))
                responses.setdefault(
                    "415", _error("Content-Encoding other than identity: compressed bodies are refused.", 415)
                )
            if "422" in responses:
                _fix_422(responses["422"])
            fields = ONE_OF_FIELDS.get(path)
            body = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data", {})
            ref = body.get("schema", {}).get("$ref", "")
            if not ref:
                continue
            name = ref.rsplit("/", 1)[-1]
            form = components[name]
            _no_nulls_in_form(form)
            if name in FORM_MODEL_NAMES:
                form["additionalProperties"] = False
                _empty_means_absent(form)
            if fields:
                present = [f for f in fields if f in form.get("properties", {})]
                # an empty field counts as absent, so "given" means non-empty
                form["anyOf"] = [
                    {"required": [f], "properties": {f: {"type": "string", "minLength": 1}}} for f in present
                ]
                form["description"] = f"The image, and at least one of: {', '.join(present)}."
            pairs = EXCLUSIVE_FIELDS.get(path)
            if pairs:
                form["not"] = {
                    "anyOf": [
                        {"required": list(pair), "properties": {name: {"minLength": 1} for name in pair}}
                        for pair in pairs
                    ]
                }
                rules = "; ".join(f"not both {first} and {second}" for first, second in pairs)
                form["description"] = form.get("description", "") + f" {rules[0].upper()}{rules[1:]}."
    return schema


def install_openapi(app: FastAPI, auth: bool) -> None:
    """Serve ``complete_openapi`` of FastAPI's document at /openapi.json (built once); ``auth``:
    whether the server has API keys."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = complete_openapi(build(), auth)
        return app.openapi_schema

    app.openapi = openapi
