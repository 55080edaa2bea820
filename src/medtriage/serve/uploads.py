"""The files of a scoring request as they arrive: spooled (in memory up to SPOOL_IN_MEMORY, then on disk) and
bounded before they are kept: body bytes, file count, the form's other fields, pauses and a minimum rate. A request
refused on the way is a RequestError, answered with its status and a JSON body a client can act on.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from contextlib import asynccontextmanager

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

log = logging.getLogger(__name__)
RAW_TYPES = {"", "application/dicom", "application/octet-stream"}  # a body that is one DICOM file
SPOOL_IN_MEMORY = 1024 * 1024  # bytes of an upload kept in memory before it spills to a temporary file
BODY_IDLE_S = 30.0  # seconds an upload may pause between body chunks before it is dropped (408)
# A trickle (a byte every few seconds) never pauses that long yet would hold its place for hours: after a grace
# period a body must average a minimum rate, as Apache's mod_reqtimeout asks (its default is 500 bytes/s).
BODY_GRACE_S = 30.0
BODY_MIN_RATE = 32 * 1024  # bytes per second: a 10 MB radiograph may take 5 minutes
# Form fields other than files are kept in memory while the request waits for its slot, and the service reads none.
FORM_FIELD_BYTES = 64 * 1024


class RequestError(Exception):
    """A request we refuse, with its HTTP status and a JSON body a client can act on."""

    def __init__(self, status: int, reason: str, hint: str | None = None, **extra):
        super().__init__(reason)
        self.status, self.body = status, {"error": {"reason": reason, "hint": hint, **extra}}


class Upload:
    """One uploaded file as it arrived: a spooled temporary file (memory up to 1 MB, then disk) and its size."""

    def __init__(self, file, size: int):
        self.file, self.size = file, size


def read_upload(upload: Upload) -> bytes:
    upload.file.seek(0)
    return upload.file.read()


def uploads_size(uploads: list[tuple[str, Upload]]) -> int:
    return sum(upload.size for _, upload in uploads)


class _BodyCounter:
    """The request's receive channel, counting body bytes: a chunked upload has no Content-Length to check first."""

    def __init__(self, receive, max_bytes: int):
        self.receive, self.max_bytes, self.size = receive, max_bytes, 0
        self.started: float | None = None
        self.complete = False

    async def __call__(self):
        if self.complete:  # later reads only wait for a disconnect
            return await self.receive()
        now = time.monotonic()
        self.started = self.started or now
        rate_left = self.started + BODY_GRACE_S + self.size / BODY_MIN_RATE - now
        try:  # a client that stops sending (crashed, cable pulled: no FIN) would hold its place in the queue for good
            message = await asyncio.wait_for(self.receive(), max(0.0, min(BODY_IDLE_S, rate_left)))
        except asyncio.TimeoutError:
            raise self._too_slow(idle=BODY_IDLE_S <= rate_left) from None
        if message["type"] == "http.request":
            self.size += len(message.get("body", b""))
            self.complete = not message.get("more_body", False)
            if self.size > self.max_bytes:
                raise RequestError(
                    413, f"request body exceeds the limit of {self.max_bytes} bytes", "send fewer or smaller files per request"
                )
        return message

    def _too_slow(self, idle: bool) -> RequestError:
        if idle:
            return RequestError(
                408,
                f"no request body bytes for {BODY_IDLE_S:g} s (after {self.size} bytes)",
                "send the whole body without pausing, then retry",
            )
        elapsed = time.monotonic() - (self.started or 0.0)
        return RequestError(
            408,
            f"the request body arrived too slowly: {self.size} bytes in {elapsed:.0f} s, under the minimum of "
            f"{BODY_MIN_RATE} bytes/s after the first {BODY_GRACE_S:g} s",
            "send from a faster link, or fewer files per request",
        )


@asynccontextmanager
async def received_uploads(request: Request, max_bytes: int, max_files: int):
    """(name, Upload) of each uploaded file, streamed to temporary files and closed afterwards; empty or
    malformed requests are 400s."""
    opened: list = []
    try:
        uploads = await _received_files(request, max_bytes, max_files, opened)
        if not uploads:
            raise RequestError(
                400, "no file in the request", "POST multipart/form-data with one or more 'files' fields, or a DICOM file as the body"
            )
        empty = [name for name, upload in uploads if not upload.size]
        if len(empty) == len(uploads):
            raise RequestError(400, f"every uploaded file is empty: {', '.join(empty)}", "attach each file's contents, not only its name")
        yield uploads
    finally:
        for handle in opened:
            handle.close()


