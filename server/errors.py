"""One error model: handlers raise `APIError`; the app turns every error into OpenAI's shape."""

from __future__ import annotations

from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.protocol import ErrorInfo, ErrorResponse


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


def error_body(message: str, status: int, param: str | None = None,
               type_: str | None = None) -> dict:
    info = ErrorInfo(message=message, type=type_ or _error_type(status), param=param, code=status)
    return ErrorResponse(error=info).model_dump()


def _json_error(message: str, status: int, param: str | None = None,
                type_: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param, type_), status_code=status)


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", []) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    msg = first.get("msg", "invalid request")
    return (f"{param}: {msg}" if param else msg), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return _json_error(exc.message, exc.status, exc.param, exc.type)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(exc)
        return _json_error(message, HTTPStatus.UNPROCESSABLE_ENTITY, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _json_error(str(exc.detail), exc.status_code)
