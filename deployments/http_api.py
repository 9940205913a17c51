"""The HTTP surface: TGI's routes (and the OpenAI ones TGI serves) on a FastAPI app.

Routes only translate: read the body into its schema, call `TextGeneration`, send JSON or SSE.
Errors become HTTP in one place (`ServeError` → status by `error_type`), always in TGI's body shape
`{"error", "error_type"}` — also for what TGI's framework answers in plain text or with an empty body
(bad JSON 400, wrong shape 422, wrong content type 415, body too large 413, missing key 401, unknown
route 404, wrong method 405), so every client can parse every error. Auth, body size, CORS and HEAD
are plain ASGI middleware that never buffer a stream.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from typing import Any, AsyncIterator, Protocol, TypeVar

import pydantic
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from neuron_serve.config import Config
from neuron_serve.errors import ServeError

from . import schemas as S
from .service import TextGeneration, error_message

T = TypeVar("T", bound=pydantic.BaseModel)

STATUS_BY_ERROR_TYPE = {
    "validation": 422,
    "template_error": 422,
    "tool_error": 422,
    "batch size exceeded": 422,
    "suffix not supported": 422,
    "overloaded": 429,
    "generation": 424,
    "incomplete_generation": 500,
    "unhealthy": 503,
}
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class EventStream(StreamingResponse):
    """A server-sent event stream that only streams, with TGI's keep-alive: an SSE comment after every
    `keep_alive_s` without an event (a request queued behind a full batch, a long prefill), so that
    proxies in between keep the connection open.

    Under an ASGI server older than spec 2.4 (uvicorn says 2.3), Starlette's own response also listens
    for the client's disconnect, in a task group of its own: 43 µs per response against 2, before the
    first event. Serve already cancels a request whose client went away (in its proxy, and in an
    ingress replica's own HTTP server behind HAProxy), and that cancels the generation under it."""

    def __init__(self, body: AsyncIterator[bytes], keep_alive_s: float, headers: dict[str, str]):
        # As axum's `Sse` sends it: Starlette would add "; charset=utf-8" to a `media_type` of text/*.
        super().__init__(body, headers={**headers, "content-type": "text/event-stream"})
        self.keep_alive_s = keep_alive_s
        self._sent_at = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.stream_response(send)
        except OSError:  # what Starlette does from spec 2.4 on
            raise ClientDisconnect() from None

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        self._sent_at = time.monotonic()
        keep_alive = asyncio.create_task(self._keep_alive(send))
        try:
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                self._sent_at = time.monotonic()
        finally:
            keep_alive.cancel()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _keep_alive(self, send: Send) -> None:
        while True:
            await asyncio.sleep(self._sent_at + self.keep_alive_s - time.monotonic())
            if time.monotonic() - self._sent_at >= self.keep_alive_s:
                self._sent_at = time.monotonic()
                try:
                    await send({"type": "http.response.body", "body": b":\n\n", "more_body": True})
                except OSError:  # the client went away: the stream itself finds out and ends
                    return


class Operations(Protocol):
    """What the HTTP layer asks of the deployment around it."""

    async def health(self) -> bool: ...
    async def info(self) -> dict[str, Any]: ...
    async def metrics(self) -> str: ...


class HTTPError(Exception):
    def __init__(self, status: int, error_type: str, message: str):
        self.status, self.error_type, self.message = status, error_type, message


def error_response(status: int, error_type: str, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status)


async def read_body(request: Request, model: type[T]) -> T:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json" and not (content_type.startswith("application/") and content_type.endswith("+json")):
        raise HTTPError(415, "unsupported_media_type", "Expected request with `Content-Type: application/json`")
    body = await request.body()
    try:
        return model.model_validate_json(body)
    except pydantic.ValidationError as e:
        first = e.errors(include_url=False)[0]
        if first["type"] == "json_invalid":
            raise HTTPError(400, "invalid_json", f"Failed to parse the request body as JSON: {first['msg']}") from None
        where = ".".join(str(p) for p in first["loc"])
        detail = f"{where}: {first['msg']}" if where else first["msg"]
        raise HTTPError(422, "validation", f"Failed to deserialize the JSON body into the target type: {detail}") from None


class BodyLimit:
    """413 for a body over `limit` bytes, by its Content-Length or as it streams in."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > self.limit:
            return await self._reject(scope, receive, send)
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise HTTPError(413, "payload_too_large", "Failed to buffer the request body: length limit exceeded")
            return message

        await self.app(scope, counting_receive, send)

    async def _reject(self, scope, receive, send):
        response = error_response(413, "payload_too_large", "Failed to buffer the request body: length limit exceeded")
        await response(scope, receive, send)


class DisconnectCancels:
    """Cancels a request whose client goes away, when the client turned off Serve's watch for that
    (Serve's header `x-request-disconnect-disabled: ?1`, read before this app and passed on by
    HAProxy): a generation must not hold a row and a permit for nobody. It listens only once the route
    has read the whole body, so the body still flows as the route reads it (under `BodyLimit`)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not any(
                name == b"x-request-disconnect-disabled" and value == b"?1" for name, value in scope["headers"]):
            return await self.app(scope, receive, send)
        gone: asyncio.Future = asyncio.get_running_loop().create_future()
        watching: asyncio.Task | None = None

        async def watch() -> None:
            message = await receive()  # after the body, only the disconnect comes
            gone.set_result(message)
            handling.cancel()

        async def receive_body() -> Message:
            nonlocal watching
            if watching is not None:  # the route asks past its body: it waits for the disconnect as well
                return await asyncio.shield(gone)
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                watching = asyncio.ensure_future(watch())
            return message

        handling = asyncio.ensure_future(self.app(scope, receive_body, send))
        try:
            await handling
        except asyncio.CancelledError:
            if not gone.done():
                raise  # this call itself was cancelled (and `handling` with it), not by its client's leaving
        finally:
            if watching is not None:
                watching.cancel()


class ApiKey:
    """`Authorization: Bearer <key>` on every route but the open ones (a path, or "METHOD /path"). As TGI
    compares it, the header's case does not matter, the key's included; compared in constant time."""

    def __init__(self, app: ASGIApp, key: str, open_paths: set[str]):
        self.app, self.expected, self.open_paths = app, f"Bearer {key}".encode().lower(), open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):  # behind a route prefix, the app's own paths follow it
            path = path[len(root):] or "/"
        method = scope["method"]
        if path in self.open_paths or f"{method} {path}" in self.open_paths or method == "OPTIONS":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"").lower()
        if not hmac.compare_digest(given, self.expected):
            response = error_response(401, "unauthorized", "Unauthorized: a valid `Authorization: Bearer <API_KEY>` header is required")
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


