"""The HTTP service: FastAPI app around a Predictor. Bad input gets a 4xx JSON error, never a 500.

POST /v1/score   multipart form with one or more `files` (or a raw application/dicom body) -> JSON
POST /v1/sr      one DICOM file -> its DICOM Structured Report (application/dicom)
GET  /health     the process is up;  GET /ready  the model is loaded (provider in use)
GET  /v1/model   the package's model.json;  /docs and /redoc  the API described (their scripts served here: no CDN)
GET  /worklist   the radiologist's worklist page (files scored by /v1/score; see worklist.py); GET / leads there
GET  /metrics    Prometheus metrics;  GET /v1/drift  input drift per source (`X-Source` header; see metrics.py)

Published by a reverse proxy under a path prefix (`serve --root-path`), the pages name what they load relative to
themselves, and redirects carry the root path.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import ipaddress
import logging
import re
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit

import fastapi_offline
import h11
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from medtriage import __version__
from medtriage.errors import ConfigError, ImageTooLargeError, MedTriageError
from medtriage.serve.admission import LARGE_REQUEST, Admission, release_memory
from medtriage.serve.metrics import SOURCE_HEADER, ServiceMonitor, monitoring_router
from medtriage.serve.node.store import NodeStore
from medtriage.serve.predictor import Predictor, Rejection, Score
from medtriage.serve.report import result_document
from medtriage.serve.uploads import RequestError, Upload, read_upload, received_uploads, uploads_size
from medtriage.serve.worklist import DEFAULT_CAPACITY, PAGE_PATH, Worklist, WorklistWriteError, inline_hashes, worklist_router

log = logging.getLogger(__name__)
# Endpoints read the body themselves (size limit, raw or multipart); this documents it for /docs.
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}
            },
            "application/dicom": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
# What every refusal looks like, for /docs: `reason` says what went wrong, `hint` what to do; some add fields (file, type).
ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["reason"],
            "properties": {"reason": {"type": "string"}, "hint": {"type": ["string", "null"]}},
            "additionalProperties": True,
        }
    },
}
ERROR = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
UPLOAD_ERRORS = {
    400: {"description": "no file, every file empty, a malformed multipart body, or more than one file to /v1/sr", **ERROR},
    408: {"description": "the body paused or trickled (see the service's limits)", **ERROR},
    413: {"description": "the body, its number of files or an image is over the limits", **ERROR},
    415: {"description": "neither multipart/form-data nor application/dicom", **ERROR},
    422: {"description": "no file could be scored (each file's reason under 'rejected')", **ERROR},
    500: {"description": "an error of the service itself, e.g. the worklist could not record a scored file", **ERROR},
    503: {
        "description": "busy or stopping (retry after the seconds in Retry-After), or the upload could not be stored",
        **ERROR,
    },
}
# The API description pages' script, style sheet and icon, served from the installed fastapi-offline package: hospital
# networks are often offline, where a page whose script comes from a CDN stays blank. The pages name them with that
# package's version, so that a browser may keep them (DOCS_ASSET_CACHE) and still loads new ones after an upgrade.
DOCS_ASSETS = "/docs/assets"
DOCS_VERSION = metadata.version("fastapi-offline")
DOCS_ASSET_CACHE = b"public, max-age=31536000, immutable"
DOCS_FILES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}
DOCS_ASSET_PATHS = {f"{DOCS_ASSETS}/{name}" for name in DOCS_FILES}
# The worklist page is static HTML; the data it fetches carries the token like any other client. `/` only leads there.
OPEN_PATHS = {"/", "/health", "/ready", "/docs", "/openapi.json", "/redoc", PAGE_PATH, *DOCS_ASSET_PATHS}
# Every file part past the request's first SPOOL_IN_MEMORY bytes is an open temporary file until the answer.
MAX_FILES = 1000
TOO_LARGE = ImageTooLargeError.__name__
RETRY_HINT = "retry; if it happens again, the service's log holds the details"
STOPPING_RETRY_AFTER = "10"  # seconds: a restarted service loads its model before it listens again


def error_response(status: int, reason: str, hint: str | None = None, **extra) -> JSONResponse:
    return JSONResponse(RequestError(status, reason, hint, **extra).body, status_code=status)


def create_app(
    predictor: Predictor,
    token: str | None = None,
    max_bytes: int = 256 * 1024 * 1024,
    max_files: int = MAX_FILES,
    worklist_size: int = DEFAULT_CAPACITY,
    admission: Admission | None = None,
    state: str | NodeStore | None = None,
    loopback_hosts_only: bool = False,
) -> FastAPI:
    """The service. `admission` bounds concurrent work (default: one worker per core, 64 waiting); `token`, when
    given, is the bearer token every closed route requires; `state`, the worklist's store (as Worklist takes it);
    `loopback_hosts_only`, answer only requests whose Host names this machine (`is_loopback_host`): a service on
    loopback without a token would otherwise serve any web page whose domain is re-pointed at 127.0.0.1 (DNS
    rebinding), since the browser then takes that page for the service's own."""
    _check_token(token)
    app = FastAPI(
        title="MedTriage",
        version=__version__,
        description=f"Triage scores from {predictor.package.describe()}: decision support, not diagnosis.",
        docs_url=None,  # FastAPI's own pages load their scripts from a CDN: _add_docs serves them here
        redoc_url=None,
    )
    app.state.admission = admission or Admission()
    _add_error_handlers(app)
    app.state.monitor = ServiceMonitor(predictor.package)
    # a DICOM node's state folder, or memory; rows from a source the monitor finds drifting are marked
    worklist = Worklist(predictor, capacity=worklist_size, store=state, drift=app.state.monitor.drift)
    _add_routes(app, predictor, max_bytes, max_files, worklist)
    _add_docs(app)
    app.include_router(worklist_router(worklist, app.state.admission))
    app.include_router(monitoring_router(app.state.monitor))
    app.add_middleware(
        Guard,
        token=token,
        max_bytes=max_bytes,
        admission=app.state.admission,
        monitor=app.state.monitor,
        loopback_hosts_only=loopback_hosts_only,
    )
    app.openapi = _openapi_with_errors_and_auth(app, token is not None, loopback_hosts_only)
    return app


