"""The web console in a real browser: Playwright driving Debian's chromium (headless) against a real
stack (uvicorn process, Celery worker process, Redis). Every page load fails the test on a console
error, an uncaught exception, or a request to any host but the API's own; screenshots of each step
are saved in the test's tmp dir.

* test_console_trains_and_predicts_on_real_mnist: the job form refuses epochs=0 with the API's 422
  next to the field, submits a short LeNet-5 job on real MNIST, the curves gain points while it
  trains, the job list shows it succeeded, the model page shows its evaluation (confusion matrix,
  per-class scores, the mistakes with their images), and a real MNIST test digit dropped on the
  predict page is read right.
* test_console_with_api_keys: the pages load without a key, the console asks for one, and then
  lists jobs and follows a job's event stream with `Authorization: Bearer` (never the key in a URL).
"""

from __future__ import annotations

import base64
import io
import os
import re
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image

pytestmark = [pytest.mark.integration, pytest.mark.browser]

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
KEY = "console-test-key-0123456789"
TERMINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        pytest.fail(f"no chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM=/path)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield browser
        browser.close()


class Watched:
    """A page whose console errors, uncaught exceptions and off-host requests are recorded."""

    def __init__(self, browser, base_url: str, shots: Path):
        self.base = urlsplit(base_url)
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.page.set_default_timeout(20_000)
        self.shots = shots
        self.shots.mkdir(parents=True, exist_ok=True)
        self.problems: list[str] = []
        self.allowed: list[re.Pattern] = []
        self.requests: list = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))
        self.page.on("request", self._request)

    def _console(self, message) -> None:
        if message.type not in ("error", "warning"):
            return
        if message.type == "error" and any(p.search(message.text) for p in self.allowed):
            return
        self.problems.append(f"console {message.type}: {message.text}")

    def _request(self, request) -> None:
        self.requests.append(request)
        url = urlsplit(request.url)
        if url.scheme in ("blob", "data"):
            return  # local: object URLs of images the page holds
        if (url.scheme, url.hostname, url.port) != (self.base.scheme, self.base.hostname, self.base.port):
            self.problems.append(f"request off the host: {request.url}")

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(self.shots / f"{name}.png"), full_page=True)

    def check(self) -> None:
        assert not self.problems, "\n".join(self.problems)

    def close(self) -> None:
        self.context.close()


