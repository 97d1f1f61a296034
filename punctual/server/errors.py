"""OpenAI-style errors: every failure answers {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("punctual.server")

# The `type` OpenAI's API uses for each status we answer with.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error to answer over HTTP; raise it anywhere in a route."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 error_type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or ERROR_TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def from_value_error(exc: ValueError, fields: dict[str, str] | None = None) -> APIError:
    """A 400 from a ValueError that names its field first ("max_tokens must be ..."), as SamplingParams raises.

    `fields` maps the names such errors start with to the request field the client should fix.
    """
    message = str(exc)
    first_word, _, rest = message.partition(" ")
    param = (fields or {}).get(first_word)
    if param is None:
        return bad_request(message)
    return bad_request(f"{param} {rest}", param)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _field_path(loc: tuple) -> str:
    """("body", "prompt", "list[int]", 0) -> "prompt.0": the path as the client wrote it.

    Pydantic puts the union member it tried ("str", "list[int]", "TextPart") into the location;
    those are not fields, so they are left out.
    """
    parts = []
    for part in loc:
        if isinstance(part, int):
            parts.append(str(part))
        elif part != "body" and part.isidentifier() and part.islower() and part not in _TYPE_TAGS:
            parts.append(part)
    return ".".join(parts)


def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    param = _field_path(first.get("loc", ())) or None
    detail = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        message = f"request body is not valid JSON: {first.get('ctx', {}).get('error', detail)}"
        param = None
    elif first.get("type") == "extra_forbidden":
        # Refused rather than ignored: the client would otherwise get output that silently lacks it.
        message = (f"{param}: Punctual does not implement this field (the fields it accepts and ignores "
                   "are listed in the README)")
    else:
        detail = detail.removeprefix("Value error, ")  # pydantic's wording of a validator's ValueError
        message = f"{param}: {detail}" if param else detail
    return bad_request(message, param).response()


def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return APIError(exc.status_code, message).response()


def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return exc.response()


def _unexpected_error(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error in a route", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}").response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    # FastAPI answers 422 for schema errors; OpenAI clients expect 400 in the error shape.
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
