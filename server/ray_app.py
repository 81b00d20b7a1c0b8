"""Ray Serve scale-out: the FastAPI app of `gpt2-engine serve` as a Ray Serve deployment, one engine per replica.
(~450 lines, one job: putting the server on a Ray cluster: the deployment, the bounded deploy and its
one-line configuration errors.)

    gpt2-engine serve artifacts/gpt2 --ray --replicas 2 --num-cpus 1       # a local cluster, 2 replicas
    gpt2-engine serve /shared/gpt2 --ray --autoscale 1:8 --ray-address auto   # join `ray start --head`
    serve run examples/serve_config.yaml                                      # Ray's own tooling

Each replica is one Ray actor holding its own `Generator` (weights, KV-cache slot pool, engine loop
thread) and its own copy of the app (`server.app.create_app` on a per-replica `ServerState`): replicas
share nothing, and Ray's HTTP proxy spreads requests over them. The app is late-bound
(`@serve.ingress()` + `__serve_build_asgi_app__`): its routes close over the replica's `ServerState`,
which only exists once the replica's engine has loaded, so each replica builds its app after loading.

- `ray_actor_options={"num_cpus": F}` (fractional allowed) reserves the replica's cores, and ONNX
  Runtime's intra-op threads follow it: F rounded to the nearest integer (halves up), at least 1,
  read from the resources Ray actually assigned, so a Serve config file that overrides `num_cpus`
  moves the threads with it.
- `max_ongoing_requests` (requests the proxy sends a replica at once) is never below the replica's
  slot pool (`max_batch`); what is beyond it waits in the proxy, which then routes it to whichever
  replica frees up first. `max_queued_requests` bounds that wait (503 past it, like the engine's queue).
- `check_health` asks the engine: the loop thread must be alive. A failing check makes Serve replace
  the replica.
- Responses carry `X-Replica-Id` (the replica's Serve id), so a client can see which replica answered.
- Streams go through the proxy one SSE event at a time; a client that disconnects cancels its
  request in the replica (the app's own disconnect path: the engine request is aborted, its slot freed).

Bad configuration ends with one line (`RayDeployError`): a model directory missing on a node (checked
in the replica's constructor), more CPUs asked for than the cluster has (checked before deploying), or
replicas that cannot be placed or started within a bounded wait.

This module imports `server` and `engine`; nothing imports it but the CLI's `serve --ray` branch.
"""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions  # noqa: F401 -- imported here so a partial install fails now
except ImportError as e:  # one line, with the fix
    from engine.errors import install_hint
    raise ImportError(f"Ray Serve is not installed ({e}): {install_hint('serve', 'ray')}") from None

from server.app import ServerState, create_app

log = logging.getLogger("gpt2_engine.server")

APP_NAME = "gpt2-engine"
DEPLOYMENT_NAME = "GPT2Engine"
DEFAULT_NUM_CPUS = 1.0            # 2 replicas fit on 2 cores
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_QUEUE = 64
DEPLOY_TIMEOUT_S = 180.0          # a replica loads in seconds (gpt2: ~2 s); gpt2-xl from a slow disk: minutes
CONSTRUCTOR_RETRIES = 3           # a constructor that fails 3 times marks the deployment failed (Serve's default: 20)


class RayDeployError(RuntimeError):
    """A deployment that cannot run: the message is one line and says what to change."""


class ReplicaSetupError(RuntimeError):
    """Raised in a replica's constructor for a configuration the replica cannot serve (one line)."""


def threads_for(num_cpus: float) -> int:
    """ONNX Runtime intra-op threads for a replica reserving `num_cpus` CPUs: the nearest integer, at least 1."""
    return max(1, int(math.floor(num_cpus + 0.5)))


def weight_bytes(model_dir: str | os.PathLike) -> int:
    """Bytes of the ONNX graph and its external data: what each replica maps into memory."""
    p = Path(model_dir)
    return sum(f.stat().st_size for f in p.iterdir() if f.is_file() and f.name.startswith("model.onnx"))


class _ReplicaHeader:
    """Pure ASGI middleware: `X-Replica-Id` on every response. Behind Ray's proxy, which adds its own
    X-Request-ID (the same id it passed in), the app's copy of that header is dropped so it appears once."""

    def __init__(self, app, replica_id: str):
        self.app = app
        self.header = (b"x-replica-id", replica_id.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"x-request-id")

        async def send_with_replica(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if not (k == b"x-request-id" and v == given)]
                message = {**message, "headers": [*headers, self.header]}
            await send(message)

        await self.app(scope, receive, send_with_replica)


