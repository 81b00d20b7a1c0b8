"""Prometheus metrics under vLLM's names (`vllm:` prefix, `model_name` label), so that dashboards and
alerts written for vLLM read this server unchanged:

    vllm:time_to_first_token_seconds     histogram  submission -> first token (queue + prefill)
    vllm:inter_token_latency_seconds     histogram  between consecutive tokens of one request
                                                    (vLLM before 0.9 called it time_per_output_token_seconds)
    vllm:e2e_request_latency_seconds     histogram  submission -> last token
    vllm:request_queue_time_seconds      histogram  submission -> admitted into the running batch
    vllm:num_requests_running            gauge      requests holding a batch slot (read from the engine)
    vllm:num_requests_waiting            gauge      requests queued for a slot (read from the engine)
    vllm:prompt_tokens_total             counter    prompt tokens admitted
    vllm:generation_tokens_total         counter    tokens generated (aborted requests' tokens included)
    vllm:request_success_total           counter    finished requests, label finished_reason (stop/length/abort)
    vllm:prefix_cache_queries_total      counter    prompt tokens looked up in the prefix cache (read from the engine)
    vllm:prefix_cache_hits_total         counter    of them, tokens served from it (vLLM: both count tokens)

Each app has its own registry (several servers can live in one process, as the tests run them).
Timings are the engine's own (`GenerationOutput.timings`), observed once per finished submission.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _EngineGauges:
    """Running / waiting and the prefix cache's counters, read from the engine at scrape time (the engine's
    count is the truth: it also counts the server's scoring submissions and in-process callers)."""

    def __init__(self, state, model_name: str):
        self.state = state
        self.model_name = model_name

    def collect(self):
        running = GaugeMetricFamily("vllm:num_requests_running", "Requests holding a batch slot.",
                                    labels=["model_name"])
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting for a batch slot.",
                                    labels=["model_name"])
        gen = self.state.gen
        stats = gen.stats() if gen is not None else None
        running.add_metric([self.model_name], stats.running if stats else 0)
        waiting.add_metric([self.model_name], stats.waiting if stats else 0)
        yield running
        yield waiting
        for name, doc, field in (
                ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
                 "prefix_cache_queries"),
                ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", "prefix_cache_hits")):
            counter = CounterMetricFamily(name, doc, labels=["model_name"])
            counter.add_metric([self.model_name], getattr(stats, field, 0) if stats else 0)
            yield counter


class Metrics:
    def __init__(self, state, model_name: str):
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        r, labels = self.registry, ["model_name"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=TTFT_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Inter-token latency.", labels,
                             buckets=ITL_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency.", labels,
                             buckets=E2E_BUCKETS, registry=r).labels(model_name)
        self.queue = Histogram("vllm:request_queue_time_seconds", "Time waiting for a batch slot.", labels,
                               buckets=E2E_BUCKETS, registry=r).labels(model_name)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens admitted.", labels,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", labels,
                                         registry=r).labels(model_name)
        self._success = Counter("vllm:request_success", "Finished requests by finish reason.",
                                labels + ["finished_reason"], registry=r)
        r.register(_EngineGauges(state, model_name))

    def admitted(self, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)

    def finished(self, output, finish_reason: str) -> None:
        """One submission ended normally: its engine timings and token count."""
        t = output.timings
        self.ttft.observe(t.ttft_s)
        for x in t.itl_s:
            self.itl.observe(x)
        self.e2e.observe(t.total_s)
        self.queue.observe(t.queue_s)
        self.generation_tokens.inc(len(output.token_ids))
        self._success.labels(self.model_name, finish_reason).inc()

    def aborted(self, generated_tokens: int) -> None:
        """One submission ended early (client gone, error): the tokens it had made still count."""
        self.generation_tokens.inc(generated_tokens)
        self._success.labels(self.model_name, "abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
