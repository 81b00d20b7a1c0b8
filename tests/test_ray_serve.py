"""Ray Serve scale-out (server/ray_app.py) on a local Ray cluster this module starts once (2 CPUs) and always
shuts down: the official `openai` client through Ray's HTTP proxy (loopback, a free port), two replicas of
the tiny random model (0.5 CPU, 1 ONNX Runtime thread each), streams, a client that leaves, a replica
killed mid-stream (`ray.kill` on its actor, found by the X-Replica-Id header it answered with), bad
configurations, the Serve config example, and, last, that no Ray process of the test outlives the shutdown.

Skipped when Ray Serve is not installed (the [ray] extra); `make test` installs it. ~1 minute on 2 cores.
The long requests (1000 tokens, eos suppressed: ~1.5 s) are the ones that must still run while the test acts.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")   # nothing in the test session reaches the network

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install -e '.[ray]'")
openai = pytest.importorskip("openai", reason="the [serve] extra (openai client) is not installed")
httpx = pytest.importorskip("httpx", reason="the [serve] extra (httpx) is not installed")
psutil = pytest.importorskip("psutil")

import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve._private.common import DeploymentID, ReplicaID  # noqa: E402

from server.ray_app import (  # noqa: E402
    APP_NAME,
    DEPLOYMENT_NAME,
    GPT2Engine,
    RayDeployError,
    RayOptions,
    app_builder,
    deploy,
    deployment,
    threads_for,
)
from tests.runtime_fixtures import EOS, REPO  # noqa: E402

MODEL = "tiny"
NO_EOS = {str(EOS): -100}     # a long request that cannot end early
LONG = 1000                   # tokens: ~1.5 s through the proxy on 2 cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def alive(pids) -> list[str]:
    """The processes among `pids` still running (zombies count as gone), as 'pid name' strings."""
    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{pid} {p.name()}")
        except psutil.NoSuchProcess:
            pass
    return out


class Cluster:
    """A 2-CPU local Ray cluster with Serve's proxy on 127.0.0.1:PORT and the tiny model as 2 replicas."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.pids: set[int] = set()
        self.down = False

    def start(self) -> None:
        before = descendants()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        self.opts = RayOptions(self.model_dir, replicas=2, num_cpus=0.5, max_batch=4, served_model_name=MODEL)
        assert deploy(self.opts, timeout_s=90) == self.url
        self.pids = descendants() - before     # raylet, gcs_server, workers (controller, proxy, replicas), ...

    def shutdown(self) -> None:
        if self.down:
            return
        self.down = True
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def cluster(tiny_model):
    c = Cluster(str(tiny_model.art))
    try:
        c.start()
        yield c
    finally:
        c.shutdown()


@pytest.fixture
def client(cluster):
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=20)


def replica_infos(n: int = 2, tries: int = 60) -> dict[str, dict]:
    """`info()` of n distinct replicas, through the app's handle (the router picks replicas: call until n seen)."""
    handle = serve.get_app_handle(APP_NAME)
    seen: dict[str, dict] = {}
    for _ in range(tries):
        info = handle.info.remote().result(timeout_s=10)
        seen[info["replica_id"]] = info
        if len(seen) >= n:
            break
    return seen


def replica_actor(replica_id: str):
    """The Ray actor of a replica: Serve names it after the replica's full id."""
    return ray.get_actor(ReplicaID(replica_id, DeploymentID(DEPLOYMENT_NAME, APP_NAME)).to_full_id_str(),
                         namespace="serve")


# ---- no cluster: options and the config example ------------------------------------------------------------

def test_options_threads_follow_cpus_and_limits_cover_the_slot_pool():
    assert [threads_for(c) for c in (0.25, 0.5, 1, 1.5, 2, 2.4, 4)] == [1, 1, 1, 2, 2, 2, 4]
    d = deployment(RayOptions("/m", replicas=3, num_cpus=0.5, max_batch=8))
    assert (d.num_replicas, d.ray_actor_options, d.max_ongoing_requests, d.max_queued_requests) == \
        (3, {"num_cpus": 0.5}, 16, 64)
    auto = RayOptions("/m", autoscale=(1, 4), max_batch=8, target_ongoing_requests=6)
    assert auto.autoscaling_config() == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 1,
                                         "target_ongoing_requests": 6}
    cfg = deployment(auto)._deployment_config.autoscaling_config
    assert (cfg.min_replicas, cfg.max_replicas, cfg.target_ongoing_requests) == (1, 4, 6)
    with pytest.raises(RayDeployError, match=r"max_ongoing_requests \(4\) must be >= max_batch \(8\)"):
        RayOptions("/m", max_batch=8, max_ongoing_requests=4)
    with pytest.raises(RayDeployError, match="MIN:MAX"):
        RayOptions("/m", autoscale=(3, 2))
    with pytest.raises(RayDeployError, match="num_cpus per replica must be > 0"):
        RayOptions("/m", num_cpus=0)


