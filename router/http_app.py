"""The FastAPI application of the front door (its routes are the `Ingress` methods): error
handlers that answer in OpenAI's shape, and the middlewares that run before any route: the API
key check and the request size limit.

Serve runs its own copy of this app in each ingress replica; the middlewares read their
settings from the running app's `state` (set by `Ingress.__init__`), not from module globals.
"""

import hmac
from dataclasses import dataclass

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvserve.router.errors import OpenAIError, invalid_value

app = FastAPI(title="kvserve", docs_url=None, redoc_url=None)


@app.exception_handler(OpenAIError)
async def _openai_error(_: Request, error: OpenAIError) -> JSONResponse:
    return error.response()


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
    return invalid_value(error).response()


@app.exception_handler(ValidationError)
async def _sampling_error(_: Request, error: ValidationError) -> JSONResponse:
    return invalid_value(error).response()


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """Starlette's own refusals (no such route, wrong method, body too large) in OpenAI's shape."""
    messages = {404: f"there is no route {request.url.path}",
                405: f"{request.method} is not allowed on {request.url.path}"}
    message = messages.get(error.status_code, str(error.detail))
    return OpenAIError(error.status_code, message, "invalid_request_error").response()


@app.exception_handler(Exception)
async def _unexpected_error(_: Request, error: Exception) -> JSONResponse:
    return OpenAIError(500, f"internal error: {type(error).__name__}", "internal_error").response()


class _BodySizeLimit:
    """413 for a body over `app.state.max_request_bytes`: at once when Content-Length says so,
    otherwise as soon as the streamed body passes the limit."""

    def __init__(self, asgi_app):
        self.asgi_app = asgi_app

    async def __call__(self, scope, receive, send):
        # The app Serve runs is a copy unpickled in the replica, not this module's `app`.
        limit = getattr(scope["app"].state, "max_request_bytes", None) if "app" in scope else None
        if scope["type"] != "http" or limit is None:
            return await self.asgi_app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await _too_large(limit).response()(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise HTTPException(413, _too_large(limit).message)
            return message

        await self.asgi_app(scope, limited_receive, send)


def _too_large(limit: int) -> OpenAIError:
    return OpenAIError(413, f"the request body is larger than {limit} bytes", "invalid_request_error")


app.add_middleware(_BodySizeLimit)


@dataclass(frozen=True)
class ApiKeyGate:
    """Which paths need the API key, and whether a request's headers hold it: `authorization:
    Bearer <key>` (OpenAI's clients) or `x-api-key: <key>` (Anthropic's), compared in constant
    time on the raw header bytes."""

    key: bytes
    metrics_too: bool

    def protects(self, path: str) -> bool:
        """The API (with vLLM's unversioned score and rerank routes), and the tokenizer's
        endpoints (vLLM leaves those open; they spend the ingress's time on whatever text is
        sent), and /metrics if so configured."""
        return (path.startswith(("/v1/", "/v2/")) or path in ("/tokenize", "/detokenize", "/score", "/rerank")
                or (self.metrics_too and path == "/metrics"))

    def admits(self, headers: dict[bytes, bytes]) -> bool:
        bearer = hmac.compare_digest(headers.get(b"authorization", b""), b"Bearer " + self.key)
        return hmac.compare_digest(headers.get(b"x-api-key", b""), self.key) or bearer


class _ApiKeyCheck:
    """401 for a protected path without the key, before the body is even read."""

    def __init__(self, asgi_app):
        self.asgi_app = asgi_app

    async def __call__(self, scope, receive, send):
        gate = getattr(scope["app"].state, "api_key_gate", None) if "app" in scope else None
        if scope["type"] == "http" and gate is not None and gate.protects(scope["path"]):
            if not gate.admits(dict(scope["headers"])):
                error = OpenAIError(401, "missing or wrong API key: send the header `Authorization: Bearer <key>`",
                                    "authentication_error", code="invalid_api_key")
                return await error.response()(scope, receive, send)
        await self.asgi_app(scope, receive, send)


app.add_middleware(_ApiKeyCheck)
