"""The FastAPI app: routes, the request-id / auth / error middleware, and the server's state.

    POST /v1/completions        OpenAI completions (JSON or SSE)          server.completions
    POST /v1/chat/completions   400: GPT-2 has no chat template
    GET  /v1/models[/{id}]      the served model, with max_model_len and random_weights
    POST /tokenize, /detokenize vLLM's shapes
    GET  /health                200 ready; 503 loading, draining or failed (HEAD: the status, no body)
    GET  /metrics               Prometheus text                           server.metrics
    HEAD /metrics               200, no body (clients such as aiperf probe with it)

A model with random weights (`export --init random`) is labelled: `random_weights: true` on its
/v1/models entry and the header `x-gpt2-engine-random-weights: true` on every /v1/ response.

Bodies are parsed by hand (`server.protocol.parse`) rather than by FastAPI's body injection, so that
every malformed body (not JSON, not an object, a wrong type, an unknown field) is one 400 in OpenAI's
envelope, whatever the Content-Type.

`--api-key` guards /v1/*, /tokenize and /detokenize (`Authorization: Bearer KEY`); /health and
/metrics stay open for probes and scrapers, as in vLLM.
"""

from __future__ import annotations

import contextvars
import hmac
import logging
import re
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.completions import CompletionResponse, build_plan
from server.errors import APIError, bad_request, internal, unavailable
from server.logprobs import TokenText
from server.metrics import CONTENT_TYPE, Metrics
from server.protocol import CompletionRequest, DetokenizeRequest, TokenizeRequest, parse

log = logging.getLogger("gpt2_engine.server")
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_VALID_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")     # echoed as given; anything else is replaced
PROTECTED = ("/v1/", "/tokenize", "/detokenize")
RANDOM_WEIGHTS_HEADER = (b"x-gpt2-engine-random-weights", b"true")


@dataclass
class ServerState:
    """What the routes share. `gen` is None until the model is loaded (health 503 'loading')."""
    model_name: str
    gen: object | None = None
    status: str = "loading"                  # loading | ready | draining | failed
    api_key: str | None = None
    root: str | None = None                  # the model directory (GET /v1/models `root`)
    inflight: int = 0                        # completion requests admitted and not yet answered
    created: int = field(default_factory=lambda: int(time.time()))
    error: str | None = None                 # why loading failed
    metrics: Metrics | None = None
    token_text: TokenText | None = None

    def __post_init__(self):
        self.metrics = Metrics(self, self.model_name)

    def set_ready(self, gen) -> None:
        self.gen = gen
        self.token_text = TokenText(gen.tokenizer)
        self.status = "ready"

    def require_ready(self):
        if self.status == "ready":
            return self.gen
        if self.status == "loading":
            raise unavailable("the model is still loading: retry shortly (GET /health says when it is ready)",
                              "model_loading")
        if self.status == "draining":
            raise unavailable("the server is shutting down and admits no new requests", "server_shutting_down")
        raise APIError(503, f"the model failed to load: {self.error}", "server_error", None, "model_load_failed")

    @property
    def random_weights(self) -> bool:
        """The loaded model's weights are random: its text is not language (labelled on /v1/ responses)."""
        artifact = getattr(self.gen, "artifact", None)
        return bool(getattr(artifact, "is_random", False))

    @property
    def capacity(self) -> int:
        st = self.gen.stats()
        return st.max_batch + st.max_queue


