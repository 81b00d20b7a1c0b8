"""Errors in OpenAI's envelope: `{"error": {"message", "type", "param", "code"}}`.

Every error the server answers goes through `APIError`, so the status, the envelope and the headers
(`Retry-After` on 503) are decided in one place. Engine errors map by class: InputError -> 400 (the
engine's message, with `param` = the request field it names), EngineOverloaded -> 503 + Retry-After,
EngineClosed -> 503 (the server is stopping). Anything else is a 500 whose traceback goes to the log
and whose message (one line, with the request id) goes to the client.
"""

from __future__ import annotations

import json
import re

from starlette.responses import Response

from engine import EngineClosed, EngineError, EngineOverloaded, InputError

# Engine parameter names -> the request fields they come from (the engine's messages name its own fields).
ENGINE_TO_API = {
    "max_new_tokens": "max_tokens",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "repetition_penalty": "repetition_penalty",
    "seed": "seed",
    "stop": "stop",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "logit_bias": "logit_bias",
    "logprobs": "logprobs",
    "min_tokens": "min_tokens",
    "stop_token_ids": "stop_token_ids",
    "prompt": "prompt",
    "token": "prompt",   # "token id 70000 is outside the vocabulary"
}
RETRY_AFTER_S = 1


class APIError(Exception):
    """An error answered to the client: HTTP status + OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        return Response(json.dumps(self.body()), status_code=self.status, media_type="application/json",
                        headers=self.headers)

    def sse(self) -> bytes:
        """The same error as a server-sent event (for an error after a stream's headers went out)."""
        return b"data: " + json.dumps(self.body()).encode() + b"\n\n"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def overloaded(message: str = "the server's queue is full: retry shortly") -> APIError:
    return APIError(503, message, "server_error", None, "engine_overloaded",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


def unavailable(message: str, code: str) -> APIError:
    return APIError(503, message, "server_error", None, code, headers={"Retry-After": str(RETRY_AFTER_S)})


def internal(request_id: str | None) -> APIError:
    rid = f" (request id {request_id})" if request_id else ""
    return APIError(500, f"internal server error{rid}; the server log has the details", "server_error", None,
                    "internal_error")


_FIELD = re.compile(r"^\s*([a-z_]+)")


def from_engine(e: EngineError) -> APIError:
    """Map an engine error to the API's: 400 for bad input (naming the field), 503 for overload/shutdown."""
    if isinstance(e, EngineOverloaded):
        return overloaded(f"the server's queue is full ({e}): retry shortly")
    if isinstance(e, EngineClosed):
        return unavailable(f"the server is shutting down ({e})", "server_shutting_down")
    if isinstance(e, InputError):
        message = str(e)
        m = _FIELD.match(message)
        param = ENGINE_TO_API.get(m.group(1)) if m else None
        message = message.replace("max_new_tokens", "max_tokens")
        return bad_request(message, param)
    return APIError(500, f"engine error: {e}", "server_error", None, "engine_error")


def from_validation(errors: list[dict]) -> APIError:
    """pydantic's errors -> one 400 naming the first bad field (every field's problem in the message)."""
    parts, param = [], None
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        kind = err.get("type", "")
        if kind == "json_invalid":
            return bad_request(f"the request body is not valid JSON: {err.get('msg')}", None, "invalid_json")
        if kind == "model_type" and not loc:
            return bad_request("the request body must be a JSON object", None, "invalid_json")
        if kind == "extra_forbidden":
            msg = f"unrecognized request argument supplied: {loc}"
        elif kind == "missing":
            msg = f"{loc}: a value is required"
        else:
            text = str(err.get("msg", "")).removeprefix("Value error, ")
            msg = f"{loc}: {text}" + (f" (got {_short(err['input'])})" if "input" in err else "")
        parts.append(msg)
        if param is None and err.get("loc"):
            param = str(err["loc"][0])
    return bad_request("; ".join(parts) if parts else "invalid request", param)


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
