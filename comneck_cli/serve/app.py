"""The ASGI app of ``comneck serve`` (Starlette): authentication, body limits, errors as one JSON sentence, and the
Prometheus metrics, around :class:`comneck_cli.serve.work.Service` behind a :class:`~comneck_cli.serve.batching.Batcher`.

Every failure a client can cause is answered, never raised: 401 without the bearer token, 413 for a body over
``max_body`` (from ``Content-Length`` before reading, or counted while streaming), 400 for a malformed, truncated or
oversized record or a bad query, 422 for a record the server's models do not fit, 503 with ``Retry-After`` when the
queue is full, 500 (logged with its traceback) for anything unforeseen; the process goes on.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import re
import time
import traceback
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from comneck_cli.errors import ComneckError, FormatError, InputError, MismatchError, UsageError
from comneck_cli.serve import ServeConfig
from comneck_cli.serve.batching import Batcher, QueueFull
from comneck_cli.serve.work import FeatureOptions, Job, Service

log = logging.getLogger("comneck.serve")
QUERY_NAMES = {"via", "layer", "select", "for", "format", "prompt", "max_new_tokens"}
MEDIA = {"safetensors": "application/octet-stream", "npy": "application/octet-stream",
         "pt": "application/octet-stream"}


class HTTPFailure(Exception):
    """A refusal with its status, the ``kind`` the error counter files it under, and one sentence."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.headers = status, kind, headers or {}