class HeadAsGet:
    """HEAD on a GET route answers as GET would, without the body (as TGI's router does)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def send_headers_only(message):
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, send_headers_only)


def build_http_app(service: TextGeneration, ops: Operations, config: Config) -> FastAPI:
    app = FastAPI(
        title="neuron-serve",
        description="Text Generation Inference API on AWS Inferentia2, served by Ray Serve",
        version=service.version,
        docs_url="/docs",
        openapi_url="/api-doc/openapi.json",
        redoc_url=None,
    )

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, e: HTTPError):
        return error_response(e.status, e.error_type, e.message)

    @app.exception_handler(StarletteHTTPException)
    async def _framework_error(request: Request, e: StarletteHTTPException):  # 404 and 405
        response = error_response(e.status_code, str(e.detail).lower().replace(" ", "_"), str(e.detail))
        response.headers.update(e.headers or {})
        return response

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, e: ServeError):
        return error_response(STATUS_BY_ERROR_TYPE.get(e.error_type, 500), e.error_type, error_message(e))

    def sse(body, characters: int) -> EventStream:
        headers = {**SSE_HEADERS, "x-compute-type": service.compute_type, "x-compute-characters": str(characters)}
        return EventStream(body, config.sse_keep_alive_s, headers)

    compat_full_text = True  # TGI: true for a text-generation model or an unknown pipeline tag

    # -- TGI generation ----------------------------------------------------------------------------

    @app.post("/generate", tags=["Text Generation Inference"], summary="Generate tokens",
              response_model=S.GenerateResponse, responses=_errors())
    async def generate(request: Request):
        body = await read_body(request, S.GenerateRequest)
        result, headers = await service.generate(body)
        return JSONResponse(result, headers=headers)

    @app.post("/generate_stream", tags=["Text Generation Inference"], summary="Generate a stream of token using Server-Sent Events",
              responses={200: {"model": S.StreamResponse, "content": {"text/event-stream": {}}}, **_errors()})
    async def generate_stream(request: Request):
        body = await read_body(request, S.GenerateRequest)
        return sse(service.generate_stream(body), len(body.inputs))

    @app.post("/", tags=["Text Generation Inference"], summary="Generate tokens if `stream == false` or a stream of token if `stream == true`",
              response_model=list[S.GenerateResponse], responses=_errors())
    async def compat_generate(request: Request):
        return await _compat(await read_body(request, S.CompatGenerateRequest))

    async def _compat(body: S.CompatGenerateRequest):
        if body.stream:
            return sse(service.generate_stream(body, return_full_text_default=compat_full_text), len(body.inputs))
        result, headers = await service.generate(body, return_full_text_default=compat_full_text)
        return JSONResponse([result], headers=headers)

    # -- OpenAI ------------------------------------------------------------------------------------

    @app.post("/v1/chat/completions", tags=["Text Generation Inference"], summary="Generate tokens (OpenAI chat)",
              response_model=S.ChatCompletion, responses=_errors())
    async def chat_completions(request: Request):
        return await _chat(await read_body(request, S.ChatRequest))

    async def _chat(body: S.ChatRequest):
        if body.stream:
            prompt = service.chat_stream_prompt(body)
            return sse(service.chat_stream(body, prompt), len(prompt))
        result, headers = await service.chat(body)
        return JSONResponse(result, headers=headers)

    @app.post("/v1/completions", tags=["Text Generation Inference"], summary="Complete a prompt (OpenAI legacy completions)",
              response_model=S.Completion, responses=_errors())
    async def completions(request: Request):
        return await _completions(await read_body(request, S.CompletionRequest))

    async def _completions(body: S.CompletionRequest):
        prompts = service.completion_prompts(body)
        if body.stream:
            return sse(service.completions_stream(body, prompts), sum(len(p) for p in prompts))
        result, headers = await service.completions(body, prompts)
        return JSONResponse(result, headers=headers)

    @app.get("/v1/models", tags=["Text Generation Inference"], summary="The served model", response_model=S.ModelList)
    async def models():
        card = {"id": service.model_id, "object": "model", "created": 0, "owned_by": service.model_id}
        return {"object": "list", "data": [card]}

    @app.post("/invocations", tags=["Text Generation Inference"], summary="SageMaker: a generate, chat or completions body",
              responses=_errors())
    async def invocations(request: Request):
        raw = await request.body()
        try:
            keys = json.loads(raw) if raw else None
        except (ValueError, RecursionError):  # RecursionError: nested past Python's stack; refused below
            keys = None
        if isinstance(keys, dict) and "inputs" in keys:
            return await _compat(await read_body(request, S.CompatGenerateRequest))
        if isinstance(keys, dict) and "messages" in keys:
            return await _chat(await read_body(request, S.ChatRequest))
        if isinstance(keys, dict) and "prompt" in keys:
            return await _completions(await read_body(request, S.CompletionRequest))
        await read_body(request, S.CompatGenerateRequest)  # raises the parse error this body deserves
        raise HTTPError(422, "validation", "Failed to deserialize the JSON body into the target type: "
                        "data did not match any variant of untagged enum SagemakerRequest")

    # -- tokens ------------------------------------------------------------------------------------

    @app.post("/tokenize", tags=["Text Generation Inference"], summary="Tokenize inputs", response_model=list[S.SimpleToken],
              responses=_errors())
    async def tokenize(request: Request):
        body = await read_body(request, S.GenerateRequest)
        return await service.tokenize(body.inputs)

    @app.post("/chat_tokenize", tags=["Text Generation Inference"], summary="Template and tokenize a chat request",
              response_model=S.ChatTokenizeResponse, responses=_errors())
    async def chat_tokenize(request: Request):
        body = await read_body(request, S.ChatRequest)
        text = service.chat_prompt(body)
        return {"tokenize_response": await service.tokenize(text, add_special_tokens=False), "templated_text": text}

    # -- operations --------------------------------------------------------------------------------

    async def health_check():
        if await ops.health():
            return Response(status_code=200)
        return error_response(503, "healthcheck", "unhealthy")

    for path in ("/health", "/ping"):
        app.add_api_route(path, health_check, methods=["GET"], tags=["Text Generation Inference"],
                          summary="Health check: 200 once a replica has produced a token", responses={503: {"model": S.ErrorResponse}})
    app.add_api_route("/", health_check, methods=["GET"], include_in_schema=False)

    @app.get("/info", tags=["Text Generation Inference"], summary="Text Generation Inference endpoint info", response_model=S.Info)
    async def info():
        return await ops.info()

    @app.get("/metrics", tags=["Text Generation Inference"], summary="Prometheus metrics scrape endpoint",
             response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(await ops.metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")

    _document_request_bodies(app)

    if config.api_key is not None:
        app.add_middleware(ApiKey, key=config.api_key.get_secret_value(), open_paths=set(config.api_key_open_paths))
    app.add_middleware(BodyLimit, limit=config.payload_limit)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=config.cors_allow_origin or ["*"],
        allow_methods=["GET", "POST"],
        allow_headers=["content-type", "authorization"],
    )
    app.add_middleware(HeadAsGet)
    app.add_middleware(DisconnectCancels)
    return app


def _errors() -> dict:
    return {status: {"model": S.ErrorResponse} for status in (413, 422, 424, 429, 500)}


REQUEST_BODIES = {
    "/generate": S.GenerateRequest,
    "/generate_stream": S.GenerateRequest,
    "/": S.CompatGenerateRequest,
    "/v1/chat/completions": S.ChatRequest,
    "/v1/completions": S.CompletionRequest,
    "/tokenize": S.GenerateRequest,
    "/chat_tokenize": S.ChatRequest,
}


def _document_request_bodies(app: FastAPI) -> None:
    """Routes read their bodies themselves (to answer errors TGI's way); put the schemas in the spec."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        _, definitions = pydantic.json_schema.models_json_schema(
            [(m, "validation") for m in set(REQUEST_BODIES.values())], ref_template="#/components/schemas/{model}"
        )
        spec.setdefault("components", {}).setdefault("schemas", {}).update(definitions.get("$defs", {}))
        for path, model in REQUEST_BODIES.items():
            spec["paths"][path]["post"]["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
            }
        app.openapi_schema = spec
        return spec

    app.openapi = openapi