def test_health_check_asks_the_engine():
    class Core:
        alive = True

    class Gen:
        core = Core()

    class State:
        status = "ready"

    replica = type("R", (), {"gen": Gen(), "state": State(), "replica_id": "r1"})()
    check = GPT2Engine.func_or_class.check_health
    check(replica)
    Core.alive = False
    with pytest.raises(RuntimeError, match="engine loop thread is not running"):
        check(replica)


def test_serve_config_example_is_valid():
    yaml = pytest.importorskip("yaml")
    from ray.serve.schema import ServeDeploySchema
    cfg = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "examples" / "serve_config.yaml").read_text()))
    (app,) = cfg.applications
    assert app.import_path == "server.ray_app:app_builder"
    assert app.deployments[0].name == DEPLOYMENT_NAME
    bound = app_builder(app.args)
    assert bound._bound_deployment.name == DEPLOYMENT_NAME
    with pytest.raises(RayDeployError, match="unknown args"):
        app_builder({"model_dir": "/m", "max_batc": 8})


def test_nothing_imports_the_deployment_module_but_the_cli():
    from tests.test_layering import LAYERS, imported_modules
    importers = [f"{path.relative_to(REPO)}:{line}" for layer in LAYERS for path in sorted((REPO / layer).rglob("*.py"))
                 for line, module in imported_modules(path.read_text()) if module.startswith("server.ray_app")]
    assert all(i.startswith("cli/") for i in importers) and importers, importers


def test_ray_not_installed_is_one_line():
    code = "import sys; sys.modules['ray'] = None\ntry:\n import server.ray_app\nexcept ImportError as e:\n print(e)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Ray Serve is not installed" in out.stdout and "pip install -e '.[serve,ray]'" in out.stdout
    assert len(out.stdout.strip().splitlines()) == 1


def test_cli_ray_options_are_checked_before_anything_starts():
    from click.testing import CliRunner

    from cli.main import main
    from server.ray_app import check_reachable
    run = CliRunner().invoke
    r = run(main, ["serve", "m", "--replicas", "2"])
    assert r.exit_code == 2 and "--replicas only apply with --ray" in r.output
    r = run(main, ["serve", "m", "--ray", "--autoscale", "3:1"])
    assert r.exit_code == 2 and "MIN:MAX with 0 <= MIN <= MAX" in r.output
    r = run(main, ["serve", "m", "--ray", "--replicas", "2", "--autoscale", "1:2"])
    assert r.exit_code == 1 and "give --replicas N or --autoscale MIN:MAX, not both" in r.output
    t0 = time.monotonic()
    with pytest.raises(RayDeployError, match=r"cannot join the Ray cluster at 127.0.0.1:\d+: .*ray start --head"):
        check_reachable(f"127.0.0.1:{free_port()}")
    assert time.monotonic() - t0 < 5


# ---- on the cluster --------------------------------------------------------------------------------------------

def test_completion_through_the_proxy(client):
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="Hello", max_tokens=8, logit_bias=NO_EOS)
    out = raw.parse()
    assert out.model == MODEL and out.usage.completion_tokens == 8 and out.choices[0].finish_reason == "length"
    assert out.choices[0].text
    assert raw.headers["x-replica-id"]
    assert len(raw.headers.get_list("x-request-id")) == 1      # the proxy's id, once


def test_stream_arrives_token_by_token(client):
    """The first event reaches the client while the replica is still generating (one event at a time through
    the proxy, not a buffered body), and the events' arrival times spread over the whole generation."""
    t0 = time.perf_counter()
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="Hello", max_tokens=LONG,
                                                      logit_bias=NO_EOS, stream=True)
    events = iter(raw.parse())
    first = next(events)
    stamps = [time.perf_counter() - t0]
    running = sum(i["running"] for i in replica_infos().values())
    text, finish = first.choices[0].text, None
    for ev in events:
        stamps.append(time.perf_counter() - t0)
        text += ev.choices[0].text
        finish = ev.choices[0].finish_reason or finish
    assert running == 1, "the first event came only after the replica had finished: the proxy buffered"
    assert finish == "length" and len(stamps) > 0.9 * LONG      # a few tokens share an event (UTF-8 held back)
    span = stamps[-1] - stamps[0]
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert span > 0.2 and stamps[0] < 0.5 * stamps[-1], (stamps[:3], stamps[-1])
    assert sum(g > 50e-6 for g in gaps) > len(gaps) / 2, "events arrived in bursts"
    assert text
    print(f"stream: {len(stamps)} events, first at {stamps[0] * 1e3:.0f} ms, last at {stamps[-1] * 1e3:.0f} ms, "
          f"{sum(g > 50e-6 for g in gaps)} gaps > 50 us")


