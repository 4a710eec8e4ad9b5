"""Multipart forms whose file parts are files, however the client labels them.

Starlette treats a part as a file only if its Content-Disposition has ``filename=``. A part sent
without one (``curl -F 'file=<img.png'``) or with only ``filename*=`` (RFC 5987 style) would
become a text field: FastAPI then refused it with a 422 that echoed the whole upload, or Starlette
with a 400 once it passed its hidden 1 MB text-field limit. ``FileFormRoute`` makes the named
file fields (``file``) files in every case. ``read_form`` validates a form as one pydantic model,
within the app's limits (``app.state.form_limits``, from ``form_limits``).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import aclosing, asynccontextmanager
from typing import Any, TypeVar
from urllib.parse import unquote

from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

FILE_FIELDS = frozenset({"file"})
# Multipart forms: a text field may be as large as a file; few parts.
FORM_MAX_FILES = 4
FORM_MAX_FIELDS = 32
FormModel = TypeVar("FormModel", bound=BaseModel)
# nginx's "client closed request": the client is gone, so nobody reads it; the HTTP metrics count it
# apart from the 400s of malformed bodies
CLIENT_CLOSED_REQUEST = 499
_FILENAME_STAR = re.compile(rb"filename\*\s*=\s*(?:[\w!#$%&+^`{}~-]+)?'[^']*'([^;\s]*)", re.IGNORECASE)


def _filename_from_star(disposition: bytes) -> str:
    """The file name of a ``filename*=charset'lang'percent-encoded`` parameter, or "upload"."""
    match = _FILENAME_STAR.search(disposition)
    if not match:
        return "upload"
    name = unquote(match.group(1).decode("latin-1"), errors="replace").replace('"', "")
    return name or "upload"


class FileFieldsParser(MultiPartParser):
    """Starlette's parser, except that parts named in ``FILE_FIELDS`` are always files."""

    def on_headers_finished(self) -> None:
        disposition = self._current_part.content_disposition or b""
        _, options = parse_options_header(disposition)
        if b"filename" not in options and options.get(b"name", b"").decode("latin-1") in FILE_FIELDS:
            name = _filename_from_star(disposition).encode("latin-1", "replace")
            self._current_part.content_disposition = disposition + b'; filename="' + name + b'"'
        super().on_headers_finished()


class FileFieldsRequest(Request):
    """A request whose multipart form is parsed by ``FileFieldsParser`` (same limits, same errors)."""

    async def _get_form(
        self,
        *,
        max_files: int | float = 1000,
        max_fields: int | float = 1000,
        max_part_size: int = 1024 * 1024,
    ):
        if self._form is None:
            content_type, _ = parse_options_header(self.headers.get("Content-Type"))
            if content_type == b"multipart/form-data":
                try:
                    async with aclosing(self.stream()) as stream:
                        parser = FileFieldsParser(
                            self.headers,
                            stream,
                            max_files=max_files,
                            max_fields=max_fields,
                            max_part_size=max_part_size,
                        )
                        self._form = await parser.parse()
                except ClientDisconnect:  # the upload was cut off: nobody will read an answer
                    raise HTTPException(
                        CLIENT_CLOSED_REQUEST, "the client closed the connection before the upload ended"
                    ) from None
                except MultiPartException as exc:
                    if exc.message.startswith("Part exceeded"):
                        raise HTTPException(
                            413,
                            f"a form field is larger than the limit of {max_part_size} bytes "
                            "(MAX_UPLOAD_BYTES); send the image as the file part",
                        ) from None
                    raise HTTPException(400, f"the multipart form is invalid: {exc.message}") from None
        try:  # any other body (urlencoded, none): Starlette's parsing
            return await super()._get_form(
                max_files=max_files, max_fields=max_fields, max_part_size=max_part_size
            )
        except ClientDisconnect:
            raise HTTPException(
                CLIENT_CLOSED_REQUEST, "the client closed the connection before the body ended"
            ) from None


class FileFormRoute(APIRoute):
    """Route class for endpoints that read multipart forms with files: see the module docstring."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def file_fields_handler(request: Request) -> Response:
            return await handler(FileFieldsRequest(request.scope, request.receive))

        return file_fields_handler


def form_limits(max_upload_bytes: int) -> dict[str, int]:
    """Starlette's multipart limits for the forms ``read_form`` reads (``app.state.form_limits``):
    parts of at most ``max_upload_bytes`` (MAX_UPLOAD_BYTES), few files and fields."""
    return {"max_part_size": max_upload_bytes, "max_files": FORM_MAX_FILES, "max_fields": FORM_MAX_FIELDS}


@asynccontextmanager
async def read_form(request: Request, model: type[FormModel]) -> AsyncIterator[FormModel]:
    """The request's multipart form (parsed within ``app.state.form_limits``) validated as
    ``model`` in one pydantic call, and closed (its spooled files) when the block ends: what
    FastAPI does for ``Form()`` parameters, at a fraction of its per-field cost (10-15 % of the CPU
    of a LeNet-5 ``/predict``: bench/README.md, "Fourth round").

    Raises ``HTTPException`` 422 for an unknown or repeated field, ``RequestValidationError``
    (FastAPI's 422 list, ``loc`` ``["body", field]``) for invalid fields, and the parser's
    400/413/499 (``FileFieldsRequest``)."""
    form = await request.form(**request.app.state.form_limits)
    try:
        check_form_fields(form, tuple(model.model_fields))
        values = {name: value for name, value in form.multi_items() if not _is_empty(value)}
        try:
            validated = model.model_validate(values)
        except ValidationError as exc:
            errors = [_body_error(error) for error in exc.errors(include_url=False)]
            raise RequestValidationError(errors) from None
        yield validated
    finally:
        await form.close()


def _is_empty(value: str | UploadFile) -> bool:
    """An empty field counts as absent (FastAPI's rule for forms): an empty text, or a file part
    with no name and no bytes (what a browser sends for a file input left empty)."""
    if isinstance(value, str):
        return value == ""
    return not value.filename and value.size == 0


def _body_error(error: dict) -> dict:
    """A pydantic error of a form field as FastAPI reports it: under ``body``, and a missing
    field's ``input`` is null (pydantic's would be the whole form, files included)."""
    error = {**error, "loc": ("body", *error["loc"])}
    if error["type"] == "missing":
        error["input"] = None
    return error


def check_form_fields(form: FormData, fields: tuple[str, ...]) -> None:
    """422 for an unknown field (a typo such as ``topk`` would otherwise be ignored) or a repeated
    one. An empty field counts as absent (FastAPI's rule for forms; Swagger UI sends its empty
    fields), and the OpenAPI document says so."""
    unknown = sorted({name for name in form if name not in fields})
    if unknown:
        raise HTTPException(422, f"unknown form field(s) {', '.join(unknown)}; expected {', '.join(fields)}")
    repeated = sorted({name for name in form if len(form.getlist(name)) > 1})
    if repeated:
        raise HTTPException(422, f"form field(s) given twice: {', '.join(repeated)}")
