"""``imgclf``: the command-line client of the service.

    imgclf train mnist_lenet5 --set epochs=1 --follow
    imgclf jobs ls | jobs show ID [--follow] | jobs cancel ID
    imgclf models ls | models show ID | models alias ID production | models unalias ID production
    imgclf models export ID --format onnx [-o FILE] | models rm ID [--force]
    imgclf datasets upload photos.zip [--name NAME] [--wait] | datasets ls | datasets show ID | datasets rm ID
    imgclf train custom_resnet18 --dataset ID --follow
    imgclf predict digit.png photo.jpg --task mnist_lenet5 --top-k 3

The API is ``IMGCLF_URL`` (default http://127.0.0.1:8000) and the key, when the server has
API_KEYS, ``IMGCLF_API_KEY`` (sent as ``Authorization: Bearer``). An API error is printed as its
status and detail, with exit status 1; so is a followed job that fails or is cancelled.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from cli.client import FINAL_STATUSES, ApiError, Client, eval_accuracy
from cli.datasets import INGESTING, DatasetNameUnknown, resolve_dataset, wait_dataset
from cli.follow import follow_job

DEFAULT_URL = "http://127.0.0.1:8000"
# The API's default `top_k` (the form field of POST /predict in app/api/routes/predict.py); not
# imported from there, since that module imports torch. tests/unit/test_cli_args.py checks they agree.
DEFAULT_TOP_K = 5
SKIPPED_SHOWN = 20  # skipped files `datasets show` lists unless told otherwise
ModelIdArg = Annotated[str, typer.Argument(help="Model id (models ls).")]
AliasArg = Annotated[str, typer.Argument(help="Alias, e.g. production (what /predict by task uses).")]

app = typer.Typer(
    help="Train and use the image classifiers of an imgclf service.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
jobs_app = typer.Typer(help="Training jobs: list, show, cancel.", no_args_is_help=True)
models_app = typer.Typer(
    help="Trained models (checkpoints): list, show, pin with an alias, export, remove.", no_args_is_help=True
)
datasets_app = typer.Typer(
    help="Datasets: upload your own photos (an archive of class folders), list, show, remove.",
    no_args_is_help=True,
)
app.add_typer(jobs_app, name="jobs")
app.add_typer(models_app, name="models")
app.add_typer(datasets_app, name="datasets")

# Piped output is not squeezed to 80 columns (job and model ids are long); COLUMNS still wins.
PIPE_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
out = Console(highlight=False, width=PIPE_WIDTH)
err = Console(stderr=True, highlight=False, soft_wrap=True)


@app.callback()
def main(
    ctx: typer.Context,
    url: Annotated[str, typer.Option(envvar="IMGCLF_URL", help="Base URL of the API.")] = DEFAULT_URL,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="IMGCLF_API_KEY", help="API key (when the server has API_KEYS).", show_default=False
        ),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each API answer.")] = 30.0,
) -> None:
    if not url.startswith(("http://", "https://")):
        raise typer.BadParameter(f"{url!r} is not an http:// or https:// URL", param_hint="--url/IMGCLF_URL")
    ctx.obj = Client(url, api_key or None, timeout)


def _client(ctx: typer.Context) -> Client:
    return ctx.find_root().obj


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(message, markup=False)
    return typer.Exit(code)


def run(call, hint: Callable[[ApiError], str | None] | None = None):
    """Run ``call()``; an API or connection error is printed plainly and exits 1. ``hint(error)``
    may add a line of advice under an API error."""
    try:
        return call()
    except ApiError as exc:
        advice = hint(exc) if hint else None
        raise fail(f"error: {exc}" + (f"\n{advice}" if advice else "")) from None
    except httpx.HTTPError as exc:
        raise fail(f"error: cannot reach the API at {_url(exc)}: {exc}") from None


def dataset_id_of(client: Client, reference: str) -> str:
    """``resolve_dataset`` for a command: an unknown or ambiguous name exits 1 with the reason."""
    try:
        return run(lambda: resolve_dataset(client, reference))
    except DatasetNameUnknown as exc:
        raise fail(f"error: {exc}") from None


def _url(exc: httpx.HTTPError) -> str:
    try:
        return str(exc.request.url.copy_with(path="/", query=None)).rstrip("/")
    except RuntimeError:  # no request attached
        return "?"


def parse_set(values: list[str]) -> dict[str, Any]:
    """``["epochs=1", "mode=finetune", "max_train_samples=null"]`` → ``{"epochs": 1, "mode":
    "finetune", "max_train_samples": None}``: each value parsed as JSON when it is valid JSON,
    kept as a string otherwise. Raises ``typer.BadParameter`` for an item without ``=``."""
    parsed: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expected key=value, got {item!r}", param_hint="--set")
        try:
            parsed[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            parsed[key.strip()] = raw
    return parsed


def percent(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f} %"


def metrics_table(metrics: list[dict[str, Any]], title: str = "Epochs") -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("epoch", "lr", "train loss", "train acc", "test/val acc", "time", "images/s"):
        table.add_column(column, justify="right")
    for m in metrics:
        table.add_row(
            str(m.get("epoch")),
            f"{m.get('lr', 0):.3g}",
            f"{m.get('train_loss', float('nan')):.4f}",
            percent(m.get("train_accuracy")),
            percent(eval_accuracy(m)),
            f"{m.get('duration_s', 0):.1f} s",
            f"{m.get('images_per_s', 0):,.0f}",
        )
    return table


def key_values(rows: list[tuple[str, Any]]) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, "—" if value is None or value == "" else str(value))
    return table


def finish(job: dict[str, Any]) -> None:
    """Print how a followed job ended; exit 1 unless it succeeded."""
    if job.get("metrics"):
        out.print(metrics_table(job["metrics"]))
    if job["status"] != "succeeded":
        reason = f": {job['error']}" if job.get("error") else ""
        raise fail(f"job {job['id']} {job['status']}{reason}")
    final = job["metrics"][-1] if job.get("metrics") else {}
    split = "val" if final.get("val_accuracy") is not None else "test"
    out.print(f"{split} accuracy: {percent(eval_accuracy(final))}")
    out.print(f"model: {job.get('model_id')}")


def _dataset_hint(exc: ApiError) -> str | None:
    """Advice under POST /jobs's 422 when the task trains on an uploaded dataset and none was given."""
    if exc.status == 422 and re.search(r"\bdataset: Field required", str(exc)):
        return "this task trains on an uploaded dataset: give --dataset ID or NAME (imgclf datasets ls)"
    return None