def test_both_replicas_serve(cluster, client):
    seen = set()
    for _ in range(40):
        raw = client.completions.with_raw_response.create(model=MODEL, prompt="Hi", max_tokens=2)
        seen.add(raw.headers["x-replica-id"])
        if len(seen) == 2:
            break
    assert len(seen) == 2
    infos = replica_infos()
    assert set(infos) == seen
    for info in infos.values():   # one engine per replica, threads from its CPUs
        assert (info["num_cpus"], info["threads"], info["max_batch"], info["engine_alive"]) == (0.5, 1, 4, True)
        assert info["rss_bytes"] > info["weight_bytes"] > 0
    assert len({i["pid"] for i in infos.values()}) == 2
    print("replica RSS / weights (MB):", [(round(i["rss_bytes"] / 1e6), round(i["weight_bytes"] / 1e6))
                                          for i in infos.values()])


def test_health_check_runs_in_the_replicas(cluster):
    handle = serve.get_app_handle(APP_NAME)
    assert handle.check_health.remote().result(timeout_s=10) is None
    dep = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME]
    assert str(getattr(dep.status, "value", dep.status)) == "HEALTHY"


def test_client_disconnect_cancels_in_the_replica(cluster):
    before = sum(i["forward_calls"] for i in replica_infos().values())
    with httpx.Client(timeout=20) as http:
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": LONG, "logit_bias": NO_EOS, "stream": True}
        with http.stream("POST", cluster.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert sum(1 for _, line in zip(range(6), lines) if line.startswith("data: ")) >= 3
    deadline = time.monotonic() + 15
    while True:
        infos = replica_infos()
        if sum(i["running"] + i["waiting"] for i in infos.values()) == 0:
            break
        assert time.monotonic() < deadline, f"the request still runs after the client left: {infos}"
        time.sleep(0.1)
    spent = sum(i["forward_calls"] for i in infos.values()) - before
    assert spent < LONG / 2, f"{spent} forward calls: the request was not cancelled"


def test_replica_killed_mid_stream(cluster, client):
    """The stream ends with a connection error (no hang), the next requests succeed on the other replica,
    and Serve starts a new replica in place of the dead one."""
    old = set(replica_infos())
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="Hello", max_tokens=LONG,
                                                      logit_bias=NO_EOS, stream=True)
    victim = raw.headers["x-replica-id"]
    events = iter(raw.parse())
    got = [next(events) for _ in range(3)]
    t0 = time.monotonic()
    ray.kill(replica_actor(victim), no_restart=True)
    with pytest.raises(openai.APIConnectionError) as err:
        for ev in events:
            got.append(ev)
    assert time.monotonic() - t0 < 10
    assert len(got) < LONG
    cause = repr(err.value.__cause__ or err.value.__context__)
    assert "incomplete" in cause or "closed" in cause, cause
    for _ in range(5):
        out = client.completions.with_raw_response.create(model=MODEL, prompt="Hi", max_tokens=2)
        assert out.status_code == 200 and out.headers["x-replica-id"] != victim
    deadline = time.monotonic() + 60
    while True:
        now = set(replica_infos(2, tries=20))
        if len(now) == 2 and victim not in now and now - old:
            break
        assert time.monotonic() < deadline, f"no replacement replica after 60 s: {now}"
        time.sleep(0.5)
    dep = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME]
    assert dep.replica_states.get("RUNNING") == 2


def test_more_replicas_than_cpus_fails_before_deploying(cluster):
    with pytest.raises(RayDeployError) as err:
        deploy(RayOptions(cluster.model_dir, name="too-many", route_prefix="/too-many", replicas=5, num_cpus=0.5))
    assert str(err.value) == ("5 replicas x 0.5 CPUs = 2.5 CPUs, but the cluster has 2: at most 4 fit; lower --replicas "
                              "(or the autoscale minimum) or --num-cpus, or add nodes (ray start --address=...)")
    with pytest.raises(RayDeployError, match="a replica asks for 3 CPUs but the largest node has 2"):
        deploy(RayOptions(cluster.model_dir, name="too-big", route_prefix="/too-big", num_cpus=3))
    assert "too-many" not in serve.status().applications


