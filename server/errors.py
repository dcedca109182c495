"""One error model: handlers raise `APIError`; the app turns every error into OpenAI's shape,
unexpected ones included (500, logged with their traceback)."""

from __future__ import annotations

import json
import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from vllm.exceptions import VLLMClientError

from server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)


class ErrorJSONResponse(JSONResponse):
    """ASCII-escaped JSON: an error may quote what the client sent, lone surrogates too,
    which UTF-8 cannot encode."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, *, param: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.type = type_ or _error_type(status)


def _error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if status == 503:
        return "service_unavailable"
    if status >= 500:
        return "internal_server_error"
    return "invalid_request_error"


# Every error status a route can answer, documented with the body it has (OpenAPI `responses`).
ERROR_RESPONSES: dict[int, dict] = {
    400: {"description": "The request cannot be served as asked (e.g. an unknown model, "
                         "max_tokens past the context, an unknown page cursor, a body that "
                         "cannot be parsed)"},
    401: {"description": "The admin bearer key is missing or wrong"},
    404: {"description": "No such resource, or the server runs without memory experts"},
    409: {"description": "The fact is being memorized right now"},
    413: {"description": "The request body is larger than MOME_MAX_REQUEST_BYTES"},
    422: {"description": "The request does not validate (body, path or query)"},
    503: {"description": "The model is still loading, or the fact registry is unavailable"},
}


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """The `responses=` entries for these error statuses, each with OpenAI's error body."""
    return {status: {**ERROR_RESPONSES[status], "model": ErrorResponse} for status in statuses}


def error_body(message: str, status: int, param: str | None = None,
               type_: str | None = None) -> dict:
    info = ErrorInfo(message=message, type=type_ or _error_type(status), param=param, code=status)
    return ErrorResponse(error=info).model_dump()


def _json_error(message: str, status: int, param: str | None = None,
                type_: str | None = None) -> JSONResponse:
    return ErrorJSONResponse(error_body(message, status, param, type_), status_code=status)


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", []) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    msg = first.get("msg", "invalid request")
    return (f"{param}: {msg}" if param else msg), param


def _allowed_methods(request: Request) -> str:
    """Every method some route serves on this request's path (for `Allow` on a 405)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if route.matches(request.scope)[0] != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return _json_error(exc.message, exc.status, exc.param, exc.type)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(exc)
        return _json_error(message, HTTPStatus.UNPROCESSABLE_ENTITY, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = _json_error(str(exc.detail), exc.status_code)
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:  # Starlette names one route's methods; the path has more
            response.headers["Allow"] = _allowed_methods(request)
        return response

    @app.exception_handler(VLLMClientError)
    async def _engine_refused(_: Request, exc: VLLMClientError) -> JSONResponse:
        # The engine's own request validation (vLLM maps these to 4xx too).
        return _json_error(str(exc), 400, getattr(exc, "parameter", None))

    @app.exception_handler(RedisError)
    async def _registry_down(request: Request, exc: RedisError) -> JSONResponse:
        logger.warning("registry unavailable on %s: %s", request.url.path, exc)
        return _json_error(f"the fact registry (Redis) is unavailable: {exc}; retry shortly", 503)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unexpected error on %s %s", request.method, request.url.path,
                     exc_info=exc)
        return _json_error(f"internal error ({type(exc).__name__}); see the server log", 500)