@app.command()
def train(
    ctx: typer.Context,
    task: Annotated[
        str,
        typer.Argument(
            help="mnist_lenet5, cifar10_dense, hymenoptera_resnet18, or custom_resnet18 with --dataset."
        ),
    ],
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-s",
            help="A hyperparameter, key=value (value parsed as JSON when it can be: epochs=1 is an int).",
        ),
    ] = None,
    follow: Annotated[
        bool,
        typer.Option("--follow", "-f", help="Show progress until the job ends; exit 1 unless it succeeds."),
    ] = False,
    dataset: Annotated[
        str | None,
        typer.Option(help="custom_resnet18: an uploaded dataset, by id or by its unique name (datasets ls)."),
    ] = None,
) -> None:
    """Submit a training job."""
    client = _client(ctx)
    hyperparameters = parse_set(set_ or [])
    dataset = dataset_id_of(client, dataset) if dataset else None
    body = {"task": task, "hyperparameters": hyperparameters} | ({"dataset": dataset} if dataset else {})
    job = run(lambda: client.post_json("/jobs", body), hint=_dataset_hint)
    out.print(f"job {job['id']} {job['status']} ({task})")
    if follow:
        finish(run(lambda: follow_job(client, job["id"], out)))


@jobs_app.command("ls")
def jobs_ls(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option(help="Only this status.")] = None,
    task: Annotated[str | None, typer.Option(help="Only this task.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many (1-200).")] = 20,
) -> None:
    """List jobs, newest first."""
    client = _client(ctx)
    params = {"limit": limit} | ({"status": status} if status else {}) | ({"task": task} if task else {})
    page = run(lambda: client.get("/jobs", params=params))
    table = Table(title=f"{len(page['data'])} of {page['count']} jobs", title_justify="left")
    for column in ("id", "task", "status", "epoch", "test/val acc", "created", "model"):
        table.add_column(column, no_wrap=column in ("id", "model"))
    for job in page["data"]:
        progress = job.get("progress") or {}
        last = job["metrics"][-1] if job.get("metrics") else {}
        table.add_row(
            job["id"],
            job["task"],
            job["status"],
            f"{progress.get('epoch', 0)}/{progress.get('epochs', 0)}",
            percent(eval_accuracy(last)),
            (job.get("created_at") or "")[:19].replace("T", " "),
            job.get("model_id") or "—",
        )
    out.print(table)