async def _received_files(request: Request, max_bytes: int, max_files: int, opened: list) -> list[tuple[str, Upload]]:
    """The request body's files, spooled as they arrive; each spool is listed in `opened` for the caller to close."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    counted = Request(request.scope, _BodyCounter(request.receive, max_bytes))
    try:
        if content_type == "multipart/form-data":
            return await _multipart_files(counted, max_bytes, max_files, opened)
        if content_type in RAW_TYPES:
            return await _raw_file(counted, opened)
    except ClientDisconnect:  # the answer goes nowhere; a client that hung up is not an error of the service
        raise RequestError(
            400, "the client closed the connection before the whole body arrived", "send the whole body, then wait for the answer"
        ) from None
    except OSError as err:  # spooling to the temporary folder failed (full, removed): the service's fault, not the body's
        log.error("an upload could not be spooled to the temporary folder: %s", err)
        raise RequestError(
            503,
            f"the upload could not be stored by the service ({err.strerror or type(err).__name__})",
            "retry later; if it persists, the service's operator should check its temporary folder (free space, TMPDIR)",
        ) from None
    raise RequestError(
        415,
        f"unsupported content type '{content_type}'",
        "send multipart/form-data with 'files' fields, or one file as application/dicom",
    )


async def _raw_file(request: Request, opened: list) -> list[tuple[str, Upload]]:
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
    opened.append(spool)
    async for chunk in request.stream():
        spool.write(chunk)
    size = spool.tell()
    return [("<body>", Upload(spool, size))] if size else []


class _SpoolingParser(MultiPartParser):
    """Starlette's parser keeps each file part in memory up to 1 MB, so a request of many smaller files (a CT series)
    would wait for its slot whole in memory; here the parts that begin after the request's first SPOOL_IN_MEMORY
    bytes go straight to disk. Every spooled file is also listed in `opened`, so a refused request closes them."""

    def __init__(self, request: Request, counter: _BodyCounter, opened: list, **limits):
        super().__init__(request.headers, request.stream(), **limits)
        self.counter, self.opened, self.field_bytes = counter, opened, 0

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current_part.file is None:  # a field: Starlette bounds each one, not what they hold together
            self.field_bytes += end - start
            if self.field_bytes > FORM_FIELD_BYTES:
                raise RequestError(
                    413,
                    f"the form's fields other than files exceed {FORM_FIELD_BYTES} bytes",
                    "send each DICOM file as a 'files' part with a filename; the service reads no other fields",
                )
        super().on_part_data(data, start, end)

    def on_headers_finished(self) -> None:
        try:
            super().on_headers_finished()
        except MultiPartException:
            if self._current_files > self.max_files:  # Starlette stops before opening the file
                raise _too_many_files(self.max_files) from None
            raise
        upload = self._current_part.file
        if upload is not None:
            self.opened.append(upload.file)
            if self.counter.size > SPOOL_IN_MEMORY:
                upload.file.rollover()


def _too_many_files(limit: int) -> RequestError:
    if limit == 1:
        return RequestError(400, "send exactly one file, got more", "POST several files to /v1/score, or one at a time here")
    return RequestError(413, f"more than {limit} files in one request", f"send at most {limit} files per request")


async def _multipart_files(request: Request, max_bytes: int, max_files: int, opened: list) -> list[tuple[str, Upload]]:
    try:
        parser = _SpoolingParser(request, request.receive, opened, max_files=max_files, max_part_size=min(max_bytes, SPOOL_IN_MEMORY))
        form = await parser.parse()
    except (RequestError, ClientDisconnect, OSError):  # OSError: the spool's disk, not the body
        raise
    except Exception as err:  # python-multipart raises several kinds on malformed input
        cause = f"; {err.__cause__}" if err.__cause__ else ""  # Starlette's "Invalid multipart data" hides which limit
        raise RequestError(
            400,
            f"malformed multipart body ({type(err).__name__}: {err}{cause})",
            "send multipart/form-data with its boundary and one 'files' part per file, or one file as application/dicom",
        ) from err
    files = []
    for _, value in form.multi_items():
        if isinstance(value, UploadFile):  # its file is in `opened` already
            value.file.seek(0, 2)
            files.append((value.filename or "<upload>", Upload(value.file, value.file.tell())))
    return files
