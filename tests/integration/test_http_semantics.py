"""HTTP semantics of every route: HEAD, 405 Allow, 401 before the body, 415 for content codings,
file parts without a filename, 414, Idempotency-Key scope, whole-match ids, 422 echoes."""

from __future__ import annotations

import gzip
import io
import json
import socket
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.protocol import MAX_URL_BYTES
from tests.conftest import api_client
from tests.factories import image_bytes
from tests.factories_models import make_model_checkpoint
from tests.integration.test_api_inputs import record_loads

pytestmark = pytest.mark.integration

KEY = "k" * 24
OTHER_KEY = "other-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
CASES = Path(__file__).resolve().parent.parent / "cases"


def digit_png() -> bytes:
    return image_bytes(Image.fromarray(np.zeros((28, 28), dtype=np.uint8)), "PNG")


def noise_png(side: int) -> bytes:
    """A grey noise PNG of side x side pixels: about side**2 bytes (noise does not compress)."""
    pixels = np.random.default_rng(side).integers(0, 256, (side, side), dtype=np.uint8)
    return image_bytes(Image.fromarray(pixels), "PNG")


def multipart(parts: list[tuple[bytes, bytes]], boundary: bytes = b"b0undary") -> tuple[bytes, str]:
    """A multipart/form-data body from (Content-Disposition parameters, data) pairs, written by
    hand so that a part can lack ``filename`` (as ``curl -F 'file=<img.png'`` sends it)."""
    body = b""
    for disposition, data in parts:
        body += b"--" + boundary + b"\r\nContent-Disposition: form-data; " + disposition + b"\r\n\r\n"
        body += data + b"\r\n"
    body += b"--" + boundary + b"--\r\n"
    return body, f"multipart/form-data; boundary={boundary.decode()}"