@jobs_app.command("show")
def jobs_show(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Follow it until it ends; exit 1 unless it succeeds.")
    ] = False,
) -> None:
    """Show a job: status, progress, hyperparameters, per-epoch metrics."""
    client = _client(ctx)
    job = run(lambda: client.get(f"/jobs/{job_id}"))
    progress = job.get("progress") or {}
    out.print(
        key_values(
            [
                ("id", job["id"]),
                ("task", job["task"]),
                ("status", job["status"]),
                ("stage", progress.get("stage")),
                ("epoch", f"{progress.get('epoch', 0)}/{progress.get('epochs', 0)}"),
                ("created", job.get("created_at")),
                ("started", job.get("started_at")),
                ("finished", job.get("finished_at")),
                ("device", job.get("device")),
                ("attempts", job.get("attempts")),
                ("error", job.get("error")),
                ("model", job.get("model_id")),
                ("hyperparameters", json.dumps(job.get("hyperparameters", {}))),
            ]
        )
    )
    if follow:
        finish(job if job["status"] in FINAL_STATUSES else run(lambda: follow_job(client, job_id, out)))
    elif job.get("metrics"):
        out.print(metrics_table(job["metrics"]))


@jobs_app.command("cancel")
def jobs_cancel(ctx: typer.Context, job_id: Annotated[str, typer.Argument(help="Job id.")]) -> None:
    """Cancel a queued or running job (a running one stops at its next batch)."""
    client = _client(ctx)
    job = run(lambda: client.post_json(f"/jobs/{job_id}/cancel", None))
    note = " (stops at the next batch)" if job["status"] == "running" else ""
    out.print(f"job {job['id']} {job['status']}{note}")


def uploaded_dataset(model: dict) -> str | None:
    """The id of the uploaded dataset a model was trained on (its ``name``, where that is not its
    task), else None."""
    name = model.get("name")
    return name if name and name != model.get("task") else None


@models_app.command("ls")
def models_ls(
    ctx: typer.Context,
    task: Annotated[str | None, typer.Option(help="Only this task.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many (1-200).")] = 50,
) -> None:
    """List trained models, newest first."""
    client = _client(ctx)
    params = {"limit": limit} | ({"task": task} if task else {})
    page = run(lambda: client.get("/models", params=params))
    table = Table(title=f"{len(page['data'])} of {page['count']} models", title_justify="left")
    for column in ("id", "task", "dataset", "test/val acc", "epochs", "aliases", "created", "valid"):
        table.add_column(column, no_wrap=column == "id")
    for model in page["data"]:
        final = (model.get("metrics") or {}).get("final") or {}
        table.add_row(
            model["id"],
            model.get("task") or "—",
            uploaded_dataset(model) or "—",
            percent(eval_accuracy(final)),
            str(final.get("epoch", "—")),
            ", ".join(model.get("aliases") or []) or "—",
            (model.get("created_at") or "")[:19].replace("T", " "),
            "yes" if model.get("valid") else f"no: {model.get('error')}",
        )
    out.print(table)


@models_app.command("show")
def models_show(ctx: typer.Context, model_id: ModelIdArg) -> None:
    """Show a model: metrics, hyperparameters and, when the server has it, its evaluation."""
    client = _client(ctx)
    model = run(lambda: client.get(f"/models/{model_id}"))
    final = (model.get("metrics") or {}).get("final") or {}
    out.print(
        key_values(
            [
                ("id", model["id"]),
                ("task", model.get("task")),
                ("dataset", uploaded_dataset(model) or "—"),
                ("valid", "yes" if model.get("valid") else f"no: {model.get('error')}"),
                ("test/val accuracy", percent(eval_accuracy(final))),
                ("created", model.get("created_at")),
                ("size", f"{model.get('size_bytes', 0):,} bytes"),
                ("job", model.get("job_id")),
                ("aliases", ", ".join(model.get("aliases") or [])),
                ("classes", ", ".join(model.get("classes") or [])),
                ("hyperparameters", json.dumps(model.get("hyperparameters", {}))),
            ]
        )
    )
    evaluation = model.get("evaluation")
    if evaluation:
        table = Table(
            title=f"Evaluation on {evaluation['split']}: accuracy {percent(evaluation['accuracy'])}",
            title_justify="left",
        )
        for column in ("class", "precision", "recall", "f1", "support"):
            table.add_column(column, justify="right")
        for row in evaluation["per_class"]:
            table.add_row(
                row["class"],
                f"{row['precision']:.3f}",
                f"{row['recall']:.3f}",
                f"{row['f1']:.3f}",
                str(row["support"]),
            )
        out.print(table)