def _check_token(token: str | None) -> None:
    """An empty token would turn the check off, and one with white space around it could never match what a client
    sends (the header's value is stripped)."""
    if token is not None and (not token or token != token.strip()):
        raise ConfigError(
            "the bearer token is empty or begins or ends with white space",
            where="token",
            hint="use one long random line without spaces around it (and no token only where another layer guards the service)",
        )


def _openapi_with_errors_and_auth(app: FastAPI, bearer: bool, loopback_hosts_only: bool = False):
    """FastAPI's schema, plus what the routes' own code decides: the JSON error body (also in place of FastAPI's
    validation error, which the service never sends), with a token, the bearer scheme on every closed route, and
    with `loopback_hosts_only`, the 421 of every route."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        components = schema.setdefault("components", {})
        components.setdefault("schemas", {})["Error"] = ERROR_SCHEMA
        for name in ("HTTPValidationError", "ValidationError"):
            components["schemas"].pop(name, None)
        if bearer:
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, operations in schema["paths"].items():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                if "422" in responses:
                    responses["422"] = {"description": responses["422"].get("description", "invalid request"), **ERROR}
                for status, response in responses.items():  # a route names its refusals; their body is the one Error
                    if status[0] in "45" and "content" not in response:
                        response.update(ERROR)
                if "{" in path:
                    responses.setdefault("404", {"description": "no such entry", **ERROR})
                if path not in OPEN_PATHS:
                    responses.setdefault("403", {"description": "a request made by another site's page (Sec-Fetch-Site)", **ERROR})
                if loopback_hosts_only:
                    responses.setdefault("421", {"description": "a Host header that names no loopback address (DNS rebinding)", **ERROR})
                if bearer and path not in OPEN_PATHS:
                    operation["security"] = [{"bearer": []}]
                    responses.setdefault("401", {"description": "missing or wrong bearer token", **ERROR})
        return schema

    return openapi


# medtriage_refused_total{reason}, by status
REFUSAL_REASONS = {401: "unauthorised", 403: "cross_site", 413: "too_large", 421: "wrong_host", 503: "busy"}
# What a browser says (Sec-Fetch-Site) of a request another site's page made. Without a token (loopback), such a page
# could otherwise post forged studies into the worklist, or flood an in-memory one until it forgets real studies; its
# own page's requests are `same-origin`, and no route allows another origin's script (no CORS).
OTHER_SITES = {"cross-site", "same-site"}
# A Host header's name and optional port; an IPv6 address comes in brackets.
HOST_HEADER = re.compile(r"(?:\[(?P<ipv6>[0-9a-f:.]+)\]|(?P<name>[^:\[\]]+))(?::[0-9]*)?")


def is_loopback_host(value: str) -> bool:
    """Whether a Host header names this machine: `localhost`, an address of 127.0.0.0/8 or `[::1]`, with or without a
    port, in any case. A name an attacker controls may resolve to 127.0.0.1 too, but its page is then no page of ours."""
    match = HOST_HEADER.fullmatch(value.strip().lower())
    if match is None:
        return False
    if match["name"] == "localhost":
        return True
    try:
        address = ipaddress.IPv6Address(match["ipv6"]) if match["ipv6"] else ipaddress.IPv4Address(match["name"])
    except ValueError:
        return False  # a host name other than localhost, or no address at all
    return address.is_loopback


def _is_heavy(method: str, path: str) -> bool:
    """Requests that decode or run the model: they pass admission (503 when the queue is full)."""
    return (method == "POST" and path in ("/v1/score", "/v1/sr")) or (method == "GET" and path.endswith("/overlay.png"))


class Guard:
    """Plain ASGI middleware in front of every route: the bearer token, requests of other sites' pages, the declared
    body size, admission of heavy requests, and the headers of every answer (`_Answer`). It also answers a route's unexpected error
    itself: Starlette's own 500 handler sits outside every middleware, so its answer would lack those headers; and it
    counts it, so that the service's own failures show on /metrics."""

    def __init__(
        self, app, token: str | None, max_bytes: int, admission: Admission, monitor: ServiceMonitor, loopback_hosts_only: bool = False
    ):
        self.app, self.token, self.max_bytes, self.admission = app, token, max_bytes, admission
        self.loopback_hosts_only = loopback_hosts_only
        self.refused = monitor.refused  # by reason: an overloaded or misconfigured client shows on /metrics
        self.count_failure = monitor.count_failure

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = answer = _Answer(send, cacheable=route_path(scope) in DOCS_ASSET_PATHS)
        if scope["method"] == "HEAD":  # RFC 9110: a HEAD is answered as its GET would be, without the body
            scope, send = {**scope, "method": "GET"}, _no_body(answer)
        try:
            await self._guarded(scope, receive, send)
        except asyncio.CancelledError:
            # A stop cut the request off (--stop-timeout): a client still waiting learns to send it again, not uvicorn's
            # plain 500 (one that hung up is sent nothing). Raised on, so the stop goes on and logs it (CutOffRequests).
            if not answer.started:
                await stopping_response()(scope, receive, send)
            raise
        except Exception as err:
            self.count_failure(err)
            if answer.started:  # too late for an error body: the server drops the connection
                raise
            log.exception("unexpected error on %s", route_path(scope))
            await internal_error(err)(scope, receive, send)

    async def _guarded(self, scope, receive, send):
        refusal = self._refusal(scope)
        if refusal is not None:
            self.refused.labels(reason=REFUSAL_REASONS[refusal.status_code]).inc()
            return await refusal(scope, receive, send)
        if not _is_heavy(scope["method"], route_path(scope)):
            return await self.app(scope, receive, send)
        if not self.admission.try_enter():
            busy = error_response(
                503,
                f"busy: {self.admission.capacity} requests already in progress or waiting",
                "retry after the number of seconds in Retry-After",
            )
            busy.headers["Retry-After"] = self.admission.retry_after()
            self.refused.labels(reason=REFUSAL_REASONS[503]).inc()
            return await busy(scope, receive, send)
        try:
            await self.app(scope, receive, send)
        finally:
            self.admission.leave()

    def _refusal(self, scope) -> JSONResponse | None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        # Every route, open ones included: a browser always sends Host, so one without it (HTTP/1.0) is no web page.
        if self.loopback_hosts_only and not is_loopback_host(headers.get("host", "localhost")):
            return _misdirected(scope, headers["host"])
        open_route = _is_open(route_path(scope))
        if self.token and not open_route and not _authorised(headers, self.token):
            return JSONResponse(
                {"error": {"reason": "missing or wrong bearer token", "hint": "send 'Authorization: Bearer <token>'"}},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not open_route and headers.get("sec-fetch-site") in OTHER_SITES:
            return error_response(
                403,
                "a request made by another site's page",
                "open the worklist page of this service (/worklist) and work from there; scripts and other clients send no "
                "Sec-Fetch-Site header",
            )
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            return error_response(
                413, f"request body of {int(length)} bytes exceeds the limit of {self.max_bytes}", "send fewer or smaller files per request"
            )
        return None


def _misdirected(scope, host: str) -> JSONResponse:
    """The refusal of a request addressed to another host name, with the address the page opens at."""
    address, port = scope.get("server") or ("127.0.0.1", None)
    own = (f"[{address}]" if ":" in address else address) + (f":{port}" if port else "")
    return error_response(
        421,
        f"the request is addressed to {host[:100]!r}, not to this machine: the service answers only requests for "
        "localhost or a loopback address",
        f"open {scope['scheme']}://{own}/worklist on this machine; to serve other machines, run medtriage serve --host "
        "ADDRESS --token-file FILE; a proxy on this machine must send Host: localhost",
    )


# On every answer: scores, rows and pictures are PHI, so nothing is cached (but the docs' own scripts, DOCS_ASSET_CACHE);
# error bodies echo file names and paths as JSON text, which a browser must not sniff into HTML.
ANSWER_HEADERS = [(b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff")]
ASSET_HEADERS = [(b"cache-control", DOCS_ASSET_CACHE), (b"x-content-type-options", b"nosniff")]


def route_path(scope) -> str:
    """The request's path as the routes know it: with `serve --root-path`, uvicorn puts that prefix in front of the
    path (as ASGI asks), and the router takes it off again."""
    path, prefix = scope["path"], scope.get("root_path", "")
    return path[len(prefix) :] if prefix and path.startswith(prefix + "/") else path


class _Answer:
    """The response channel, adding ANSWER_HEADERS; `started` says whether an answer has begun. `cacheable`: the
    request of a docs asset, whose file (200, or a 304 that renews a browser's copy) may be kept."""

    def __init__(self, send, cacheable: bool = False):
        self.send, self.started, self.cacheable = send, False, cacheable

    async def __call__(self, message):
        if message["type"] == "http.response.start":
            self.started = True
            message = {**message, "headers": self._headers(message)}
        await self.send(message)

    def _headers(self, start: dict) -> list:
        names = {name for name, _ in ANSWER_HEADERS}
        headers = [(k, _own_location(v) if k.lower() == b"location" else v) for k, v in start.get("headers", []) if k.lower() not in names]
        cached = self.cacheable and start["status"] in (200, 304)
        return [*headers, *(ASSET_HEADERS if cached else ANSWER_HEADERS)]


def _own_location(value: bytes) -> bytes:
    """A redirect as the path alone. The router's redirect of a path with a `/` after it names the scheme and Host it
    was asked with: behind a proxy, those of the hop from the proxy, where the browser cannot go. The path (with the
    root path in front) leads the browser to the same place on the address it uses; the service sends no one elsewhere."""
    url = urlsplit(value.decode("latin-1"))
    if not url.netloc:
        return value
    path = "/" + url.path.lstrip("/")  # never `//host`: a browser reads that as another site
    return (path + (f"?{url.query}" if url.query else "")).encode("latin-1")


def _no_body(send):
    async def send_headers_only(message):
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return send_headers_only


def _is_open(path: str) -> bool:
    """An open route, or one with slashes after it: the router redirects `/worklist/` to the page, which a browser
    without the token must reach (a 401 there reads as a broken page). No closed route ends in `/`."""
    return path in OPEN_PATHS or path.rstrip("/") in OPEN_PATHS


def _authorised(headers: dict, token: str) -> bool:
    scheme, _, given = headers.get("authorization", "").partition(" ")
    # The header's bytes came in as latin-1 text; the token is compared as the UTF-8 bytes a client sends for it.
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1"), token.encode())


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError):
        return JSONResponse(err.body, status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        return error_response(422, "invalid request", errors=[str(e.get("msg")) for e in err.errors()])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        where = f"{request.method} {request.url.path}"
        if err.status_code == 404 and err.detail == "Not Found":  # the router's answer: no such route
            return error_response(404, f"no such route: {where}", "see /docs for the service's routes")
        if err.status_code == 405:  # the router's answer; its Allow header is what a client needs
            allowed = (err.headers or {}).get("Allow", "")
            response = error_response(405, f"method not allowed: {where}", f"this route accepts {allowed}; see /docs")
            response.headers.update(err.headers or {})
            return response
        detail = err.detail if isinstance(err.detail, dict) else {"reason": str(err.detail)}  # a route's own refusal
        return error_response(err.status_code, **detail)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):  # the routes' errors are answered by Guard; this is its own
        log.exception("unexpected error on %s", request.url.path)
        return internal_error(err)


def stopping_response() -> JSONResponse:
    """The answer to a request a stop cut off: the service is going away, so Retry-After leaves it time to come back."""
    response = error_response(
        503,
        "the service is stopping: the request was cut off before it was answered, and no results were sent",
        "send it again once the service is back (after the seconds in Retry-After), or to another instance",
    )
    response.headers["Retry-After"] = STOPPING_RETRY_AFTER
    response.headers["Connection"] = "close"  # the server closes it: a client must not send its next request there
    return response


def internal_error(err: Exception) -> JSONResponse:
    """The answer to an error of the service itself: its type, never its message (it may name files or data), unless
    it is one whose message is written for the client."""
    if isinstance(err, WorklistWriteError):
        return error_response(500, err.reason, err.hint, file=err.file, type=type(err).__name__)
    return error_response(500, f"internal error ({type(err).__name__}); the service keeps running", RETRY_HINT)


def _add_docs(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc, whose script, style sheet and icon the service serves itself (DOCS_FILES)."""
    folder = Path(fastapi_offline.__file__).parent / "static"
    swagger, redoc = _docs_pages(app.title, app.openapi_url.lstrip("/"))

    @app.get("/docs", include_in_schema=False)
    def swagger_page() -> HTMLResponse:
        return HTMLResponse(swagger, headers=docs_headers(swagger))

    @app.get("/redoc", include_in_schema=False)
    def redoc_page() -> HTMLResponse:
        return HTMLResponse(redoc, headers=docs_headers(redoc, REDOC_DRAWS))

    @app.get(DOCS_ASSETS + "/{name}", include_in_schema=False)
    def docs_asset(name: str) -> FileResponse:
        if name not in DOCS_FILES:
            raise StarletteHTTPException(404)  # answered as any unknown route
        return FileResponse(folder / name, media_type=DOCS_FILES[name])


def _docs_pages(title: str, openapi_url: str) -> tuple[str, str]:
    """The HTML of Swagger UI's page and ReDoc's, loading DOCS_FILES from the service. Their URLs are relative to the
    pages (both at the service's root), so that they work under the path prefix of a proxy that publishes the
    service there. The API has no OAuth2 flow, so Swagger UI gets no oauth2-redirect page; nor a validator badge,
    which would ask a web service about the schema."""
    assets = {name: f"{DOCS_ASSETS.lstrip('/')}/{name}?v={DOCS_VERSION}" for name in DOCS_FILES}
    swagger = get_swagger_ui_html(
        openapi_url=openapi_url,
        title=f"{title} - Swagger UI",
        swagger_js_url=assets["swagger-ui-bundle.js"],
        swagger_css_url=assets["swagger-ui.css"],
        swagger_favicon_url=assets["favicon.png"],
        swagger_ui_parameters={"validatorUrl": None},
    )
    redoc = get_redoc_html(
        openapi_url=openapi_url,
        title=f"{title} - ReDoc",
        redoc_js_url=assets["redoc.standalone.js"],
        redoc_favicon_url=assets["favicon.png"],
        with_google_fonts=False,
    )
    return swagger.body.decode(), redoc.body.decode()


# ReDoc writes its styles into the page as it draws it, and searches in a worker its script makes: without either it
# draws nothing, or no search. Swagger UI needs neither.
REDOC_DRAWS = {"style-src": "'self' 'unsafe-inline'", "worker-src": "blob:"}


def docs_headers(page: str, draws: dict | None = None) -> dict:
    """The API description pages run only the service's own scripts and their inline start-up script, fetch only from
    the service (the schema, and a route tried out), and may not be framed; `draws`, sources a page needs beyond."""
    sources = {
        "default-src": "'none'",
        "script-src": f"'self' {inline_hashes(page, 'script')}".strip(),
        "style-src": "'self'",
        "img-src": "'self' data:",
        "connect-src": "'self'",
        "base-uri": "'none'",
        "form-action": "'none'",
        "frame-ancestors": "'none'",
        **(draws or {}),
    }
    policy = "; ".join(f"{directive} {value}" for directive, value in sources.items())
    return {"Content-Security-Policy": policy, "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}


def _add_routes(app: FastAPI, predictor: Predictor, max_bytes: int, max_files: int, worklist: Worklist) -> None:
    package = predictor.package

    @app.get("/", include_in_schema=False)
    def home(request: Request) -> RedirectResponse:
        # the page someone typing the service's address wants, under the prefix a proxy may publish the service at
        return RedirectResponse(request.scope.get("root_path", "").rstrip("/") + PAGE_PATH, status_code=307)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    def ready() -> dict:
        return {"ready": True, "provider": predictor.provider, "model": package.identity()}

    @app.get("/v1/model")
    def model() -> dict:
        return package.meta

    @app.post(
        "/v1/score",
        summary="Score DICOM files (multipart field `files`, or one application/dicom body)",
        openapi_extra=UPLOAD_BODY,
        responses=UPLOAD_ERRORS,
    )
    async def score(request: Request) -> JSONResponse:
        source = request.headers.get(SOURCE_HEADER)
        score_and_record = functools.partial(worklist.score_or_reject, source=source)  # each row names its sender
        async with received_uploads(request, max_bytes, max_files) as uploads:
            outcomes = [
                await _in_slot(request, uploads_size(uploads), app.state.monitor.timed, score_and_record, upload, name, source)
                for name, upload in uploads
            ]
        scores = [s for o in outcomes if not isinstance(o, Rejection) for s in o]
        body = result_document(predictor, scores, [o for o in outcomes if isinstance(o, Rejection)])
        rejected = body["rejected"]
        if scores:
            return JSONResponse(body)
        # A request whose every file is unusable is itself bad input; too large to decode is 413. One the scorer itself
        # failed on is the service's error (500): a sender must not drop the file as bad, and may retry it.
        failures = [o for o in outcomes if isinstance(o, Rejection) and o.internal]
        if failures:
            error = {"reason": f"no file could be scored: {failures[0].reason}", "hint": f"{RETRY_HINT}; see 'rejected' for each file"}
            return JSONResponse({"error": error, **body}, status_code=500)
        status = 413 if all(r["error"] == TOO_LARGE for r in rejected) else 422
        error = {"reason": f"no file could be scored: {rejected[0]['reason']}", "hint": "see 'rejected' for each file"}
        return JSONResponse({"error": error, **body}, status_code=status)

    @app.post(
        "/v1/sr",
        summary="One DICOM file -> a DICOM Structured Report with its triage result",
        response_class=Response,
        responses={200: {"content": {"application/dicom": {}}}, **UPLOAD_ERRORS},
        openapi_extra=UPLOAD_BODY,
    )
    async def structured_report(request: Request) -> Response:
        async with received_uploads(request, max_bytes, 1) as uploads:
            if len(uploads) != 1:
                raise RequestError(
                    400, f"send exactly one file, got {len(uploads)}", "POST several files to /v1/score, or one at a time here"
                )
            name, upload = uploads[0]
            outcome = await _in_slot(
                request,
                uploads_size(uploads),
                app.state.monitor.timed,
                predictor.score_or_reject,
                upload,
                name,
                request.headers.get(SOURCE_HEADER),
            )
            if isinstance(outcome, Rejection):
                status = 500 if outcome.internal else 413 if outcome.error == TOO_LARGE else 422
                hint = RETRY_HINT if outcome.internal else outcome.hint
                raise RequestError(status, outcome.reason, hint, file=name, type=outcome.error, code=outcome.code, field=outcome.field)
            report = await _in_slot(request, 0, _sr_bytes, upload, outcome, predictor, name)
        return Response(report, media_type="application/dicom")


async def _in_slot(request: Request, size: int, work, *args):
    """`work(*args)` in a worker thread once a working slot is free; an upload argument (a spooled file)
    is read into bytes only then, so waiting requests hold no file in memory. Work whose client hung up
    while it waited is dropped: its answer would go nowhere. Work already running is not interrupted (an
    inference call cannot be); its slot is free again when it ends."""
    async with request.app.state.admission.slot():
        if await request.is_disconnected():
            raise RequestError(
                400, "the client closed the connection before its files were scored", "keep the connection open until the answer arrives"
            )
        args = [read_upload(a) if isinstance(a, Upload) else a for a in args]
        try:
            return await run_in_threadpool(work, *args)
        finally:
            del args
            if size >= LARGE_REQUEST:
                await run_in_threadpool(release_memory)


def _sr_bytes(data: bytes, scores: list[Score], predictor: Predictor, name: str) -> bytes:
    from medtriage.serve.dicom_results import SR_HINT, sr_bytes

    try:
        return sr_bytes(data, scores, predictor.package)
    except MedTriageError as err:
        hint = f"{err.hint or SR_HINT}; POST the file to /v1/score for its score"
        raise RequestError(422, f"scored, but no SR could be built: {err.reason}", hint, file=name, type=type(err).__name__) from err


# --- the connection ------------------------------------------------------------------------------

_REQUEST_TIMEOUT = b'{"error":{"reason":"the request head did not arrive in time","hint":"send the whole head at once"}}'
_TOO_MANY_CONNECTIONS = (
    b'{"error":{"reason":"the service holds as many connections as it takes","hint":"retry in a moment, or reuse a connection"}}'
)
_MALFORMED = (
    b'{"error":{"reason":"malformed HTTP/1.1 request: its request line, a header or its chunked body breaks the protocol",'
    b'"hint":"fix the client, or the proxy in front of the service, that sent it"}}'
)


class _HeaderDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 connection, with a deadline for the request head and a bound on open connections. uvicorn
    waits for a head for ever (its keep-alive timer stops at the first byte), so clients that send a header byte now
    and then (slowloris) hold their connections, and with enough of them the process's file descriptors. The body's
    pace is the app's (`_BodyCounter`); this is Apache mod_reqtimeout's `header=` limit, answered with a 408 and a
    closed connection. A connection past `max_connections` is answered 503 and closed at once: within the deadline,
    many clients could otherwise still hold every descriptor (uvicorn's own limit answers only once a head came)."""

    header_timeout_s: float
    max_connections: int
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self._answer_and_close(b"503 Service Unavailable", _TOO_MANY_CONNECTIONS, b"retry-after: 1\r\n")
            return
        self._start_deadline()

    def on_response_complete(self) -> None:
        self._start_deadline()  # before uvicorn parses a request already waiting (pipelined), which stops it again
        super().on_response_complete()

    def handle_events(self) -> None:
        scope = self.scope
        super().handle_events()
        if self.scope is not scope:  # a whole head arrived
            self._stop_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_deadline()
        super().connection_lost(exc)

    def _start_deadline(self) -> None:
        self._stop_deadline()
        self._deadline = self.loop.call_later(self.header_timeout_s, self._deadline_passed)

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _deadline_passed(self) -> None:
        if self.transport.is_closing():
            return
        if self.conn.our_state is h11.IDLE and self.conn.trailing_data[0]:  # part of a head came: say why it ends
            self._answer_and_close(b"408 Request Timeout", _REQUEST_TIMEOUT)
        else:
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 cannot parse, as the service's other refusals are: a JSON body that says
        what to do, with ANSWER_HEADERS. Once an answer has begun or ended (a refused upload whose client sends on), h11
        takes no other: uvicorn's own would raise there and log a traceback; the connection just ends."""
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            self.transport.close()
            return
        length = (b"content-length", b"%d" % len(_MALFORMED))
        head = h11.Response(
            status_code=400, headers=[(b"content-type", b"application/json"), (b"connection", b"close"), *ANSWER_HEADERS, length]
        )
        answer = [self.conn.send(event) for event in (head, h11.Data(data=_MALFORMED), h11.EndOfMessage())]
        self.transport.write(b"".join(answer))
        self.transport.close()

    def _answer_and_close(self, status: bytes, body: bytes, extra_headers: bytes = b"") -> None:
        """A refusal written straight to the socket (no request cycle runs), and the connection closed."""
        head = b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\nconnection: close\r\n" + extra_headers
        head += b"".join(name + b": " + value + b"\r\n" for name, value in ANSWER_HEADERS)
        self.transport.write(head + b"content-length: %d\r\n\r\n%s" % (len(body), body))
        self.transport.close()


class CutOffRequests(logging.Filter):
    """uvicorn logs each request a stop cut off (--stop-timeout) as "Exception in ASGI application" with a 60-line
    traceback of the cancellation, which reads as a crash in the service's journal: one line says what happened. Its own
    "Cancel N running task(s)" line comes before."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError):
            record.msg, record.args = "a request in progress was cut off by the stop (--stop-timeout)", ()
            record.exc_info = record.exc_text = None
        return True


def quiet_cut_off_requests() -> None:
    logging.getLogger("uvicorn.error").addFilter(CutOffRequests())


def connection_protocol(header_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """The class to give uvicorn as `http=`: HTTP/1.1 connections that must send each request head within
    `header_timeout_s`, at most `max_connections` of them open at once."""
    return type("HeaderDeadline", (_HeaderDeadline,), {"header_timeout_s": header_timeout_s, "max_connections": max_connections})