@serve.deployment(
    name=DEPLOYMENT_NAME,
    ray_actor_options={"num_cpus": DEFAULT_NUM_CPUS},
    max_ongoing_requests=2 * DEFAULT_MAX_BATCH,
    max_queued_requests=DEFAULT_MAX_QUEUE,
    health_check_period_s=5.0,
    health_check_timeout_s=30.0,
    graceful_shutdown_wait_loop_s=1.0,
    graceful_shutdown_timeout_s=30.0,
    max_constructor_retry_count=CONSTRUCTOR_RETRIES,
)
@serve.ingress()
class GPT2Engine:
    """One replica: one Generator and its own copy of the server's FastAPI app."""

    def __init__(self, model_dir: str, *, max_batch: int = DEFAULT_MAX_BATCH, max_queue: int = DEFAULT_MAX_QUEUE,
                 threads: int | None = None, served_model_name: str | None = None, api_key: str | None = None,
                 cors_origins: tuple[str, ...] | list[str] = ()):
        from engine import Generator

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.node = ray.util.get_node_ip_address()
        path = Path(model_dir).expanduser()
        if not (path / "manifest.json").is_file():
            what = "has no manifest.json" if path.is_dir() else "does not exist"
            raise ReplicaSetupError(
                f"model directory {model_dir} {what} on node {self.node}: every node that can run a replica needs it "
                "at this same path (shared storage, or a copy on each node; docs/scaling.md)")
        self.num_cpus = float(ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0))
        self.threads = threads or threads_for(self.num_cpus)
        self.gen = Generator.from_pretrained(path, threads=self.threads, max_batch=max_batch, max_queue=max_queue)
        self.gen.warm_up()   # the slot pool committed before the first request, not inside it
        self.state = ServerState(model_name=served_model_name or path.name, api_key=api_key, root=str(path.resolve()))
        self.state.set_ready(self.gen)
        self.cors_origins = tuple(cors_origins)
        self.model_dir = str(path.resolve())
        log.info("replica %s on %s: %s loaded in %.1f s (%d threads for %g CPUs, max_batch %d)", self.replica_id,
                 self.node, self.state.model_name, self.gen.load_s, self.threads, self.num_cpus, max_batch)

    def __serve_build_asgi_app__(self):
        return _ReplicaHeader(create_app(self.state, self.cors_origins), self.replica_id)

    def check_health(self) -> None:
        """Serve calls this every health_check_period_s; raising marks the replica unhealthy (it is replaced)."""
        if not self.gen.core.alive:
            raise RuntimeError(f"replica {self.replica_id}: the engine loop thread is not running")
        if self.state.status not in ("ready", "draining"):
            raise RuntimeError(f"replica {self.replica_id}: server status {self.state.status}")

    def info(self) -> dict:
        """What the replica is and holds (tests, docs/scaling.md's sizing): call it through a handle,
        `serve.get_app_handle(APP_NAME).info.remote().result()`."""
        import psutil

        st = self.gen.stats()
        mem = psutil.Process().memory_info()
        return {"replica_id": self.replica_id, "node": self.node, "pid": os.getpid(), "rss_bytes": mem.rss,
                "weight_bytes": weight_bytes(self.model_dir), "threads": self.threads, "num_cpus": self.num_cpus,
                "running": st.running, "waiting": st.waiting, "max_batch": st.max_batch, "max_queue": st.max_queue,
                "forward_calls": st.forward_calls, "engine_alive": self.gen.core.alive}

    def __del__(self):
        gen = getattr(self, "gen", None)
        if gen is not None:
            self.state.status = "draining"
            gen.close()     # stops the loop thread (what still runs ends with EngineClosed), then the backend
            self.gen = None


# --- options -> a Serve application -------------------------------------------------------------------