def split_counts(images: dict[str, int] | None) -> str:
    """``{"train": 20, "val": 5}`` → ``20 train / 5 val``; ``—`` when there are none."""
    return " / ".join(f"{n:,} {split}" for split, n in (images or {}).items()) or "—"


def class_counts_table(record: dict[str, Any]) -> Table:
    """Images per class (rows) and split (columns)."""
    counts: dict[str, dict[str, int]] = record.get("counts") or {}
    table = Table(title="Images per class", title_justify="left")
    table.add_column("class")
    for split in counts:
        table.add_column(split, justify="right")
    for cls in record.get("classes") or []:
        table.add_row(cls, *(str(counts[split].get(cls, 0)) for split in counts))
    return table


def dataset_summary(record: dict[str, Any]) -> None:
    """How an ingestion ended: classes, images per split and class, skipped files; exit 1 if failed."""
    if record["status"] == "failed":
        raise fail(f"dataset {record['id']} failed: {record.get('error') or 'no reason given'}")
    skipped = record.get("skipped_count", 0)
    out.print(
        f"dataset {record['id']} {record['status']}: {len(record.get('classes') or [])} classes, "
        f"{split_counts(record.get('images'))} images, {skipped} {'file' if skipped == 1 else 'files'} "
        "skipped" + (f" (imgclf datasets show {record['id']} lists them)" if skipped else ""),
        markup=False,
        soft_wrap=True,
    )
    if record.get("counts"):
        out.print(class_counts_table(record))
    leaked = (record.get("duplicates") or {}).get("train_val")
    if leaked:
        err.print(f"warning: {leaked} val images are also in train (exact duplicates)", markup=False)


@datasets_app.command("upload")
def datasets_upload(
    ctx: typer.Context,
    path: Annotated[
        Path,
        typer.Argument(
            help="A .zip, .tar, .tar.gz or .tgz of <class>/<images> (or train/<class>/ and val/<class>/).",
            exists=True,
            dir_okay=False,
            readable=True,
        ),
    ],
    name: Annotated[
        str | None, typer.Option(help="Name to list it by (default: the file's name).", show_default=False)
    ] = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait",
            "-w",
            help="Wait until it is ready (classes, counts) or failed (exit 1 with the reason).",
        ),
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print only the dataset id (for scripts).")
    ] = False,
) -> None:
    """Upload an archive of photos sorted into class folders; prints the dataset id to train on."""
    client = _client(ctx)
    record, created = run(lambda: client.upload_dataset(path, name))
    if quiet:
        if wait and record["status"] == INGESTING:
            record = run(lambda: wait_dataset(client, record["id"], None))
        if record["status"] == "failed" and (wait or not created):
            raise fail(f"dataset {record['id']} failed: {record.get('error') or 'no reason given'}")
        out.print(record["id"], markup=False)
        return
    again = "" if created else ", uploaded before"
    out.print(f"dataset {record['id']} {record['status']} ({record['name']}{again})", markup=False)
    if wait:
        if record["status"] == INGESTING:
            record = run(lambda: wait_dataset(client, record["id"], out))
        dataset_summary(record)
    elif record["status"] == INGESTING:
        out.print(f"follow it with: imgclf datasets show {record['id']}", markup=False)


@datasets_app.command("ls")
def datasets_ls(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(help="At most this many (1-200).")] = 50,
) -> None:
    """List datasets: the built-in ones, then the uploaded ones, newest first."""
    client = _client(ctx)
    page = run(lambda: client.get("/datasets", params={"limit": limit}))
    table = Table(title=f"{len(page['data'])} of {page['count']} datasets", title_justify="left")
    for column in ("id", "name", "status", "classes", "images", "created"):
        table.add_column(column, no_wrap=column == "id", justify="right" if column == "classes" else "left")
    for record in page["data"]:
        table.add_row(
            record["id"],
            record.get("name") or "—",
            record["status"],
            str(len(record.get("classes") or [])) if record["status"] == "ready" else "—",
            split_counts(record.get("images")),
            "built in" if record.get("builtin") else (record.get("created_at") or "")[:19].replace("T", " "),
        )
    out.print(table)