def png_bytes(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def drop_file(page, selector: str, data: bytes, name: str) -> None:
    """Drag a file onto ``selector`` as a user would (dragenter, dragover, drop with a DataTransfer)."""
    page.evaluate(
        """([selector, b64, name]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: "image/png" }));
            const target = document.querySelector(selector);
            for (const type of ["dragenter", "dragover", "drop"])
                target.dispatchEvent(
                    new DragEvent(type, { bubbles: true, cancelable: true, dataTransfer: transfer })
                );
        }""",
        [selector, base64.b64encode(data).decode(), name],
    )


@pytest.mark.realdata
def test_console_trains_and_predicts_on_real_mnist(
    browser, make_stack, start_worker, start_api, real_data_dir, tmp_path
):
    from torchvision.datasets.mnist import read_image_file, read_label_file

    stack = make_stack(data_dir=real_data_dir)
    start_worker(stack)
    api = start_api(stack)
    watched = Watched(browser, api.url, tmp_path / "screenshots")
    page = watched.page
    try:
        page.goto(f"{api.url}/")
        page.wait_for_url(re.compile(r"/ui/#/jobs$"))
        page.get_by_text("No jobs yet").wait_for()
        watched.shot("01-jobs-empty")

        # The form comes from the hyperparameter schema; the API's 422 is shown next to its field.
        page.click("[data-nav=train]")
        page.select_option("#train-task", "mnist_lenet5")
        assert page.input_value("#hp-batch_size") == "64" and page.input_value("#hp-momentum") == "0.9"
        watched.allowed.append(re.compile(r"status of 422"))
        page.fill("#hp-epochs", "0")
        page.click("#submit-job")
        page.wait_for_selector("#err-epochs:not(:empty)")
        assert "greater than or equal to 1" in page.text_content("#err-epochs")
        watched.shot("02-form-422")
        watched.allowed.clear()

        page.fill("#hp-epochs", "2")
        page.fill("#hp-batch_size", "16")
        page.fill("#hp-max_train_samples", "2000")
        page.click("#submit-job")
        page.wait_for_url(re.compile(r"#/jobs/[0-9a-f]{32}$"))
        job_id = page.url.rsplit("/", 1)[1]

        # The curves gain points while the job trains.
        samples: list[tuple[str, int]] = []
        deadline = time.monotonic() + 300
        status = ""
        shot_taken = False
        while status not in TERMINAL:
            assert time.monotonic() < deadline, f"job still {status} after 300 s: {samples[-5:]}"
            status = page.get_attribute("#job-status", "data-status") or ""
            points = int(page.get_attribute("#curves", "data-points") or 0)
            samples.append((status, points))
            if status == "running" and points and not shot_taken:
                watched.shot("03-job-training")
                shot_taken = True
            time.sleep(0.2)
        assert status == "succeeded", page.text_content("main")
        running = [points for s, points in samples if s == "running"]
        assert running and max(running) > 0 and max(running) > min(running), samples[::10]
        page.wait_for_selector("#epochs-table tbody tr:nth-child(2)")
        final_points = int(page.get_attribute("#curves", "data-points"))
        assert final_points > max(running) - 1 and final_points >= 6  # 2 epochs x (loss, 2 accuracies)
        watched.shot("04-job-succeeded")

        page.click("[data-nav=jobs]")
        page.wait_for_selector(f"#jobs-table tr[data-job='{job_id}'][data-status=succeeded]")

        page.goto(f"{api.url}/ui/#/jobs/{job_id}")
        page.click("#job-model")
        page.wait_for_selector("#evaluation")
        page.wait_for_selector("#confusion-matrix")
        assert page.locator("#confusion-matrix tbody tr").count() == 10
        assert page.locator("#per-class tbody tr").count() == 10
        accuracy = float(page.text_content("#evaluation-accuracy").split()[0])
        assert accuracy > 80, accuracy
        assert page.locator("#mistakes figure").count() == 25
        page.wait_for_selector("#mistakes figure img[src^='blob:']")  # GET /datasets/mnist/images/test/{i}
        watched.shot("05-model")

        # A real MNIST test digit dropped on the predict page is read right.
        page.click("#predict-with")
        page.wait_for_selector("#predict-target option[value^='model:']", state="attached")
        raw = real_data_dir / "MNIST" / "raw"
        image = read_image_file(str(raw / "t10k-images-idx3-ubyte"))[0].numpy()
        label = str(read_label_file(str(raw / "t10k-labels-idx1-ubyte"))[0].item())
        drop_file(page, "#drop", png_bytes(image), "mnist_test_0.png")
        card = page.wait_for_selector(".prediction[data-label]")
        assert card.get_attribute("data-label") == label
        assert page.locator(".prediction .bars li").count() == 5
        # A file that is no image: the API's 415 beside a plain box, not a broken-image icon (QA).
        watched.allowed.append(re.compile(r"status of 415"))
        drop_file(page, "#drop", b"just some notes", "notes.txt")
        refused = page.wait_for_selector(".prediction[data-error='415']")
        assert "not an image in an accepted format" in refused.text_content()
        refused.wait_for_selector(".no-preview")
        assert refused.query_selector("img") is None
        watched.shot("06-predict")
        watched.check()
    finally:
        watched.close()


def test_console_with_api_keys(browser, make_stack, start_api, tmp_path):
    stack = make_stack(api_keys=KEY)
    api = start_api(stack)
    for path in ("/ui/", "/ui/js/main.js", "/ui/app.css", "/ui/vendor/uplot/uPlot.iife.min.js"):
        assert httpx.get(f"{api.url}{path}").status_code == 200, path
    assert httpx.get(f"{api.url}/jobs").status_code == 401
    headers = {"Authorization": f"Bearer {KEY}"}
    job = httpx.post(f"{api.url}/jobs", json={"task": "mnist_lenet5"}, headers=headers).json()

    watched = Watched(browser, api.url, tmp_path / "screenshots")
    page = watched.page
    try:
        page.goto(f"{api.url}/ui/")
        page.wait_for_selector("#key-needed")
        assert page.is_visible("#key-box")
        watched.shot("01-key-needed")
        page.fill("#api-key", KEY)
        page.click("#key-box button")
        page.wait_for_selector(f"#jobs-table tr[data-job='{job['id']}'][data-status=queued]")
        assert page.evaluate("sessionStorage.getItem('imgclf.apiKey')") == KEY

        page.click(f"a[href='#/jobs/{job['id']}']")
        page.wait_for_selector("#job-status[data-status=queued]")
        page.wait_for_selector("#live-state[data-state=open]")  # the event stream, with the key
        watched.shot("02-job-queued")
        page.click("#cancel-job")
        page.wait_for_selector("#job-status[data-status=cancelled]")
        assert not page.is_visible("#cancel-job")

        api_calls = [r for r in watched.requests if urlsplit(r.url).path.startswith(("/jobs", "/models"))]
        assert api_calls and all(r.headers.get("authorization") == f"Bearer {KEY}" for r in api_calls)
        assert not any(KEY in r.url for r in watched.requests)
        watched.check()
    finally:
        watched.close()
    assert httpx.get(f"{api.url}/jobs/{job['id']}", headers=headers).json()["status"] == "cancelled"


def test_sse_parser_in_the_browser(browser, make_stack, start_api, tmp_path):
    """The console's SSE parser on chunks split anywhere (inside a line, between \\r and \\n),
    comments, multi-line data, ids that carry over, and an event without data (dropped)."""
    api = start_api(make_stack())
    watched = Watched(browser, api.url, tmp_path / "screenshots")
    try:
        watched.page.goto(f"{api.url}/ui/")
        stream = (
            ': keep-alive\r\nid: 1-0\r\nevent: progress\r\ndata: {"a":\r\ndata: 1}\r\n\r\n'
            "event: epoch\ndata:x\n\nid: 2-0\nevent: nothing\n\nevent: status\rdata: done\r\r\n"
        )
        events = watched.page.evaluate(
            """async (stream) => {
                const { SSEParser } = await import("/ui/js/sse.js");
                const out = [];
                const parser = new SSEParser((e) => out.push(e));
                for (let i = 0; i < stream.length; i += 3) parser.push(stream.slice(i, i + 3));
                return out;
            }""",
            stream,
        )
        assert events == [
            {"id": "1-0", "event": "progress", "data": '{"a":\n1}'},
            {"id": "1-0", "event": "epoch", "data": "x"},
            {"id": "2-0", "event": "status", "data": "done"},
        ]
        watched.check()
    finally:
        watched.close()


def test_job_page_resumes_its_event_stream_after_the_api_restarts(
    browser, make_stack, start_worker, start_api, synthetic_data_dir, tmp_path
):
    """The API is killed while the page follows a training job and started again on the same port:
    the page reconnects with Last-Event-ID and ends with every epoch exactly once."""
    stack = make_stack(data_dir=synthetic_data_dir)
    api = start_api(stack)
    start_worker(stack)
    # Long enough to outlast the API's restart on any machine; cancelled once the page has resumed.
    hyperparameters = {"epochs": 500, "max_train_samples": 600}
    job = httpx.post(
        f"{api.url}/jobs", json={"task": "mnist_lenet5", "hyperparameters": hyperparameters}
    ).json()
    watched = Watched(browser, api.url, tmp_path / "screenshots")
    page = watched.page
    # While the API is down, the browser reports the refused connections and the cut stream.
    watched.allowed.append(
        re.compile(r"ERR_CONNECTION_REFUSED|ERR_INCOMPLETE_CHUNKED_ENCODING|network error")
    )
    rows = page.locator("#epochs-table tbody tr")
    try:
        page.goto(f"{api.url}/ui/#/jobs/{job['id']}")
        page.wait_for_selector("#epochs-table tbody tr", timeout=180_000)  # the first epoch is done
        page.wait_for_selector("#live-state[data-state=open]")
        api.kill()
        page.wait_for_selector("#live-state[data-state=reconnecting]")
        seen_before = rows.count()
        api.start()
        page.wait_for_selector("#live-state[data-state=open]", timeout=60_000)
        page.wait_for_function(  # epochs that ended while the API was down, and new ones
            f"document.querySelectorAll('#epochs-table tbody tr').length > {seen_before + 1}",
            timeout=120_000,
        )
        httpx.post(f"{api.url}/jobs/{job['id']}/cancel").raise_for_status()
        page.wait_for_selector("#job-status[data-status=cancelled]", timeout=120_000)
        watched.shot("resumed")
        metrics = httpx.get(f"{api.url}/jobs/{job['id']}").json()["metrics"]
        assert rows.count() == len(metrics) > seen_before  # every epoch exactly once
        assert int(page.get_attribute("#curves", "data-points") or 0) >= len(metrics)
        streams = [r for r in watched.requests if r.url.endswith(f"/jobs/{job['id']}/events")]
        assert len(streams) >= 2 and not streams[0].headers.get("last-event-id")
        assert any(re.fullmatch(r"\d+-\d+", r.headers.get("last-event-id", "")) for r in streams[1:])
        watched.check()
    finally:
        watched.close()


def test_custom_task_form_asks_for_an_uploaded_dataset(browser, make_stack, start_api, tmp_path):
    """custom_resnet18 trains on an uploaded dataset: the form offers the ready uploads (none yet
    here, and it says so), shows the API's 422 beside the field, and its booleans are selects."""
    from playwright.sync_api import expect

    api = start_api(make_stack())
    watched = Watched(browser, api.url, tmp_path / "screenshots")
    watched.allowed.append(re.compile(r"status of 422"))
    try:
        page = watched.page
        page.goto(f"{api.url}/ui/#/train")
        page.select_option("#train-task", "custom_resnet18")
        page.wait_for_selector("#train-dataset")
        expect(page.locator("#train-dataset")).to_contain_text("no ready uploaded dataset")
        assert page.eval_on_selector("#hp-augment", "e => e.tagName") == "SELECT"
        page.click("#submit-job")
        expect(page.locator("#err-dataset")).to_contain_text("pattern")
        watched.shot("custom-form")
        watched.check()
    finally:
        watched.close()


def test_a_model_of_an_uploaded_dataset_in_the_console(
    browser, make_stack, start_worker, start_api, tmp_path
):
    """A model trained on an upload (custom_resnet18): the job list filters by its task and says
    "1 epoch"; its model page shows the upload's classes, its evaluation and the images of its
    mistakes; a picture of the upload dropped on the predict page, with the model or by the
    dataset, gets the upload's labels; and once the model is deleted, the predict page says so
    instead of "no model to use yet" (QA)."""
    from tests.conftest import wait_for_status
    from tests.factories_datasets import class_images, zip_bytes
    from tests.integration.test_datasets import wait_dataset

    stack = make_stack(datasets_dir=tmp_path / "datasets")
    start_worker(stack)
    api = start_api(stack)
    images = class_images({"red": 12, "green": 12, "blue": 12}, size=64)
    with httpx.Client(base_url=api.url, timeout=30) as client:
        dataset_id = client.post("/datasets", files={"file": ("colours.zip", zip_bytes(images))}).json()["id"]
        assert wait_dataset(client, dataset_id)["status"] == "ready"
        hyperparameters = {"epochs": 1, "batch_size": 8, "max_train_samples": 16, "weights": "none"}
        body = {"task": "custom_resnet18", "dataset": dataset_id, "hyperparameters": hyperparameters}
        job_id = client.post("/jobs", json=body).json()["id"]
        other = client.post("/jobs", json={"task": "mnist_lenet5"}).json()["id"]  # to be filtered out
        assert client.post(f"/jobs/{other}/cancel").status_code == 202
        job = wait_for_status(client, job_id, TERMINAL, timeout=300)
        assert job["status"] == "succeeded", job["error"]
        model_id = job["model_id"]

    watched = Watched(browser, api.url, tmp_path / "screenshots")
    page = watched.page
    try:
        page.goto(f"{api.url}/ui/#/jobs")
        page.wait_for_selector("#jobs-task option[value=custom_resnet18]", state="attached")
        page.select_option("#jobs-task", "custom_resnet18")
        page.wait_for_function("document.querySelectorAll('#jobs-table tbody tr').length === 1")
        row = page.locator(f"#jobs-table tr[data-job='{job_id}']")
        assert "1 epoch" in row.text_content() and "1 epochs" not in row.text_content()
        watched.shot("01-jobs-filtered")

        page.goto(f"{api.url}/ui/#/models/{model_id}")
        page.wait_for_selector("#confusion-matrix")
        classes = page.locator("#per-class tbody tr td:first-child").all_text_contents()
        assert classes == ["blue", "green", "red"], classes
        assert "%" in page.text_content("#evaluation-accuracy")
        if page.locator("#mistakes figure").count():  # GET /datasets/{id}/images/val/{i}
            page.wait_for_selector("#mistakes figure img[src^='blob:']")
        watched.shot("02-model")

        page.click("#predict-with")
        page.wait_for_selector(f"#predict-target option[value='model:{model_id}']", state="attached")
        assert page.input_value("#predict-target") == f"model:{model_id}"
        drop_file(page, "#drop", images["red/000.png"], "red.png")
        card = page.wait_for_selector(".prediction[data-label]")
        assert card.get_attribute("data-label") in {"blue", "green", "red"}
        labels = {label.text_content() for label in card.query_selector_all(".bars li .label")}
        assert labels == {"blue", "green", "red"}, labels
        watched.shot("03-predict")
        page.select_option("#predict-target", f"dataset:{dataset_id}")  # its production, else newest
        option = page.locator(f"#predict-target option[value='dataset:{dataset_id}']")
        assert option.text_content().startswith("colours · ")  # the upload's name
        drop_file(page, "#drop", images["blue/000.png"], "blue.png")
        page.wait_for_selector(".prediction:has(.file-name:text('blue.png'))[data-label]")
        assert page.locator(f".prediction a[href='#/models/{model_id}']").count() == 2
        watched.shot("04-predict-by-dataset")

        assert httpx.delete(f"{api.url}/models/{model_id}").status_code == 204
        page.goto(f"{api.url}/ui/#/predict?model={model_id}")
        page.reload()
        page.get_by_text(f"model {model_id} no longer exists").wait_for()
        assert page.input_value("#predict-target").startswith("task:")  # a usable choice, not a blank
        watched.shot("05-predict-deleted-model")
        watched.check()
    finally:
        watched.close()
