"""The HTTP service: FastAPI app around a Predictor. Bad input gets a 4xx JSON error, never a 500.

POST /v1/score   multipart form with one or more `files` (or a raw application/dicom body) -> JSON
POST /v1/sr      one DICOM file -> its DICOM Structured Report (application/dicom)
GET  /health     the process is up;  GET /ready  the model is loaded (provider in use)
GET  /v1/model   the package's model.json;  /docs  OpenAPI
GET  /worklist   the radiologist's worklist page (files scored by /v1/score; see worklist.py)
"""

from __future__ import annotations

import hmac
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from medtriage import __version__
from medtriage.errors import MedTriageError
from medtriage.serve.predictor import Predictor, Rejection, Score
from medtriage.serve.worklist import DEFAULT_CAPACITY, PAGE_PATH, Worklist, worklist_router

log = logging.getLogger(__name__)
RAW_TYPES = {"", "application/dicom", "application/octet-stream"}  # a body that is one DICOM file
# Endpoints read the body themselves (size limit, raw or multipart); this documents it for /docs.
UPLOAD_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "application/dicom": {"schema": {"type": "string", "format": "binary"}},
}}}
# The worklist page is static HTML; the data it fetches carries the token like any other client.
OPEN_PATHS = {"/health", "/ready", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc", PAGE_PATH}


class RequestError(Exception):
    """A request we refuse, with its HTTP status and a JSON body a client can act on."""

    def __init__(self, status: int, reason: str, hint: str | None = None, **extra):
        super().__init__(reason)
        self.status, self.body = status, {"error": {"reason": reason, "hint": hint, **extra}}


def error_response(status: int, reason: str, hint: str | None = None, **extra) -> JSONResponse:
    return JSONResponse(RequestError(status, reason, hint, **extra).body, status_code=status)


def create_app(predictor: Predictor, token: str | None = None, max_bytes: int = 256 * 1024 * 1024,
               worklist_size: int = DEFAULT_CAPACITY) -> FastAPI:
    app = FastAPI(title="MedTriage", version=__version__,
                  description=f"Triage scores from {predictor.package.describe()}: decision support, not diagnosis.")
    _add_guards(app, token, max_bytes)
    _add_error_handlers(app)
    worklist = Worklist(predictor, capacity=worklist_size)
    _add_routes(app, predictor, max_bytes, worklist)
    app.include_router(worklist_router(worklist))
    return app


def _add_guards(app: FastAPI, token: str | None, max_bytes: int) -> None:
    @app.middleware("http")
    async def guard(request: Request, call_next):
        if token and request.url.path not in OPEN_PATHS and not _authorised(request, token):
            return JSONResponse({"error": {"reason": "missing or wrong bearer token",
                                           "hint": "send 'Authorization: Bearer <token>'"}},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_bytes:
            return error_response(413, f"request body of {int(length)} bytes exceeds the limit of {max_bytes}",
                                  "send fewer or smaller files per request")
        return await call_next(request)


def _authorised(request: Request, token: str) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError):
        return JSONResponse(err.body, status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        return error_response(422, "invalid request", errors=[str(e.get("msg")) for e in err.errors()])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        return error_response(err.status_code, str(err.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error_response(500, f"internal error ({type(err).__name__}); the service keeps running")


def _add_routes(app: FastAPI, predictor: Predictor, max_bytes: int, worklist: Worklist) -> None:
    package = predictor.package

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    def ready() -> dict:
        return {"ready": True, "provider": predictor.provider, "model": package.identity()}

    @app.get("/v1/model")
    def model() -> dict:
        return package.meta

    @app.post("/v1/score", summary="Score DICOM files (multipart field `files`, or one application/dicom body)",
              openapi_extra=UPLOAD_BODY)
    async def score(request: Request) -> JSONResponse:
        uploads = await _uploads(request, max_bytes)
        outcomes = [await run_in_threadpool(worklist.score_or_reject, data, name) for name, data in uploads]
        scores = [s for o in outcomes if not isinstance(o, Rejection) for s in o]
        rejected = [o.as_dict() for o in outcomes if isinstance(o, Rejection)]
        body = {"model": {**package.identity(), "provider": predictor.provider},
                "results": [s.as_dict() for s in scores], "rejected": rejected}
        if scores:
            return JSONResponse(body)
        # A request whose every file is unusable is itself bad input.
        error = {"reason": f"no file could be scored: {rejected[0]['reason']}", "hint": "see 'rejected' for each file"}
        return JSONResponse({"error": error, **body}, status_code=422)

    @app.post("/v1/sr", summary="One DICOM file -> a DICOM Structured Report with its triage result",
              response_class=Response, responses={200: {"content": {"application/dicom": {}}}}, openapi_extra=UPLOAD_BODY)
    async def structured_report(request: Request) -> Response:
        uploads = await _uploads(request, max_bytes)
        if len(uploads) != 1:
            raise RequestError(400, f"send exactly one file, got {len(uploads)}")
        name, data = uploads[0]
        outcome = await run_in_threadpool(predictor.score_or_reject, data, name)
        if isinstance(outcome, Rejection):
            raise RequestError(422, outcome.reason, file=name, type=outcome.error)
        return Response(await run_in_threadpool(_sr_bytes, data, outcome, predictor), media_type="application/dicom")


def _sr_bytes(data: bytes, scores: list[Score], predictor: Predictor) -> bytes:
    from medtriage.serve.dicom_results import sr_bytes

    try:
        return sr_bytes(data, scores, predictor.package)
    except MedTriageError as err:
        raise RequestError(422, f"scored, but no SR could be built: {err.reason}") from err


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The body, counted as it streams in (a chunked upload has no Content-Length to check first)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise RequestError(413, f"request body exceeds the limit of {max_bytes} bytes", "send fewer or smaller files per request")
        chunks.append(chunk)
    return b"".join(chunks)


async def _uploads(request: Request, max_bytes: int) -> list[tuple[str, bytes]]:
    """(name, bytes) of each uploaded file; empty or malformed requests are 400s."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        uploads = await _multipart_files(request, max_bytes)
    elif content_type in RAW_TYPES:
        body = await _read_body(request, max_bytes)
        uploads = [("<body>", body)] if body else []
    else:
        raise RequestError(415, f"unsupported content type '{content_type}'",
                           "send multipart/form-data with 'files' fields, or one file as application/dicom")
    if not uploads:
        raise RequestError(400, "no file in the request",
                           "POST multipart/form-data with one or more 'files' fields, or a DICOM file as the body")
    empty = [name for name, data in uploads if not data]
    if len(empty) == len(uploads):
        raise RequestError(400, f"every uploaded file is empty: {', '.join(empty)}")
    return uploads


async def _multipart_files(request: Request, max_bytes: int) -> list[tuple[str, bytes]]:
    body = await _read_body(request, max_bytes)
    try:
        form = await _parse_form(request, body)
    except RequestError:
        raise
    except Exception as err:  # python-multipart raises several kinds on malformed input
        raise RequestError(400, f"malformed multipart body ({type(err).__name__}: {err})") from err
    files = []
    for _, value in form.multi_items():
        if isinstance(value, UploadFile):
            files.append((value.filename or "<upload>", await value.read()))
    return files


async def _parse_form(request: Request, body: bytes):
    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    return await Request(request.scope, replay).form(max_files=10_000, max_part_size=len(body) + 1)