@datasets_app.command("show")
def datasets_show(
    ctx: typer.Context,
    dataset_id: Annotated[
        str, typer.Argument(help="Dataset id or unique name (or mnist, cifar10, hymenoptera).")
    ],
    skipped: Annotated[
        int, typer.Option("--skipped", min=0, help="List at most this many skipped files (0: none).")
    ] = SKIPPED_SHOWN,
) -> None:
    """Show a dataset: status (or why it failed), classes, images per split and class, skipped files."""
    client = _client(ctx)
    dataset_id = dataset_id_of(client, dataset_id)
    record = run(lambda: client.get(f"/datasets/{dataset_id}"))
    progress = record.get("progress") or {}
    duplicates = record.get("duplicates") or {}
    rows: list[tuple[str, Any]] = [
        ("id", record["id"]),
        ("name", record.get("name")),
        ("status", record["status"]),
        ("error", record.get("error")),
        ("task", record.get("task")),
    ]
    if record.get("builtin"):
        rows.append(("built in", "yes (found under the server's DATA_DIR)"))
    else:
        size = record.get("size_bytes")
        rows += [
            ("created", record.get("created_at")),
            ("finished", record.get("finished_at")),
            ("archive", f"{record.get('format')}, {size:,} bytes" if size is not None else None),
            ("layout", record.get("layout")),
            ("split", json.dumps(record["split"]) if record.get("split") else None),
        ]
    if record["status"] == INGESTING and progress:
        done, total = progress.get("entries_done"), progress.get("entries_total")
        counted = f" {done}/{total} entries, {progress.get('images', 0)} images" if total else ""
        rows.append(("progress", f"{progress.get('stage', '')}{counted}"))
    classes = record.get("classes") or []
    rows += [
        ("classes", f"{len(classes)}: {', '.join(classes)}" if classes else None),
        ("images", split_counts(record.get("images"))),
    ]
    if not record.get("builtin"):
        rows += [("skipped", record.get("skipped_count", 0)), ("ignored", record.get("ignored_count", 0))]
    if not record.get("builtin") and record["status"] == "ready":
        rows.append(
            (
                "duplicates",
                f"{duplicates.get('train_val', 0)} val images also in train, "
                f"{duplicates.get('within_split', 0)} within a split",
            )
        )
    out.print(key_values(rows))
    if record.get("counts"):
        out.print(class_counts_table(record))
    listed = record.get("skipped") or []
    if listed and skipped:
        total = max(record.get("skipped_count", 0), len(listed))
        table = Table(title=f"Skipped files ({min(skipped, len(listed))} of {total})", title_justify="left")
        table.add_column("path", overflow="fold")
        table.add_column("reason", overflow="fold")
        for item in listed[:skipped]:
            table.add_row(item["path"], item["reason"])
        out.print(table)
        if total > skipped:
            more = f"--skipped {min(total, len(listed))}" if len(listed) > skipped else "the API"
            out.print(f"... and {total - skipped} more (see {more})", markup=False)


@models_app.command("alias")
def models_alias(
    ctx: typer.Context,
    model_id: ModelIdArg,
    alias: AliasArg,
) -> None:
    """Set an alias on a model, moving it from the model of the same name (task or dataset) that
    had it."""
    client = _client(ctx)
    moved = run(lambda: client.put(f"/models/{model_id}/aliases/{alias}"))
    previous = moved.get("previous_model_id")
    note = f" (was {previous})" if previous and previous != model_id else ""
    out.print(f"{moved['name']} {moved['alias']} -> {moved['model_id']}{note}", markup=False)


@models_app.command("unalias")
def models_unalias(
    ctx: typer.Context,
    model_id: ModelIdArg,
    alias: AliasArg,
) -> None:
    """Remove an alias from a model."""
    client = _client(ctx)
    run(lambda: client.delete(f"/models/{model_id}/aliases/{alias}"))
    out.print(f"alias {alias} removed from {model_id}", markup=False)


@models_app.command("export")
def models_export(
    ctx: typer.Context,
    model_id: ModelIdArg,
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="onnx, or safetensors (a zip with metadata.json).")
    ] = "onnx",
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="File to write (default: ID.onnx or ID.zip).", dir_okay=False),
    ] = None,
) -> None:
    """Download a model as ONNX, or as a zip of its safetensors weights and metadata.json (the
    README shows how to use each outside the service)."""
    if fmt not in ("onnx", "safetensors"):
        raise typer.BadParameter("onnx or safetensors", param_hint="--format")
    client = _client(ctx)
    destination = output or Path(f"{model_id}.{'onnx' if fmt == 'onnx' else 'zip'}")
    folder = destination.absolute().parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise fail(f"error: cannot write {destination}: {folder} is not a folder this user can write to")
    try:
        size = run(lambda: client.download(f"/models/{model_id}/export", destination, params={"format": fmt}))
    except OSError as exc:
        raise fail(f"error: cannot write {destination}: {exc.strerror or exc}") from None
    out.print(f"{destination}: {size:,} bytes", markup=False)