def raw_exchange(port: int, head: bytes, body: bytes = b"", timeout: float = 10) -> tuple[int, dict, bytes]:
    """Send ``head`` and ``body`` (possibly less than its Content-Length) on a socket and read one
    response; returns (status, lower-case headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head_bytes, _, rest = data.partition(b"\r\n\r\n")
        lines = head_bytes.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", 0))
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return int(lines[0].split()[1]), headers, rest


# HEAD and 405 ---------------------------------------------------------------------------------


def test_head_answers_every_get_route_like_get_without_body(make_stack):
    stack = make_stack(api_keys=[KEY], environment="production")
    model_id = make_model_checkpoint(stack.settings().models_dir)
    with api_client(stack, **AUTH) as client:
        job_id = client.post("/jobs", json={"task": "mnist_lenet5"}).json()["id"]
        paths = [
            path.replace("{job_id}", job_id).replace("{model_id}", model_id)
            for path, operations in client.app.openapi()["paths"].items()
            if "get" in operations
        ]
        assert len(paths) >= 7
        streams = [p for p in paths if p.endswith("/events")]  # a queued job's stream never ends
        assert streams
        for path in streams:  # HEAD answers at once: the stream's headers, no body
            head = client.head(path)
            assert head.status_code == 200 and head.content == b"", path
            assert head.headers["content-type"].startswith("text/event-stream"), path
        answered = 0
        for path in [p for p in paths if p not in streams] + [
            "/docs",
            "/openapi.json",
            "/static-docs/swagger-ui.css",
        ]:
            get, head = client.get(path), client.head(path)
            # a path with a placeholder left ({name}), or a figure this checkpoint has no data
            # for, answers 404 or 422, the same to HEAD as to GET
            assert get.status_code == head.status_code, (path, get.status_code, head.status_code)
            answered += get.status_code == 200
            assert get.status_code == 200 or "{" in path or path.endswith(".png"), (path, get.status_code)
            assert head.content == b"", path
            assert head.headers["content-type"] == get.headers["content-type"], path
            if path != "/metrics":  # the counters move between the two calls
                assert head.headers["content-length"] == get.headers["content-length"], path
        assert answered >= 10
        assert client.head("/jobs/" + "0" * 32).status_code == 404
        assert client.head("/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_head_through_uvicorn(stack, start_api):
    api = start_api(stack)
    import httpx

    get = httpx.get(f"{api.url}/healthz")
    head = httpx.head(f"{api.url}/healthz")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == get.headers["content-length"]
    assert head.headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/jobs", "GET, HEAD, POST"),
        ("DELETE", "/jobs", "GET, HEAD, POST"),
        ("DELETE", "/jobs/" + "a" * 32, "GET, HEAD"),
        ("GET", "/jobs/" + "a" * 32 + "/cancel", "POST"),
        ("GET", "/predict", "POST"),
        ("HEAD", "/predict", "POST"),
        ("POST", "/models", "GET, HEAD"),
        ("PATCH", "/healthz", "GET, HEAD"),
    ],
)
def test_405_allow_lists_every_method_of_the_path(stack, method, path, allowed):
    with api_client(stack) as client:
        response = client.request(method, path)
        assert response.status_code == 405
        assert response.headers["allow"] == allowed
        if method != "HEAD":
            assert f"{method} is not allowed" in response.json()["detail"]


# Authentication before the body ---------------------------------------------------------------


@pytest.mark.parametrize("authorization", [None, "Bearer " + "x" * 24, "Basic " + KEY, "Bearer"])
def test_without_a_valid_key_broken_bodies_get_401_not_400_or_422(make_stack, authorization):
    stack = make_stack(api_keys=[KEY], environment="production")
    headers = {"Authorization": authorization} if authorization else {}
    with api_client(stack) as client:
        broken = [
            ("/jobs", b"{not json", "application/json"),
            ("/jobs", b'{"task": "\xff"}', "application/json"),
            ("/jobs", b'{"task": "nope"}', "text/plain"),
            ("/jobs", gzip.compress(b'{"task": "mnist_lenet5"}'), "application/json"),
            ("/predict", b"--x\r\nnot multipart", "multipart/form-data; boundary=x"),
            ("/predict", b"", "multipart/form-data"),
            ("/jobs/" + "a" * 32 + "/cancel", b"junk", "application/json"),
        ]
        for path, body, content_type in broken:
            response = client.post(path, content=body, headers={"content-type": content_type, **headers})
            assert response.status_code == 401, (path, body[:20], response.text)
            assert response.headers["www-authenticate"] == "Bearer"
        assert client.get("/no/such/path", headers=headers).status_code == 401
        assert client.get("/jobs", headers=AUTH).status_code == 200


def test_401_before_a_9_mb_upload_is_read(make_stack, start_api):
    """The 401 comes while the client is still sending: the server does not wait for the body."""
    stack = make_stack(api_keys=[KEY], environment="production")
    api = start_api(stack)
    size = 9 * 1024 * 1024
    for authorization in (b"", b"Authorization: Bearer " + b"x" * 24 + b"\r\n"):
        head = (
            b"POST /predict HTTP/1.1\r\nHost: test\r\n"
            + authorization
            + b"Content-Type: multipart/form-data; "
            b"boundary=b0undary\r\nContent-Length: " + str(size).encode() + b"\r\n\r\n"
        )
        start = time.monotonic()
        status, headers, body = raw_exchange(api.port, head, b"x" * 65536, timeout=5)
        assert status == 401 and time.monotonic() - start < 5
        assert headers["www-authenticate"] == "Bearer" and "API key" in json.loads(body)["detail"]


# Content codings ------------------------------------------------------------------------------


def test_gzip_job_body_case_is_415_naming_the_coding(stack):
    """cases/job_body.json.gz: a valid job body, gzip-compressed, with Content-Encoding: gzip."""
    body = (CASES / "job_body.json.gz").read_bytes()
    assert json.loads(gzip.decompress(body))["task"] == "mnist_lenet5"
    with api_client(stack) as client:
        response = client.post(
            "/jobs", content=body, headers={"content-type": "application/json", "content-encoding": "gzip"}
        )
        assert response.status_code == 415, response.text
        assert "gzip" in response.json()["detail"] and response.headers["accept-encoding"] == "identity"
        assert client.get("/jobs").json()["count"] == 0
        plain = gzip.decompress(body)
        ok = client.post(
            "/jobs",
            content=plain,
            headers={"content-type": "application/json", "content-encoding": "identity"},
        )
        assert ok.status_code == 202


@pytest.mark.parametrize(
    ("coding", "compress"),
    [
        ("gzip", gzip.compress),
        ("GZIP", gzip.compress),
        ("x-gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("br", lambda b: b),
        ("zstd", lambda b: b),
        ("identity, gzip", gzip.compress),
    ],
)
def test_any_content_coding_but_identity_is_415_on_every_body_route(lenet_stack, coding, compress):
    stack, _ = lenet_stack
    form, content_type = multipart(
        [(b'name="file"; filename="d.png"', digit_png()), (b'name="task"', b"mnist_lenet5")]
    )
    with api_client(stack) as client:
        loads = record_loads(client.app.state.registry)
        for path, body, media_type in (
            ("/jobs", b'{"task": "mnist_lenet5"}', "application/json"),
            ("/predict", form, content_type),
        ):
            response = client.post(
                path, content=compress(body), headers={"content-type": media_type, "content-encoding": coding}
            )
            assert response.status_code == 415, (path, response.text)
            named = coding.lower().replace("identity, ", "")
            assert f"Content-Encoding {named} is not supported" in response.json()["detail"]
        assert client.get("/jobs").json()["count"] == 0
        assert loads == []
        # A header on a request without a body changes nothing.
        assert client.get("/jobs", headers={"content-encoding": coding}).status_code == 200


@pytest.fixture
def lenet_stack(stack):
    return stack, make_model_checkpoint(stack.settings().models_dir, "mnist_lenet5")


# File parts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "disposition",
    [
        b'name="file"',  # curl -F 'file=<img.png'
        b"name=\"file\"; filename*=UTF-8''d%C3%A9git.png",  # RFC 5987 style only
        b'name="file"; filename="d.png"',  # the usual
    ],
)
def test_file_part_without_filename_is_taken_as_the_file(lenet_stack, disposition):
    stack, model_id = lenet_stack
    for image in (digit_png(), noise_png(1500)):  # 2.2 MB: over Starlette's hidden 1 MB part limit
        body, content_type = multipart([(disposition, image), (b'name="task"', b"mnist_lenet5")])
        with api_client(stack) as client:
            response = client.post("/predict", content=body, headers={"content-type": content_type})
            assert response.status_code == 200, response.text[:300]
            assert response.json()["model_id"] == model_id
            assert response.json()["image"]["width"] == Image.open(io.BytesIO(image)).width


def test_error_bodies_never_echo_the_upload(lenet_stack):
    """942 KB sent where the server expects a short text field: the 4xx is short."""
    stack, _ = lenet_stack
    upload = noise_png(970)
    assert 900_000 < len(upload) < 1_000_000
    with api_client(stack) as client:
        for field in ("task", "model_id", "top_k", "invert"):
            body, content_type = multipart(
                [(b'name="file"; filename="d.png"', digit_png()), (f'name="{field}"'.encode(), upload)]
            )
            response = client.post("/predict", content=body, headers={"content-type": content_type})
            assert response.status_code == 422, (field, response.text[:300])
            assert len(response.content) < 2000, (field, len(response.content))
        big_text = "x" * (2 * 1024 * 1024)  # over 1 MB, under MAX_UPLOAD_BYTES: a 422, not a 400
        response = client.post(
            "/predict",
            files={"file": ("d.png", digit_png())},
            data={"task": "mnist_lenet5", "model_id": big_text},
        )
        assert response.status_code == 422 and len(response.content) < 2000
        job = client.post("/jobs", json={"task": "mnist_lenet5", "hyperparameters": {"extra": "y" * 500_000}})
        assert job.status_code == 422 and len(job.content) < 2000 and "extra" in job.text


def test_part_size_limit_is_max_upload_bytes(make_stack):
    stack = make_stack(max_upload_bytes=2 * 1024 * 1024)
    make_model_checkpoint(stack.settings().models_dir)
    with api_client(stack) as client:
        text = {"task": "mnist_lenet5", "model_id": "x" * (1536 * 1024)}  # 1.5 MB: under the limit
        response = client.post("/predict", files={"file": ("d.png", digit_png())}, data=text)
        assert response.status_code == 422 and "model_id" in str(response.json()["detail"])
        text["model_id"] = "x" * (2 * 1024 * 1024 + 1)  # one byte over
        response = client.post("/predict", files={"file": ("d.png", digit_png())}, data=text)
        assert response.status_code == 413


# URL length -----------------------------------------------------------------------------------


def test_url_over_8_kib_is_414_with_json(stack, start_api):
    api = start_api(stack)
    import httpx

    with api_client(stack) as client:
        long = "/jobs?task=" + "x" * MAX_URL_BYTES
        response = client.get(long)
        assert response.status_code == 414 and "8192 bytes" in response.json()["detail"]
        assert client.get("/models/" + "a" * (MAX_URL_BYTES + 1)).status_code == 414
        just_under = "/jobs?offset=0&pad=" + "x" * (MAX_URL_BYTES - 40)
        assert client.get(just_under).status_code == 200
    over = httpx.get(api.url + "/jobs?pad=" + "y" * (MAX_URL_BYTES + 100))
    assert over.status_code == 414 and over.headers["content-type"] == "application/json"
    assert "over the limit" in over.json()["detail"]


def test_urls_up_to_the_head_bound_are_414_with_json_through_app_serve(stack):
    """Audit: from 64 KiB on, uvicorn's httptools parser failed and uvicorn answered a plain-text
    400. app.serve (as scripts/up.sh and the Docker image run the API) lets any URL within its
    1 MiB bound on the request head reach the API's JSON 414; a longer head gets a JSON 431."""
    import httpx

    from app.serve import MAX_HEAD_BYTES
    from tests.conftest import free_port
    from tests.integration.test_serve import _start, _wait_healthy

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = _start(stack, port, workers=1)
    try:
        _wait_healthy(url, server)
        for size in (100_000, 1_000_000):  # httpx refuses URLs over 64 KiB: a raw request
            target = b"/jobs?pad=" + b"z" * size
            answer = _exchange(port, b"GET %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % target)
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 414 "), answer[:200]
            assert b"\r\ncontent-type: application/json" in head
            assert f"the URL is {len(target) - 1} bytes" in json.loads(body)["detail"]  # less the "?"
        head = b"GET /jobs HTTP/1.1\r\nHost: test\r\nX-Pad: "
        # one byte over, the head unfinished: all of it is read, so the answer is not lost to a reset
        answer = _exchange(port, head + b"p" * (MAX_HEAD_BYTES + 1 - len(head)))
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["detail"].endswith(f"{MAX_HEAD_BYTES} bytes")
        assert httpx.get(f"{url}/healthz").status_code == 200
    finally:
        server.terminate()
        server.wait(30)


def _exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` over a new connection and read the answer until the server closes it."""
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        while chunk := sock.recv(65536):
            data += chunk
    return data


# Idempotency-Key scope ------------------------------------------------------------------------


def test_idempotency_key_is_scoped_to_the_api_key(make_stack):
    stack = make_stack(api_keys=[KEY, OTHER_KEY], environment="production")
    body = {"task": "mnist_lenet5", "hyperparameters": {"epochs": 1}}
    other = {"Authorization": f"Bearer {OTHER_KEY}"}
    with api_client(stack) as client:
        first = client.post("/jobs", json=body, headers={**AUTH, "Idempotency-Key": "shared-key"})
        replay = client.post("/jobs", json=body, headers={**AUTH, "Idempotency-Key": "shared-key"})
        theirs = client.post("/jobs", json=body, headers={**other, "Idempotency-Key": "shared-key"})
        theirs_other_body = client.post(
            "/jobs",
            json={**body, "hyperparameters": {"epochs": 2}},
            headers={**other, "Idempotency-Key": "k2"},
        )
        assert first.status_code == replay.status_code == theirs.status_code == 202
        assert replay.json()["id"] == first.json()["id"] and replay.headers["idempotent-replayed"] == "true"
        assert theirs.json()["id"] != first.json()["id"] and "idempotent-replayed" not in theirs.headers
        assert theirs_other_body.status_code == 202
        again = client.post("/jobs", json=body, headers={**other, "Idempotency-Key": "shared-key"})
        assert again.json()["id"] == theirs.json()["id"]
        assert client.get("/jobs", headers=AUTH).json()["count"] == 3


# Ids are matched whole; 422s echo numbers as numbers ------------------------------------------


def test_ids_with_a_trailing_newline_never_reach_the_filesystem(stack):
    models_dir = stack.settings().models_dir
    model_id = make_model_checkpoint(models_dir)
    (models_dir / model_id).rename(models_dir / "abc\n")  # would be found if the id got through
    make_model_checkpoint(models_dir, seed=1)
    with api_client(stack) as client:
        for path in (
            "/models/abc%0A",
            "/models/abc%0a",
            "/jobs/" + "a" * 32 + "%0A",
            "/jobs/" + "a" * 32 + "%0A/cancel",
        ):
            method = "POST" if path.endswith("cancel") else "GET"
            response = client.request(method, path)
            assert response.status_code == 422, (path, response.text)
            assert response.json()["detail"][0]["loc"][0] == "path"
        response = client.post("/predict", files={"file": ("d.png", digit_png())}, data={"model_id": "abc\n"})
        assert response.status_code == 422
        # listed neither as valid nor as invalid: the folder's name is not an id (fullmatch)
        assert "abc\n" not in [m["id"] for m in client.get("/models").json()["data"]]


def test_a_dataset_name_ending_in_a_newline_is_refused(make_stack, tmp_path):
    from tests.factories_datasets import class_images, zip_bytes

    stack = make_stack(datasets_dir=tmp_path / "datasets")
    archive = zip_bytes(class_images({"cats": 2, "dogs": 2}))
    with api_client(stack) as client:
        for name in ("pets\n", "pets\x85"):
            response = client.post("/datasets", files={"file": ("pets.zip", archive)}, data={"name": name})
            assert response.status_code == 422, (name, response.text)
            assert "control characters" in response.text


def test_validation_errors_echo_numbers_as_numbers(stack):
    with api_client(stack) as client:
        for value in (2.5, 1e-3, -7, 10**9):
            response = client.post(
                "/jobs", json={"task": "mnist_lenet5", "hyperparameters": {"epochs": value}}
            )
            assert response.status_code == 422
            (error,) = [e for e in response.json()["detail"] if e["loc"][-1] == "epochs"]
            assert error["input"] == value and type(error["input"]) is type(value)
        response = client.post("/jobs", json={"task": "mnist_lenet5", "hyperparameters": {"epochs": True}})
        assert response.json()["detail"][0]["input"] is True


def test_whole_number_floats_are_ints_but_fractions_are_not(stack):
    """JSON has one number type: 3.0 is 3 (as JSON Schema says, and as Schemathesis sends it)."""
    with api_client(stack) as client:
        body = {"task": "mnist_lenet5", "hyperparameters": {"epochs": 3.0, "seed": 697.0, "batch_size": 32.0}}
        response = client.post("/jobs", json=body)
        assert response.status_code == 202, response.text
        hyperparameters = response.json()["hyperparameters"]
        assert hyperparameters["epochs"] == 3 and isinstance(hyperparameters["epochs"], int)
        assert hyperparameters["seed"] == 697 and hyperparameters["batch_size"] == 32
        assert response.json()["hyperparameters"]["lr"] == 0.01
        for bad in (2.5, "3", True, 1e300):
            refused = client.post("/jobs", json={"task": "mnist_lenet5", "hyperparameters": {"epochs": bad}})
            assert refused.status_code == 422, bad


def test_swagger_try_it_out_with_prefilled_values_works(lenet_stack):
    """What Swagger pre-fills on /predict (each field's example, else its default) plus a file:
    200 from the newest model of the example task, with top_k = the documented default (5)."""
    stack, model_id = lenet_stack
    with api_client(stack) as client:
        schema = client.app.openapi()
        body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]
        form = schema["components"]["schemas"][body["schema"]["$ref"].rsplit("/", 1)[-1]]
        prefilled = {}
        for name, prop in form["properties"].items():
            if name == "file":
                continue
            if prop.get("examples"):
                prefilled[name] = str(prop["examples"][0])
            elif "default" in prop:
                prefilled[name] = str(prop["default"])
        assert "model_id" not in prefilled
        response = client.post("/predict", files={"file": ("d.png", digit_png())}, data=prefilled)
        assert response.status_code == 200, response.text
        assert response.json()["model_id"] == model_id and len(response.json()["predictions"]) == 5
        default = client.post(
            "/predict", files={"file": ("d.png", digit_png())}, data={"task": "mnist_lenet5"}
        )
        assert len(default.json()["predictions"]) == 5
