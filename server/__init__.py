"""gpt2-engine's HTTP server: OpenAI-compatible completions on the in-flight engine (docs/serving.md).

    gpt2-engine serve artifacts/gpt2 --port 8000            # the CLI (server.run.serve)

    from server import start_in_thread                      # in-process, e.g. for a benchmark
    with start_in_thread(gen, port=0) as srv: ... srv.url ...

Needs the `[serve]` extra (fastapi, uvicorn, prometheus_client). Imports engine (and export, for named
models); nothing in engine/ or export/ imports it (tests/test_layering.py).
"""

from server.app import ServerState, create_app
from server.run import ServerHandle, serve, start_in_thread

__all__ = ["ServerState", "create_app", "ServerHandle", "serve", "start_in_thread"]