def _aliased_hint(exc: ApiError) -> str | None:
    """Advice under DELETE /models/{id}'s 409 for a model that carries aliases."""
    if exc.status == 409 and "alias" in str(exc.detail):
        return "move the alias to another model (imgclf models alias ID ALIAS), or delete with --force"
    return None


@models_app.command("rm")
def models_rm(
    ctx: typer.Context,
    model_id: ModelIdArg,
    force: Annotated[bool, typer.Option(help="Also when it carries aliases (they go too).")] = False,
) -> None:
    """Delete a model: its weights, metadata and exports. Refused while it carries an alias,
    unless --force. Predictions already running with it finish."""
    client = _client(ctx)
    params = {"force": "true"} if force else {}
    run(lambda: client.delete(f"/models/{model_id}", params=params), hint=_aliased_hint)
    out.print(f"model {model_id} deleted", markup=False)


def _in_use_hint(exc: ApiError) -> str | None:
    """Advice under DELETE /datasets/{id}'s 409 when a job uses the dataset."""
    in_use = re.search(r"jobs? ([0-9a-f, ]+) (?:is|are) queued or running", str(exc.detail))
    if exc.status != 409 or not in_use:
        return None
    ids = re.findall(r"[0-9a-f]{32}", in_use.group(1))
    if len(ids) == 1:
        return f"cancel it (imgclf jobs cancel {ids[0]}) or wait until it ends, then remove the dataset"
    commands = "; ".join(f"imgclf jobs cancel {job_id}" for job_id in ids)
    return f"cancel them ({commands}) or wait until they end, then remove the dataset"


@datasets_app.command("rm")
def datasets_rm(
    ctx: typer.Context,
    dataset_id: Annotated[str, typer.Argument(help="Id or unique name of an uploaded dataset.")],
) -> None:
    """Delete an uploaded dataset and its files (models trained on it stay). Refused while a queued
    or running job uses it."""
    client = _client(ctx)
    dataset_id = dataset_id_of(client, dataset_id)
    run(lambda: client.delete(f"/datasets/{dataset_id}"), hint=_in_use_hint)
    out.print(f"dataset {dataset_id} deleted", markup=False)


@app.command()
def predict(
    ctx: typer.Context,
    files: Annotated[
        list[Path], typer.Argument(help="Image files.", exists=True, dir_okay=False, readable=True)
    ],
    task: Annotated[str | None, typer.Option(help="Use the newest valid model of this task.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Use this model id.")] = None,
    dataset: Annotated[
        str | None,
        typer.Option(help="The production (else newest) model of this uploaded dataset (id or name)."),
    ] = None,
    alias: Annotated[
        str | None, typer.Option(help="With --task or --dataset: the model carrying this alias.")
    ] = None,
    top_k: Annotated[
        int, typer.Option("--top-k", "-k", help="Classes per image (1-100; the API's default).")
    ] = DEFAULT_TOP_K,
) -> None:
    """Classify images: one line per file, `FILE: label (probability), ...`; exit 1 if any failed."""
    if not task and not model and not dataset:
        raise typer.BadParameter("give --task, --model or --dataset", param_hint="--task/--model/--dataset")
    client = _client(ctx)
    dataset = dataset_id_of(client, dataset) if dataset else None
    optional = {"task": task, "model_id": model, "dataset": dataset, "alias": alias}
    form = {"top_k": str(top_k)} | {name: value for name, value in optional.items() if value}
    failed = 0
    for path in files:
        try:
            result = client.predict(path, form)
        except (ApiError, httpx.HTTPError) as exc:
            failed += 1
            reason = str(exc) if isinstance(exc, ApiError) else f"cannot reach the API at {_url(exc)}: {exc}"
            err.print(f"{path}: error: {reason}", markup=False)
            continue
        labels = ", ".join(f"{p['label']} ({percent(p['probability'], 1)})" for p in result["predictions"])
        out.print(f"{path}: {labels}", markup=False, soft_wrap=True)
    if failed:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