@dataclass
class RayOptions:
    """How to deploy: the scale-out knobs of `gpt2-engine serve --ray` and of a Serve config's `args`."""
    model_dir: str                              # a model directory, at this path on every node
    replicas: int = 1
    autoscale: tuple[int, int] | None = None    # (min, max) replicas; replaces `replicas`
    target_ongoing_requests: float | None = None  # autoscaling: requests per replica to aim for (default max_batch / 2)
    num_cpus: float = DEFAULT_NUM_CPUS          # per replica, fractional allowed
    threads: int | None = None                  # ONNX Runtime threads per replica (default: num_cpus rounded, at least 1)
    max_batch: int = DEFAULT_MAX_BATCH
    max_queue: int = DEFAULT_MAX_QUEUE
    max_ongoing_requests: int | None = None     # default 2 * max_batch; never below max_batch
    served_model_name: str | None = None
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    drain_timeout_s: float = 30.0               # a stopping replica's running requests get this long
    name: str = APP_NAME                        # the Serve application
    route_prefix: str = "/"

    def __post_init__(self):
        if self.autoscale is not None:
            lo, hi = self.autoscale
            if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi and hi >= 1):
                raise RayDeployError(f"autoscale must be MIN:MAX with 0 <= MIN <= MAX and MAX >= 1, got {lo}:{hi}")
        elif not (isinstance(self.replicas, int) and self.replicas >= 1):
            raise RayDeployError(f"replicas must be an integer >= 1, got {self.replicas!r}")
        if not self.num_cpus > 0:
            raise RayDeployError(f"num_cpus per replica must be > 0 (fractions allowed, e.g. 0.5), got {self.num_cpus}")
        if self.max_batch < 1:
            raise RayDeployError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_ongoing_requests is None:
            self.max_ongoing_requests = 2 * self.max_batch
        if self.max_ongoing_requests < self.max_batch:
            raise RayDeployError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch "
                                 f"({self.max_batch}): a replica's slot pool would never fill")

    @property
    def min_replicas(self) -> int:
        return self.autoscale[0] if self.autoscale else self.replicas

    @property
    def max_replicas(self) -> int:
        return self.autoscale[1] if self.autoscale else self.replicas

    def autoscaling_config(self) -> dict | None:
        if self.autoscale is None:
            return None
        lo, hi = self.autoscale
        target = self.target_ongoing_requests or max(1.0, self.max_batch / 2)
        return {"min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1),
                "target_ongoing_requests": target}


def deployment(opts: RayOptions):
    """The GPT2Engine deployment with these options' replicas, CPUs and request limits."""
    scaling = {"autoscaling_config": opts.autoscaling_config()} if opts.autoscale else {"num_replicas": opts.replicas}
    return GPT2Engine.options(ray_actor_options={"num_cpus": opts.num_cpus},
                              max_ongoing_requests=opts.max_ongoing_requests, max_queued_requests=opts.max_queue,
                              graceful_shutdown_timeout_s=opts.drain_timeout_s, **scaling)


def build_app(opts: RayOptions):
    """The Serve application (`serve.run` it, or let `deploy` do it)."""
    return deployment(opts).bind(opts.model_dir, max_batch=opts.max_batch, max_queue=opts.max_queue, threads=opts.threads,
                    served_model_name=opts.served_model_name, api_key=opts.api_key, cors_origins=tuple(opts.cors_origins))


def app_builder(args: dict):
    """For Serve config files (`import_path: server.ray_app:app_builder`, `args: {model_dir: ...}`): the
    deployment with the engine's arguments; replicas, num_cpus and autoscaling come from the config's
    `deployments:` section (examples/serve_config.yaml)."""
    args = dict(args)
    if "model_dir" not in args:
        raise RayDeployError("the Serve config's args need model_dir: the model directory, at the same path on every node")
    model_dir = args.pop("model_dir")
    allowed = {"max_batch", "max_queue", "threads", "served_model_name", "api_key", "cors_origins"}
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise RayDeployError(f"unknown args {unknown} in the Serve config: allowed are model_dir, {', '.join(sorted(allowed))}")
    return GPT2Engine.bind(model_dir, **args)


# --- deploying, with bounded waits and one-line errors --------------------------------------------------


def _cpus(n: float) -> str:
    return f"{n:g} CPU" + ("" if n == 1 else "s")


