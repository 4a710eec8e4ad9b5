"""Request and response schemas of the API (one place; names follow JobCreate / JobPublic / JobsPublic)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from core.datasets import DATASET_ID_PATTERN
from core.images import InvertChoice, NormalizeChoice
from core.jobs import JobRecord
from models_store.aliases import ALIAS_PATTERN, model_name
from models_store.checkpoint import MODEL_ID_PATTERN, CheckpointInfo
from tasks import BuiltinTaskName, TaskName, get_task, list_tasks
from tasks.base import Task


def _job_create(task: Task) -> type[BaseModel]:
    """The ``POST /jobs`` body of one task: ``{"task": <name>, "hyperparameters": {...}}``, named
    after its hyperparameters class (``LeNetHyperparameters`` -> ``LeNetJobCreate``)."""
    name = task.hyperparameters.__name__.removesuffix("Hyperparameters") + "JobCreate"
    example = {"task": task.name, "hyperparameters": task.example}
    dataset = {}
    if task.uploaded_dataset:  # trains on a dataset uploaded with POST /datasets
        example = {"task": task.name, "dataset": "3b0c9f1e5d2a4c6b8e7f9a1b2c3d4e5f", **example}
        dataset["dataset"] = (
            str,
            Field(
                pattern=DATASET_ID_PATTERN,
                description="Id of a ready dataset uploaded with POST /datasets.",
                examples=["3b0c9f1e5d2a4c6b8e7f9a1b2c3d4e5f"],
            ),
        )
    return create_model(
        name,
        __config__=ConfigDict(extra="forbid", json_schema_extra={"examples": [example]}),
        __doc__=task.description,
        __module__=__name__,
        task=(Literal[task.name], Field(description="Task to train.")),
        **dataset,
        hyperparameters=(
            task.hyperparameters,
            Field(default_factory=task.hyperparameters, description="Overrides of the task's defaults."),
        ),
    )


JOB_CREATES: dict[str, type[BaseModel]] = {name: _job_create(get_task(name)) for name in list_tasks()}

JobCreate = Annotated[
    Union[tuple(JOB_CREATES.values())],  # noqa: UP007 (a union built from the registry)
    Field(discriminator="task", description="A training job: the task and optional hyperparameters."),
]

JOB_CREATE_EXAMPLES: dict[str, dict[str, Any]] = {
    example.key: {
        "summary": example.summary,
        "value": {"task": name, "hyperparameters": example.hyperparameters},
    }
    for name in list_tasks()
    if (example := get_task(name).job_example) is not None
}


class JobPublic(JobRecord):
    """A training job: status, progress, per-epoch metrics and the checkpoint it produced."""


class JobsPublic(BaseModel):
    """A page of jobs, newest first."""

    data: list[JobPublic] = Field(description="Jobs on this page.", examples=[[]])
    count: int = Field(description="Jobs matching the filters, over all pages.", examples=[42])


class ClassScores(BaseModel):
    """Precision, recall and F1 of one class on the evaluation split."""

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    class_: str = Field(alias="class", description="Class name.", examples=["cat"])
    precision: float = Field(
        description="Right among those predicted as this class (0 if none).", examples=[0.41]
    )
    recall: float = Field(description="Right among the images of this class.", examples=[0.37])
    f1: float = Field(description="Harmonic mean of precision and recall.", examples=[0.39])
    support: int = Field(description="Images of this class in the split.", examples=[1000])


class Mistake(BaseModel):
    """One misclassified image of the evaluation split."""

    split: str = Field(description="Split of the image.", examples=["test"])
    index: int = Field(
        description="Index of the image in its split (as in GET /datasets/{name}/images/{split}/{index}).",
        examples=[4411],
    )
    true: str = Field(description="Its class.", examples=["cat"])
    predicted: str = Field(description="The class the model gave it.", examples=["dog"])
    probability: float = Field(
        description="The model's probability for the predicted class.", examples=[0.97]
    )


class EvaluationPublic(BaseModel):
    """The final model on the task's evaluation split (test, or val for hymenoptera), computed when
    the job succeeded and stored with the checkpoint."""

    split: str = Field(description="test or val.", examples=["test"])
    dataset: str = Field(description="Dataset name (mnist, cifar10, hymenoptera).", examples=["cifar10"])
    classes: list[str] = Field(description="Class names, index order.", examples=[["ants", "bees"]])
    accuracy: float = Field(
        description="Fraction right: the job's final test (val) accuracy.", examples=[0.43]
    )
    confusion_matrix: list[list[int]] = Field(
        description="Counts, rows = true class, columns = predicted class (classes order).",
        examples=[[[70, 13], [20, 50]]],
    )
    per_class: list[ClassScores] = Field(description="Scores of each class, classes order.")
    mistakes: list[Mistake] = Field(
        description="The 25 most confident mistakes, most confident first (ties: lower index first)."
    )


class ModelPublic(BaseModel):
    """A checkpoint in the store."""

    id: str = Field(description="Model id.", examples=["mnist_lenet5-20261129-161500-5f2c1e0b"])
    task: str | None = Field(description="Task it was trained for.", examples=["mnist_lenet5"])
    valid: bool = Field(
        description="False if verification failed (see error); such a model is never loaded.", examples=[True]
    )
    error: str | None = Field(None, description="Why the checkpoint is invalid.", examples=[None])
    created_at: str | None = Field(
        None, description="When it was written (UTC, ISO 8601).", examples=["2026-11-29T16:15:00+00:00"]
    )
    size_bytes: int = Field(description="Size of the weights file, bytes.", examples=[247_000])
    classes: list[str] = Field(
        default_factory=list, description="Class names, index order.", examples=[["0", "1"]]
    )
    metrics: dict[str, Any] = Field(
        default_factory=dict,
        description="Final and per-epoch metrics of training.",
        examples=[{"final": {"epoch": 10, "test_accuracy": 0.9904}, "epochs": []}],
    )
    hyperparameters: dict[str, Any] = Field(
        default_factory=dict, description="Hyperparameters it was trained with.", examples=[{"epochs": 10}]
    )
    job_id: str | None = Field(
        None, description="Job that produced it.", examples=["5f2c1e0b9a7d4c3e8f1a2b3c4d5e6f70"]
    )
    device: str | None = Field(None, description="Device it was trained on.", examples=["cpu"])
    pretrained: dict[str, Any] | None = Field(
        None,
        description="Initial weights (hymenoptera_resnet18): name, file, sha256.",
        examples=[{"name": "none", "file": None, "sha256": None}],
    )
    sha256: str | None = Field(
        None,
        description="sha256 of the weights file.",
        examples=["3b0c9f1e5d2a4c6b8e7f9a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f"],
    )
    name: str | None = Field(
        None,
        description="Name its aliases live under: its dataset if it has one, else its task.",
        examples=["mnist_lenet5"],
    )
    aliases: list[str] = Field(
        default_factory=list, description="Aliases it carries (e.g. production).", examples=[["production"]]
    )
    evaluation: EvaluationPublic | None = Field(
        None,
        description=(
            "Confusion matrix, per-class precision/recall/F1 and the most confident mistakes of the final "
            "model on the evaluation split (null for checkpoints written before evaluations were stored)."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _from_checkpoint(cls, data: Any) -> Any:
        """A ``CheckpointInfo`` validates as its id, verification and metadata.json's fields
        (``aliases`` live in Redis, not with the checkpoint: the route adds them)."""
        if not isinstance(data, CheckpointInfo):
            return data
        meta = data.metadata
        return {
            "id": data.model_id,
            "task": meta.get("task"),
            "valid": data.valid,
            "error": data.error,
            "created_at": meta.get("created_at"),
            "size_bytes": data.size_bytes,
            "classes": meta.get("classes") or [],
            "metrics": meta.get("metrics") or {},
            "hyperparameters": meta.get("hyperparameters") or {},
            "job_id": meta.get("job_id"),
            "device": meta.get("device"),
            "pretrained": meta.get("pretrained"),
            "sha256": (meta.get("weights") or {}).get("sha256"),
            "name": model_name(meta),
            "evaluation": _evaluation(meta.get("evaluation")),
        }


def _evaluation(value: object) -> EvaluationPublic | None:
    """The stored evaluation, or None when there is none or it does not have the expected shape
    (metadata.json edited by hand)."""
    if value is None:
        return None
    try:
        return EvaluationPublic.model_validate(value)
    except ValidationError:
        return None


class ModelsPublic(BaseModel):
    """Checkpoints, newest first."""

    data: list[ModelPublic] = Field(description="The checkpoints on this page.", examples=[[]])
    count: int = Field(description="Checkpoints matching the filters, over all pages.", examples=[3])


class AliasPublic(BaseModel):
    """An alias of a model name, and the model it points at."""

    name: str = Field(
        description="Model name (task, or dataset of a custom model).", examples=["mnist_lenet5"]
    )
    alias: str = Field(description="The alias.", examples=["production"])
    model_id: str = Field(
        description="Model it points at now.", examples=["mnist_lenet5-20261129-161500-5f2c1e0b"]
    )
    previous_model_id: str | None = Field(
        None, description="Model it pointed at before (null if it is new).", examples=[None]
    )


class ClassProbability(BaseModel):
    """One class of a prediction."""

    index: int = Field(description="Class index (the model's output position).", examples=[7])
    label: str = Field(description="Class name.", examples=["7"])
    probability: float = Field(description="Softmax probability in [0, 1].", examples=[0.991])


class PredictForm(BaseModel):
    """The multipart form of ``POST /predict``: the image and how to choose its model. An empty
    field counts as absent (FastAPI's rule for forms; Swagger UI sends its empty fields)."""

    file: UploadFile = Field(description="The image: PNG, JPEG, GIF, TIFF, WebP or BMP, in any mode.")
    task: BuiltinTaskName | None = Field(
        None,
        description=(
            "Use the production (else the newest valid) model of this built-in task; models of "
            "uploaded datasets are chosen by `dataset` (or `model_id`)."
        ),
        examples=["mnist_lenet5"],
    )
    model_id: str | None = Field(
        None,
        max_length=128,
        pattern=MODEL_ID_PATTERN,
        description="Use this model (an id listed by GET /models); if task is given too, it must be the "
        "model's task.",
    )
    alias: str | None = Field(
        None,
        max_length=64,
        pattern=ALIAS_PATTERN,
        description="With task: the model carrying this alias, e.g. `production` (with task alone: "
        "`production` if set).",
    )
    dataset: str | None = Field(
        None,
        pattern=DATASET_ID_PATTERN,
        description="Use the newest valid model trained on this uploaded dataset (custom_resnet18).",
    )
    top_k: int = Field(5, ge=1, le=100, description="Classes to return (at most the model's).", examples=[5])
    invert: InvertChoice = Field(
        "auto",
        description="MNIST only: invert to white-on-black; `auto` inverts when the border is light.",
        examples=["auto"],
    )
    normalize: NormalizeChoice = Field(
        "auto",
        description=(
            "MNIST only: `auto` frames the digit as MNIST's were (ink box scaled into 20x20, centre of "
            "mass at the centre of 28x28), after inversion; `none` only resizes to 28x28."
        ),
        examples=["auto"],
    )


class PredictionPublic(BaseModel):
    """Top-k classes of one image, most probable first."""

    model_id: str = Field(description="Checkpoint used.", examples=["mnist_lenet5-20261129-161500-5f2c1e0b"])
    alias: str | None = Field(
        None,
        description="The alias that chose the model (null: model_id or newest).",
        examples=["production"],
    )
    task: TaskName = Field(description="Its task.", examples=["mnist_lenet5"])
    predictions: list[ClassProbability] = Field(description="Top-k classes; probabilities sum to <= 1.")
    inverted: bool | None = Field(
        None,
        description="MNIST only: whether the image was inverted to white-on-black before inference.",
        examples=[False],
    )
    image: dict[str, Any] = Field(
        description=(
            "The upload as decoded: width and height after its EXIF orientation, PIL mode before "
            "conversion, format, frames, JPEG scans; `exif`, `alpha` and `icc` notes when they applied."
        ),
        examples=[{"width": 28, "height": 28, "mode": "L"}],
    )
    framing: dict[str, Any] | None = Field(
        None,
        description=(
            "MNIST only: how the digit was framed as MNIST's were (normalize=auto): `applied`, and "
            "`bbox` [left, top, right, bottom) of the ink in the upload's pixels, `scale`, `offset` "
            "of the 20x20 box in 28x28, `center_of_mass` [x, y]; or `reason` when not applied."
        ),
        examples=[
            {
                "applied": True,
                "bbox": [3, 1, 25, 27],
                "scale": 0.7692,
                "offset": [5, 4],
                "center_of_mass": [14.1, 13.9],
            }
        ],
    )


class ErrorPublic(BaseModel):
    """An error: what was wrong, in words."""

    detail: str = Field(
        description="Why the request failed.", examples=["no job with id 5f2c1e0b9a7d4c3e8f1a2b3c4d5e6f70"]
    )


# An example of each status's body, so that Swagger never shows a 404's text for a 413.
ERROR_EXAMPLES: dict[int, str] = {
    400: "the request body is not valid JSON (UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff)",
    401: "missing API key: send 'Authorization: Bearer <key>'",
    404: "no job with id 5f2c1e0b9a7d4c3e8f1a2b3c4d5e6f70",
    409: "job 5f2c1e0b9a7d4c3e8f1a2b3c4d5e6f70 already ended: succeeded",
    413: "request body is larger than the limit of 1048576 bytes (the limit of a JSON request)",
    414: "the URL is 9000 bytes (path and query), over the limit of 8192 bytes; send large inputs in "
    "the request body",
    415: "Content-Encoding gzip is not supported: send the body uncompressed (identity)",
    422: "give either task or model_id",
    500: "the stored record of job 5f2c1e0b9a7d4c3e8f1a2b3c4d5e6f70 is unreadable; the other jobs are "
    "unaffected",
    503: "Redis at redis://127.0.0.1:6379/0 is unreachable (ConnectionError); retry later.",
}
# Headers that come with a status wherever it is sent.
ERROR_HEADERS: dict[int, dict[str, dict]] = {
    401: {
        "WWW-Authenticate": {
            "description": "`Bearer`: the authentication scheme to use.",
            "schema": {"type": "string", "examples": ["Bearer"]},
        }
    },
    503: {
        "Retry-After": {
            "description": "Seconds to wait before retrying.",
            "schema": {"type": "string", "examples": ["5"]},
        }
    },
}


def error_responses(**codes: str | tuple[str, str]) -> dict[int | str, dict]:
    """OpenAPI ``responses`` entries with the ErrorPublic body, e.g. ``error_responses(_404="No such
    job.")`` or, with an example body of that operation, ``_404=("No such model.", "no model ...")``.

    Each status gets an example of its own (``ERROR_EXAMPLES`` unless given) and its headers
    (``ERROR_HEADERS``: WWW-Authenticate on 401, Retry-After on 503).
    """
    responses: dict[int | str, dict] = {}
    for code, value in codes.items():
        status_code = int(code.lstrip("_"))
        text, example = value if isinstance(value, tuple) else (value, ERROR_EXAMPLES.get(status_code))
        entry: dict[str, Any] = {"model": ErrorPublic, "description": text}
        if example:
            entry["content"] = {"application/json": {"example": {"detail": example}}}
        if status_code in ERROR_HEADERS:
            entry["headers"] = ERROR_HEADERS[status_code]
        responses[status_code] = entry
    return responses


class HealthPublic(BaseModel):
    """Liveness."""

    status: Literal["ok"] = Field("ok", description="The API process is up.", examples=["ok"])


class ReadyPublic(BaseModel):
    """Readiness: Redis reachable, and which workers are alive."""

    status: Literal["ready", "unavailable"] = Field(
        description="`ready` when Redis answers.", examples=["ready"]
    )
    redis: str = Field(description="`ok` or the connection error.", examples=["ok"])
    workers: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Live Celery workers.",
        examples=[[{"name": "worker1@host", "queue": "training", "device": "auto"}]],
    )
