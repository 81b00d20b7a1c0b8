"""Running the server: `serve` (the CLI's, with SIGTERM drain) and `start_in_thread` (tests, benchmarks).

uvicorn runs programmatically (uvicorn.Config + a uvicorn.Server subclass) so that shutdown is ours:

- SIGTERM or SIGINT starts a drain: /health and new requests answer 503 (`Retry-After`), requests
  already admitted run to their end; when none is left, or after `drain_timeout_s`, the server stops
  (past the bound, the engine aborts what still runs: streams end with an error event and [DONE]).
  A second signal stops at once. The process then exits 0 (uvicorn's own handler would re-raise the
  signal after shutdown, which ends the process with -15 instead).
- MODEL is checked first (what it names, and a model directory's files: no weights read), so that a
  mistyped path is one error line and no port is bound. Then the listening socket is bound, and the
  model loads in a background thread, so that /health answers 503 "loading" meanwhile (a named model may
  be exported first: minutes).
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from engine.errors import EngineError, RandomWeightsWarning
from server.app import ServerState, create_app

log = logging.getLogger("gpt2_engine.server")
DRAIN_TIMEOUT_S = 30.0


class _Server(uvicorn.Server):
    """uvicorn.Server whose exit signals drain the app instead of closing its connections at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout_s: float):
        super().__init__(config)
        self.state = state
        self.drain_timeout_s = drain_timeout_s
        self.drain_started: float | None = None
        self._drain_warned = False

    def handle_exit(self, sig: int, frame) -> None:   # a signal handler: set flags only
        if self.drain_started is None and self.state.status == "ready":
            self.begin_drain(signal.Signals(sig).name)
        elif self.should_exit:
            self.force_exit = True
        else:
            self.should_exit = True

    def begin_drain(self, why: str = "stop requested") -> None:
        self.state.status = "draining"
        self.drain_started = time.monotonic()
        log.info("%s: draining (new requests get 503; %d running; bound %.0f s)", why, self.state.inflight,
                 self.drain_timeout_s)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_started is not None and not self.should_exit:
            waited = time.monotonic() - self.drain_started
            if self.state.inflight == 0:
                log.info("drained in %.1f s: stopping", waited)
                self.should_exit = True
            elif waited > self.drain_timeout_s and not self._drain_warned:
                log.warning("%d requests still running after the %.0f s drain bound: aborting them",
                            self.state.inflight, self.drain_timeout_s)
                self._drain_warned = True
                if self.state.gen is not None:
                    self.state.gen.abort_all()   # they end at the next loop iteration; then inflight reaches 0
            elif waited > self.drain_timeout_s + 5:
                self.should_exit = True         # aborted requests did not finish: stop regardless
        return await super().on_tick(counter)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise EngineError(f"cannot listen on {host}:{port}: {e.strerror or e} (another server there? pick another "
                          "--port, or 0 for a free one)") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _config(app, timeout_graceful_s: int = 5) -> uvicorn.Config:
    # log_config=None: the logging the caller configured (serve: one format for uvicorn's lines and ours);
    # access_log off: the app logs one line per request with its request id.
    return uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", timeout_keep_alive=5,
                          timeout_graceful_shutdown=timeout_graceful_s)


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8, max_queue: int = 64,
          api_key: str | None = None, cors_origins: tuple[str, ...] = (), served_model_name: str | None = None,
          threads: int | None = None, precision: str = "fp32", init: str | None = None,
          drain_timeout_s: float = DRAIN_TIMEOUT_S, log_level: str = "info", draft: str | None = None,
          prefix_caching: bool = True) -> int:
    """Serve MODEL (a model directory or a name, exported on first use) until SIGTERM/SIGINT. Returns the exit
    code: 0 after a drain, 1 when the model failed to load."""
    _check_model(model, precision, init, draft)   # before binding: a wrong MODEL is one line, no "listening"
    logging.basicConfig(level=getattr(logging, log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = ServerState(model_name=served_model_name or model, api_key=api_key)
    app = create_app(state, cors_origins)
    sock = _bind(host, port)
    server = _Server(_config(app), state, drain_timeout_s)
    log.info("listening on %s (model %s: loading)", _url(sock), state.model_name)

    def load() -> None:
        try:
            from engine import Generator
            from export.model_cache import resolve_model_dir
            directory = resolve_model_dir(model, precision=precision, init=init)
            with warnings.catch_warnings():   # the "ready" line labels random weights, in the log's format
                warnings.simplefilter("ignore", RandomWeightsWarning)
                gen = Generator.from_pretrained(directory, threads=threads, max_batch=max_batch, max_queue=max_queue,
                                                draft=draft, prefix_caching=prefix_caching)
            t0 = time.perf_counter()
            gen.warm_up()              # the slot pool committed before the first request, not inside it
            warm_s = time.perf_counter() - t0
            state.root = str(Path(directory).resolve())
            label = " [" + gen.artifact.label + "]" if gen.artifact.is_random else ""
            state.set_ready(gen)
            if server.should_exit:     # stopped while loading
                return
            log.info("ready: %s%s, context %d, max_batch %d, max_queue %d (load %.1f s, slot pool %.1f s)",
                     state.model_name, label, gen.max_context, max_batch, max_queue, gen.load_s, warm_s)
        except Exception as e:  # noqa: BLE001 -- reported on /health and in the log; the server then stops
            state.status, state.error = "failed", f"{type(e).__name__}: {e}"
            log.error("loading %s failed: %s", model, state.error)
            server.should_exit = True

    loader = threading.Thread(target=load, name="gpt2-engine-load", daemon=True)
    loader.start()
    try:
        server.run(sockets=[sock])
    finally:
        loader.join()
        if state.gen is not None:
            _close(state.gen)
    return 1 if state.status == "failed" else 0


def _check_model(model: str, precision: str, init: str | None, draft: str | None) -> None:
    """What can be known about MODEL (and --draft) without exporting or loading: raises the one-line error."""
    from engine.artifact import load_artifact
    from export.model_cache import cache_key
    if cache_key(model, precision, init) is None:
        load_artifact(model)      # a model directory: its manifest and files
    if draft is not None:
        load_artifact(draft)


def _close(gen) -> None:
    core = getattr(gen, "core", None)
    if core is not None:
        core.close()     # Generator.close() closes the backend only; the loop thread first
    gen.close()


@dataclass
class ServerHandle:
    """A server running in a background thread of this process (see `start_in_thread`)."""
    url: str
    state: ServerState
    server: _Server
    thread: threading.Thread

    def drain(self) -> None:
        """What SIGTERM does: 503 for new requests, stop once the running ones are done."""
        self.server.begin_drain()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop now (open connections get uvicorn's graceful shutdown) and join the thread. The
        Generator is the caller's: it is not closed."""
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(5)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_in_thread(gen, host: str = "127.0.0.1", port: int = 0, *, model_name: str | None = None,
                    api_key: str | None = None, cors_origins: tuple[str, ...] = (),
                    drain_timeout_s: float = DRAIN_TIMEOUT_S, startup_timeout_s: float = 30.0) -> ServerHandle:
    """Serve an already loaded Generator from a background thread on host:port (0: a free port).

        with start_in_thread(gen) as srv:
            openai.OpenAI(base_url=srv.url + "/v1", api_key="-").completions.create(...)

    Returns once the server accepts connections; `handle.stop()` stops it (the Generator stays open).
    The model name defaults to the model directory's name.
    """
    name = model_name or Path(gen.artifact.path).name
    state = ServerState(model_name=name, api_key=api_key, root=str(Path(gen.artifact.path).resolve()))
    state.set_ready(gen)
    sock = _bind(host, port)
    server = _Server(_config(create_app(state, cors_origins), timeout_graceful_s=2), state, drain_timeout_s)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="gpt2-engine-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"the server did not start within {startup_timeout_s:.0f} s")
        time.sleep(0.01)
    return ServerHandle(_url(sock), state, server, thread)