class RequestContext:
    """Pure ASGI middleware: X-Request-Id (echoed, or generated), the API key, one access-log line, and a
    500 in the envelope (traceback to the log) for anything a route did not handle."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if _VALID_ID.match(given) else uuid.uuid4().hex
        token = REQUEST_ID.set(rid)
        scope.setdefault("state", {})["request_id"] = rid
        status = [None]
        t0 = time.perf_counter()

        labelled = scope.get("path", "").startswith("/v1/")

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = [*message.get("headers", []), (b"x-request-id", rid.encode())]
                if labelled and self.state.random_weights:
                    headers.append(RANDOM_WEIGHTS_HEADER)
                message = {**message, "headers": headers}
            await send(message)

        try:
            path = scope.get("path", "")
            key = self.state.api_key
            if key and scope.get("method") != "OPTIONS" and path.startswith(PROTECTED):
                auth = headers.get(b"authorization", b"").decode("latin-1")
                given_key = auth[7:] if auth[:7].lower() == "bearer " else ""
                if not hmac.compare_digest(given_key.encode(), key.encode()):
                    err = APIError(401, "missing or incorrect API key: send it as 'Authorization: Bearer KEY'",
                                   "invalid_request_error", None, "invalid_api_key",
                                   headers={"WWW-Authenticate": "Bearer"})
                    await err.response()(scope, receive, send_with_id)
                    return
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("%s %s %s failed", rid, scope.get("method"), scope.get("path"))
            if status[0] is None:
                await internal(rid).response()(scope, receive, send_with_id)
        finally:
            # 499 (nginx's "client closed request", as docs/serving.md says): the client left before the whole
            # answer, whether or not its status line (a stream's 200) had gone out.
            code = 499 if status[0] is None or scope["state"].get("client_gone") else status[0]
            log.info("%s %s %s %s %.1f ms", rid, scope.get("method"), scope.get("path"), code,
                     (time.perf_counter() - t0) * 1e3)
            REQUEST_ID.reset(token)


def create_app(state: ServerState, cors_origins: tuple[str, ...] | list[str] = ()) -> FastAPI:
    app = FastAPI(title="gpt2-engine", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        messages = {404: f"no route {request.url.path}: see docs/serving.md for the endpoints",
                    405: f"method {request.method} is not allowed on {request.url.path}"}
        err = APIError(exc.status_code, messages.get(exc.status_code, str(exc.detail)), "invalid_request_error",
                       None, {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code))
        err.headers.update(exc.headers or {})
        return err.response()

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health(request: Request):
        code = 200 if state.status == "ready" else 503
        if request.method == "HEAD":
            return Response(status_code=code)
        body = {"status": state.status}
        if state.error:
            body["error"] = state.error
        return JSONResponse(body, status_code=code)

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def metrics(request: Request):
        if request.method == "HEAD":
            return Response(status_code=200, media_type=CONTENT_TYPE)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    def model_card() -> dict:
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "gpt2-engine",
                "root": state.root, "parent": None, "max_model_len": state.gen.max_context,
                "random_weights": state.random_weights}

    @app.get("/v1/models")
    async def models():
        state.require_ready()
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        state.require_ready()
        if model_id != state.model_name:
            raise APIError(404, f"the model `{model_id}` does not exist: this server serves `{state.model_name}`",
                           "invalid_request_error", "model", "model_not_found")
        return model_card()

    def check_model(name: str | None) -> None:
        if name is not None and name != state.model_name:
            raise APIError(404, f"the model `{name}` does not exist: this server serves `{state.model_name}`",
                           "invalid_request_error", "model", "model_not_found")

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse(CompletionRequest, await request.body())
        gen = state.require_ready()
        plan = build_plan(req, gen, state.model_name, state.capacity)
        return CompletionResponse(state, plan, request.scope["state"]["request_id"])

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raise bad_request("GPT-2 has no chat template, so this server has no chat endpoint: send the conversation "
                          "as text to POST /v1/completions", "messages", "chat_template_missing")

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = parse(TokenizeRequest, await request.body())
        gen = state.require_ready()
        check_model(req.model)
        ids = gen.encode(req.prompt)
        out = {"count": len(ids), "max_model_len": gen.max_context, "tokens": ids}
        if req.return_token_strs:
            out["token_strs"] = [state.token_text.string(t) for t in ids]
        return out

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = parse(DetokenizeRequest, await request.body())
        gen = state.require_ready()
        check_model(req.model)
        vocab = gen.config.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", "tokens")
        return {"prompt": gen.decode(req.tokens)}

    app.add_middleware(RequestContext, state=state)
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["authorization", "content-type", "x-request-id"],
                           expose_headers=["x-request-id"])
    return app