def test_missing_model_directory_fails_the_deploy_in_one_line(cluster, tmp_path):
    missing = tmp_path / "not-here"
    t0 = time.monotonic()
    with pytest.raises(RayDeployError) as err:
        deploy(RayOptions(str(missing), name="missing", route_prefix="/missing", num_cpus=0.25), timeout_s=60)
    msg = str(err.value)
    assert "\n" not in msg
    assert re.fullmatch(rf"deploying missing failed: model directory {re.escape(str(missing))} does not exist on node "
                        r"\S+: every node that can run a replica needs it at this same path .*", msg), msg
    assert time.monotonic() - t0 < 60


def test_serve_config_deploys_through_the_controller(cluster):
    """What `serve deploy examples/serve_config.yaml` does, with this cluster's sizes: the import path, the
    args and the deployments section work together."""
    yaml = pytest.importorskip("yaml")
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema
    raw = yaml.safe_load((REPO / "examples" / "serve_config.yaml").read_text())
    app = raw["applications"][0]
    app.update(name="from-config", route_prefix="/cfg")
    app["args"].update(model_dir=cluster.model_dir, served_model_name=MODEL, max_batch=2)
    dep = app["deployments"][0]
    dep["ray_actor_options"]["num_cpus"] = 0.25
    dep.pop("autoscaling_config")
    dep["num_replicas"] = 1
    client = _get_global_client()
    client.deploy_apps(ServeDeploySchema.model_validate({"applications": [app]}))
    try:
        from server.ray_app import wait_running
        wait_running("from-config", 60)
        r = httpx.post(cluster.url + "/cfg/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 3},
                       timeout=20)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        info = serve.get_app_handle("from-config").info.remote().result(timeout_s=10)
        assert (info["num_cpus"], info["threads"], info["max_batch"]) == (0.25, 1, 2)
    finally:
        serve.delete("from-config")


def test_unplaceable_replicas_end_in_a_bounded_wait(cluster):
    """1.5 CPUs fit the cluster (2) but not what the two 0.5-CPU replicas leave free (1): Serve would wait for
    a node forever; deploy gives up after its bound, says why, and deletes the application."""
    t0 = time.monotonic()
    with pytest.raises(RayDeployError) as err:
        deploy(RayOptions(cluster.model_dir, name="big", route_prefix="/big", num_cpus=1.5), timeout_s=4)
    assert time.monotonic() - t0 < 15
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("big was not running after 4 s: ") and "CPUs free" in msg, msg


def test_shutdown_leaves_no_ray_process(cluster):
    """Last: `serve.shutdown(); ray.shutdown()` ends every process the cluster started (raylet, gcs_server,
    the workers holding the controller, the proxy and the replicas)."""
    names = {psutil.Process(p).name() for p in cluster.pids if alive([p])}
    assert any("raylet" in n for n in names) and any("gcs_server" in n for n in names), names
    cluster.shutdown()
    deadline = time.monotonic() + 20
    while alive(cluster.pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive(cluster.pids) == []


def _cli_help() -> str:
    from click.testing import CliRunner

    from cli.main import main
    return CliRunner().invoke(main, ["serve", "--help"]).output


def test_cli_serve_ray_starts_serves_and_stops(cluster, tiny_model):
    """`gpt2-engine serve MODEL --ray`: a local cluster of its own (after the module's is down), the URL
    printed, requests served, SIGTERM stops it with exit 0 and leaves no Ray process behind."""
    if "--ray" not in _cli_help():
        pytest.skip("gpt2-engine serve has no --ray option yet")
    assert cluster.down, "runs after test_shutdown_leaves_no_ray_process"
    port = free_port()
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", str(tiny_model.art), "--ray", "--port", str(port),
                             "--replicas", "1", "--num-cpus", "1", "--served-model-name", MODEL],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        lines = []
        url = None
        while url is None:
            assert time.monotonic() < deadline, "no URL after 120 s:\n" + "".join(lines)
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "the CLI exited:\n" + "".join(lines)
            lines.append(line)
            m = re.search(r"serving \S+ on (http://\S+) ", line)
            url = m.group(1) if m else None
        assert url == f"http://127.0.0.1:{port}"
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=20)
        assert c.completions.create(model=MODEL, prompt="Hi", max_tokens=3).usage.completion_tokens == 3
        children = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        assert children
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        rest = proc.stdout.read()
        assert proc.returncode == 0, "".join(lines) + rest
        deadline = time.monotonic() + 20
        while alive(children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert alive(children) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