def check_capacity(opts: RayOptions) -> None:
    """Fail before deploying when the cluster cannot place the replicas at all (it would wait forever)."""
    total = float(ray.cluster_resources().get("CPU", 0.0))
    per_node = [float(n.get("Resources", {}).get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")]
    biggest = max(per_node, default=0.0)
    if opts.num_cpus > biggest + 1e-9:
        raise RayDeployError(f"a replica asks for {_cpus(opts.num_cpus)} but the largest node has {biggest:g}: "
                             "lower --num-cpus, or add a bigger node")
    need = opts.min_replicas * opts.num_cpus
    if need > total + 1e-9:
        fit = int(total // opts.num_cpus + 1e-9)
        raise RayDeployError(f"{opts.min_replicas} replicas x {_cpus(opts.num_cpus)} = {_cpus(need)}, but the cluster "
                             f"has {total:g}: at most {fit} fit; lower --replicas (or the autoscale minimum) or "
                             "--num-cpus, or add nodes (ray start --address=...)")
    if opts.autoscale and opts.max_replicas * opts.num_cpus > total + 1e-9:
        log.warning("autoscale max %d x %g CPUs exceeds the cluster's %g CPUs: it grows to %d replicas unless nodes "
                    "are added", opts.max_replicas, opts.num_cpus, total, int(total // opts.num_cpus + 1e-9))


def _one_line(message: str) -> str:
    """The replica's own error line out of Serve's status message (which may hold a whole traceback)."""
    m = re.search(r"ReplicaSetupError: (.+)", message)
    if m:
        return m.group(1).strip()
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b", ln)]
    return (errors[-1] if errors else lines[-1] if lines else "no message").strip()


def wait_running(name: str = APP_NAME, timeout_s: float = DEPLOY_TIMEOUT_S, poll_s: float = 0.25) -> None:
    """Wait for application `name` to be RUNNING; raise RayDeployError (one line) when it failed or when it is
    still not running after timeout_s (e.g. replicas that cannot be placed: Serve would wait for nodes forever)."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        app = serve.status().applications.get(name)
        if app is not None:
            status = str(app.status.value if hasattr(app.status, "value") else app.status)
            if status == "RUNNING":
                return
            messages = [d.message for d in app.deployments.values() if d.message] + ([app.message] if app.message else [])
            last = messages[0] if messages else last
            if status == "DEPLOY_FAILED":
                raise RayDeployError(f"deploying {name} failed: {_one_line(last)}")
        if time.monotonic() > deadline:
            raise RayDeployError(f"{name} was not running after {timeout_s:.0f} s: {_why_pending(app, last)}")
        time.sleep(poll_s)


def _why_pending(app, message: str) -> str:
    """What a deployment that is not running yet waits for, in one line."""
    states = {}
    for d in (app.deployments.values() if app is not None else ()):
        for k, v in d.replica_states.items():
            states[str(getattr(k, "value", k))] = states.get(str(getattr(k, "value", k)), 0) + v
    free = float(ray.available_resources().get("CPU", 0.0))
    total = float(ray.cluster_resources().get("CPU", 0.0))
    parts = [", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())) or "no replica started",
             f"{free:g} of the cluster's {total:g} CPUs free"]
    if message:
        said = _one_line(message) if "Error" in message else " ".join(message.split())
        parts.append("Serve says: " + said[:300])
    return ("; ".join(parts) + ": replicas that cannot be placed wait for CPUs to free up or nodes to join "
            "(`ray status`); lower --replicas or --num-cpus, or add nodes")


def deploy(opts: RayOptions, *, timeout_s: float = DEPLOY_TIMEOUT_S) -> str:
    """Deploy on the connected cluster (Serve must be started, or it starts with its defaults) and wait, bounded,
    until every replica is up. Returns the application's URL. On failure the application is deleted again."""
    check_capacity(opts)
    from ray.serve.api import RunTarget
    serve.run_many([RunTarget(build_app(opts), name=opts.name, route_prefix=opts.route_prefix)],
                   wait_for_applications_running=False)
    try:
        wait_running(opts.name, timeout_s)
    except BaseException:
        try:
            # Not blocking: a replica still waiting for CPUs takes graceful_shutdown_timeout_s to be given up on.
            serve.delete(opts.name, _blocking=False)
        except Exception:  # noqa: BLE001 -- the original error is the one to report
            log.debug("deleting %s after a failed deploy failed", opts.name, exc_info=True)
        raise
    return proxy_url() + opts.route_prefix.rstrip("/")


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A HOST:PORT (or ray://HOST:PORT) address must accept a TCP connection: Ray itself retries an
    unreachable head for minutes. `auto` (the cluster `ray start` left on this machine) is Ray's to find."""
    m = re.fullmatch(r"(?:ray://)?\[?([^\]]+?)\]?:(\d+)", address.strip())
    if not m:
        return
    import socket
    try:
        socket.create_connection((m.group(1), int(m.group(2))), timeout=timeout_s).close()
    except OSError as e:
        raise RayDeployError(f"cannot join the Ray cluster at {address}: {e.strerror or e} (is `ray start --head` "
                             "running there, and the port open?)") from None


def proxy_url() -> str:
    """http://host:port of the running Serve instance's HTTP proxy."""
    from ray.serve.context import _get_global_client
    cfg = _get_global_client().http_config
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "") else cfg.host
    return f"http://[{host}]:{cfg.port}" if ":" in host else f"http://{host}:{cfg.port}"


def run(opts: RayOptions, *, address: str | None = None, host: str = "127.0.0.1", port: int = 8000,
        timeout_s: float = DEPLOY_TIMEOUT_S, echo=print) -> int:
    """`gpt2-engine serve MODEL --ray`: join `address` (or start a local cluster), deploy, print the URL, block
    until SIGINT/SIGTERM, then take the application down (a local cluster: Serve and Ray too; a joined
    cluster: this application, and Serve when no other application is left). Returns the exit code."""
    started_local = not address
    if address:
        check_reachable(address)
    try:
        ray.init(address=address or None, include_dashboard=False, logging_level=logging.WARNING)
    except ConnectionError as e:
        raise RayDeployError(f"cannot join the Ray cluster at {address}: {' '.join(str(e).split())}") from None
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        check_capacity(opts)          # before Serve starts: a cluster too small says so at once
        serve.start(http_options={"host": host, "port": port})
        url = proxy_url()
        if not started_local and url != f"http://{host}:{port}":
            echo(f"note: Serve was already running on this cluster; its proxy listens on {url}")
        url = deploy(opts, timeout_s=timeout_s)
        where = "local Ray cluster" if started_local else f"Ray cluster {address}"
        scale = (f"autoscaling {opts.autoscale[0]}-{opts.autoscale[1]} replicas" if opts.autoscale
                 else f"{opts.replicas} replica{'s' if opts.replicas != 1 else ''}")
        echo(f"serving {opts.served_model_name or Path(opts.model_dir).name} on {url} ({where}, {scale}, "
             f"{_cpus(opts.num_cpus)} each; Ctrl-C stops)")
        while not stop.wait(1.0):
            pass
        echo("stopping")
        return 0
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        try:
            if started_local:
                serve.shutdown()
            else:
                serve.delete(opts.name)
                if not serve.status().applications:
                    serve.shutdown()
        except Exception:  # noqa: BLE001 -- shutting down; Ray's own shutdown below still runs
            log.warning("stopping Serve failed", exc_info=True)
        ray.shutdown()


def model_dir_for_cluster(model: str, *, address: str | None, precision: str = "fp32", init: str | None = None) -> str:
    """The absolute model directory replicas load. A model directory here: its absolute path. Joining a cluster,
    an absolute path that is not here is passed on as is (the cluster's nodes may have it; replicas check).
    Anything else (a name, a checkpoint) is exported here once, as `gpt2-engine serve` does, which serves
    a local cluster; a multi-node cluster needs that directory at the same path on every node."""
    p = Path(model).expanduser()
    if (p / "manifest.json").is_file():
        return str(p.resolve())
    if address and p.is_absolute():
        log.info("%s is not on this machine: the cluster's nodes must have it (replicas check at start)", p)
        return str(p)
    from export.model_cache import resolve_model_dir
    return str(Path(resolve_model_dir(model, precision=precision, init=init)).resolve())


def serve_from_cli(model: str, *, address: str | None = None, replicas: int | None = None,
                   autoscale: tuple[int, int] | None = None, num_cpus: float = DEFAULT_NUM_CPUS, host: str = "127.0.0.1",
                   port: int = 8000, precision: str = "fp32", init: str | None = None, echo=print, **engine) -> int:
    """`gpt2-engine serve MODEL --ray ...` (cli/main.py): resolve MODEL, deploy, serve until a signal.
    `engine`: max_batch, max_queue, threads, api_key, cors_origins, served_model_name, drain_timeout_s."""
    if replicas is not None and autoscale is not None:
        raise RayDeployError("give --replicas N or --autoscale MIN:MAX, not both")
    model_dir = model_dir_for_cluster(model, address=address, precision=precision, init=init)
    engine.setdefault("served_model_name", None)
    engine["served_model_name"] = engine["served_model_name"] or model
    opts = RayOptions(model_dir, replicas=replicas or 1, autoscale=autoscale, num_cpus=num_cpus,
                      **{k: v for k, v in engine.items() if v is not None})
    return run(opts, address=address, host=host, port=port, echo=echo)