class Metrics:
    """The Prometheus series of one app, in its own registry (several apps may share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("comneck_requests", "HTTP requests answered, by endpoint and status.",
                                ["endpoint", "status"], registry=self.registry)
        self.errors = Counter("comneck_errors", "Requests refused or failed, by kind.", ["kind"],
                              registry=self.registry)
        self.latency = Histogram("comneck_request_seconds", "Time from request to response, by endpoint.",
                                 ["endpoint"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.queue_depth = Gauge("comneck_queue_depth", "Requests waiting for the model.", registry=self.registry)
        self.batch_size = Histogram("comneck_batch_size", "Requests per forward pass.", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))


# An absolute path (POSIX, or after a Windows drive letter) standing alone in a sentence; not a URL's or a fraction's.
ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/\\-])(?:/|[A-Za-z]:[\\/])[^\s'\"`,;()<>]+")
ROUTES = ("/v1/", "/healthz", "/metrics")  # the app's own paths, which its sentences may name


def _sentence(exc: BaseException, server_files: Sequence[str]) -> str:
    """The error's one sentence for a client: parameters it can change by their query name, the server's own by
    name ("the server's max_pixels"), and every file of the server by its base name (where the server keeps its
    files is none of a client's business): the ``server_files`` it was started with as written, any absolute path."""
    if isinstance(exc, ComneckError):
        text = exc.render(lambda p: p if p in QUERY_NAMES else f"the server's {p}")
    else:
        text = str(exc)
    for path in server_files:
        text = text.replace(path, _base_name(path))
    text = ABSOLUTE_PATH.sub(lambda m: m.group() if m.group().startswith(ROUTES) else _base_name(m.group()), text)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def _base_name(path: str) -> str:
    return re.split(r"[\\/]", path.rstrip("\\/"))[-1] or path


def _server_files(config: ServeConfig) -> tuple[str, ...]:
    """The files and folders ``config`` names by a path with folders in it (not a registry name or hub id), as
    written, since relative ones are not caught as absolute paths; longest first, so that a path is replaced before a
    shorter one inside it."""
    given = (config.weights, config.neck, config.adapter, config.clip_weights, config.clip_config, config.mllm)
    paths = {str(value) for value in given
             if value is not None and re.search(r"[\\/]", str(value)) and Path(value).exists()}
    return tuple(sorted(paths, key=len, reverse=True))


def _status(exc: ComneckError) -> tuple[int, str]:
    if isinstance(exc, QueueFull):
        return 503, "busy"
    if isinstance(exc, (FormatError, InputError, UsageError)):
        return 400, "bad_request"
    if isinstance(exc, MismatchError):
        return 422, "mismatch"
    return 422, "unprocessable"  # no model for the record: a registry or model-file problem of this server


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes: from ``Content-Length``
    before a byte is read, else while the chunks stream in, so a huge body is never held whole."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise HTTPFailure(400, "bad_request", "Content-Length is not a number")
        if int(length) > limit:
            raise HTTPFailure(413, "too_large", f"the body of {int(length)} bytes is over this server's limit of "
                                                f"{limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPFailure(413, "too_large", f"the body is over this server's limit of {limit} bytes")
        chunks.append(chunk)
    if not size:
        raise HTTPFailure(400, "bad_request", "the body is empty; send the bytes of one .cnk record")
    return b"".join(chunks)


def build_app(config: ServeConfig) -> Starlette:
    """The app: ``POST /v1/features``, ``/v1/decode``, ``/v1/ask``, ``GET /healthz`` (always open) and ``/metrics``."""
    metrics = Metrics()
    service = Service(config)
    batcher = Batcher(service.process, max_batch=config.max_batch, batch_wait=config.batch_wait,
                      max_queue=config.max_queue, on_batch=metrics.batch_size.observe,
                      on_depth=metrics.queue_depth.set)
    token = config.token.encode() if config.token is not None else None
    server_files = _server_files(config)

    def authorise(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        # compare_digest takes as long for a wrong token as for a right one of the same length
        if not (scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token)):
            raise HTTPFailure(401, "unauthorized", "a valid `Authorization: Bearer TOKEN` header is required",
                              {"WWW-Authenticate": "Bearer"})

    def endpoint(name: str, work: Callable[[Request], Awaitable[Response]], *, open_: bool = False):
        async def handle(request: Request) -> Response:
            started = time.perf_counter()
            try:
                if not open_:
                    authorise(request)
                response = await work(request)
            except HTTPFailure as exc:
                metrics.errors.labels(exc.kind).inc()
                response = JSONResponse({"error": str(exc)}, exc.status, headers=exc.headers)
            except ComneckError as exc:
                status, kind = _status(exc)
                headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, QueueFull) else {}
                metrics.errors.labels(kind).inc()
                response = JSONResponse({"error": _sentence(exc, server_files)}, status, headers=headers)
            except ClientDisconnect:
                metrics.errors.labels("disconnected").inc()
                response = Response(status_code=400)  # nobody is left to read it
            except Exception:  # noqa: BLE001 - a bug must cost one request, not the process
                log.error("%s failed:\n%s", name, traceback.format_exc())
                metrics.errors.labels("internal").inc()
                response = JSONResponse({"error": "internal error; the server's log has the details"}, 500)
            metrics.requests.labels(name, str(response.status_code)).inc()
            metrics.latency.labels(name).observe(time.perf_counter() - started)
            return response

        return handle

    async def features(request: Request) -> Response:
        options = FeatureOptions.parse(dict(request.query_params), config)
        records = service.parse(await read_body(request, config.max_body))
        data = await batcher.submit(Job("features", records, options=options))
        return Response(data, media_type=MEDIA[options.fmt])

    async def decode(request: Request) -> Response:
        if request.query_params:
            raise UsageError("/v1/decode takes no query parameters")
        records = service.parse(await read_body(request, config.max_body), one=True)
        return Response(await batcher.submit(Job("decode", records)), media_type="image/png")

    async def ask(request: Request) -> Response:
        from comneck_cli.mllm import VIAS, check_max_new_tokens

        query = dict(request.query_params)
        unknown = sorted(set(query) - {"prompt", "via", "max_new_tokens"})
        if unknown:
            raise UsageError(f"unknown query parameter {unknown[0]!r}; use prompt, via or max_new_tokens")
        prompt, via = query.get("prompt", "").strip(), query.get("via", "neck")
        if not prompt:
            raise UsageError("prompt is required: /v1/ask?prompt=TEXT")
        if via not in VIAS or via == "uncompressed":
            raise UsageError(f"via must be one of {', '.join(v for v in VIAS if v != 'uncompressed')}, not {via!r}")
        tokens = check_max_new_tokens(query.get("max_new_tokens", config.max_new_tokens))
        if config.mllm is None:
            raise HTTPFailure(501, "no_mllm", "this server has no MLLM to answer with; it was started without one")
        body = await read_body(request, config.max_body)
        records = service.parse(body, one=True)
        return JSONResponse(await batcher.submit(Job("ask", records, body, (prompt, via, tokens))))

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def metrics_text(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()  # the server has stopped accepting: finish what is queued

    return Starlette(routes=[
        Route("/v1/features", endpoint("features", features), methods=["POST"]),
        Route("/v1/decode", endpoint("decode", decode), methods=["POST"]),
        Route("/v1/ask", endpoint("ask", ask), methods=["POST"]),
        Route("/healthz", endpoint("healthz", healthz, open_=True), methods=["GET"]),
        Route("/metrics", endpoint("metrics", metrics_text), methods=["GET"]),
    ], lifespan=lifespan)

