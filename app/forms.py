"""Multipart forms whose file parts are files, however the client labels them.

Starlette treats a part as a file only if its Content-Disposition has ``filename=``. A part sent
without one (``curl -F 'file=<img.png'``) or with only ``filename*=`` (RFC 5987 style) would
become a text field: FastAPI then refused it with a 422 that echoed the whole upload, or Starlette
with a 400 once it passed its hidden 1 MB text-field limit. ``FileFormRoute`` makes the named
file fields (``file``) files in every case; the route's form limits come from the app
(``FastAPI(form_limits=...)``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine
from contextlib import aclosing
from typing import Any
from urllib.parse import unquote

from fastapi import HTTPException
from fastapi.routing import APIRoute
from python_multipart.multipart import parse_options_header
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

FILE_FIELDS = frozenset({"file"})
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
        return await super()._get_form(
            max_files=max_files, max_fields=max_fields, max_part_size=max_part_size
        )


class FileFormRoute(APIRoute):
    """Route class for endpoints with ``File`` parameters: see the module docstring."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def file_fields_handler(request: Request) -> Response:
            return await handler(FileFieldsRequest(request.scope, request.receive))

        return file_fields_handler
