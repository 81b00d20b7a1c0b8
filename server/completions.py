"""POST /v1/completions: a validated request -> engine submissions -> OpenAI's response or SSE stream.
(~520 lines, one job: /v1/completions. Its JSON and SSE paths share the request expansion (prompts x n),
echo and logprobs assembly, and must stay in step, so they live together.)

One request becomes one submission per (prompt, choice): `n > 1` is n submissions of the same prompt
(choice j gets seed + j when a seed is given, so the choices differ and still reproduce; the choice's
`index` is prompt_index * n + j, as OpenAI numbers them). Every submission streams from the engine
(`Generator.astream_deltas`), for `stream: false` too, so both modes share the cancellation path:
the client leaving cancels the task that iterates, which aborts the engine request and frees its slot.

Streams: the response headers go out only once every submission produced its first delta, so an
error that comes before any token (queue full, prompt too long) is still an HTTP status with the
error envelope. After the headers, an error is sent as a `data: {"error": ...}` event, then
`data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field, replace

from starlette.responses import Response

from engine import EngineError, SamplingParams
from server.errors import APIError, bad_request, from_engine, internal, unavailable
from server.logprobs import LogprobsBuilder, prompt_logprobs
from server.protocol import MAX_LOGPROBS, MAX_N, CompletionRequest

log = logging.getLogger("gpt2_engine.server")

# Engine finish reasons -> OpenAI's ("stop": an eos or a stop string; "length": the token budget or the context).
# ("abort" never reaches a client: a disconnect cancels, and a drain past its bound answers 503.)
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "deadline": "length"}
# OpenAI's documented ranges for the fields the engine accepts more widely.
RANGES = {"temperature": (0.0, 2.0), "presence_penalty": (-2.0, 2.0), "frequency_penalty": (-2.0, 2.0)}
LOGIT_BIAS_RANGE = (-100.0, 100.0)


@dataclass
class Choice:
    index: int
    prompt: int                       # index into Plan.prompts
    params: SamplingParams | None     # None: max_tokens 0 with echo (score the prompt, generate nothing)


@dataclass
class Prompt:
    ids: list[int]
    text: str                         # what echo repeats: the request's text, or the ids decoded


@dataclass
class Plan:
    id: str
    created: int
    model: str
    prompts: list[Prompt]
    choices: list[Choice]
    echo: bool
    logprobs: int | None
    stream: bool
    include_usage: bool
    user: str | None = None
    # echo + logprobs with tokens to generate, not streamed: the engine gives the prompt's logprobs from the
    # prefill forward that also samples the first token (one forward); else a scoring submission (_score_prompt)
    engine_prompt_logprobs: bool = False


@dataclass
class ChoiceState:
    """One choice's progress: what it has produced so far (for the response, usage and metrics)."""
    choice: Choice
    text: str = ""
    n_tokens: int = 0
    finish_reason: str | None = None
    logprobs: LogprobsBuilder | None = None
    done: bool = False
    token_logprobs: list = field(default_factory=list)  # the engine's TokenLogprobs (non-streaming: built at the end)
    output: object = None                               # the engine's GenerationOutput, once finished


def build_plan(req: CompletionRequest, gen, model_name: str, capacity: int) -> Plan:
    """Check every field against OpenAI's rules and the engine's; tokenize; one Choice per submission."""
    if req.model is not None and req.model != model_name:
        raise APIError(404, f"the model `{req.model}` does not exist: this server serves `{model_name}` "
                            "(GET /v1/models)", "invalid_request_error", "model", "model_not_found")
    if req.suffix:
        raise bad_request("suffix is not supported: GPT-2 generates left to right only (insertion needs a model "
                          "trained for it)", "suffix")
    n = 1 if req.n is None else req.n
    if not 1 <= n <= MAX_N:
        raise bad_request(f"n must be in [1, {MAX_N}], got {n}", "n")
    if req.best_of is not None and req.best_of != n:
        raise bad_request(f"best_of other than n is not supported (best_of={req.best_of}, n={n}): the server "
                          "returns every choice it generates", "best_of")
    echo = bool(req.echo)
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    if max_tokens < 0 or (max_tokens == 0 and not echo):
        raise bad_request(f"max_tokens must be >= 1 (0 only with echo=true, to score the prompt), got {max_tokens}",
                          "max_tokens")
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
        raise bad_request(f"logprobs must be in [0, {MAX_LOGPROBS}], got {req.logprobs}", "logprobs")
    if req.min_tokens is not None and not 0 <= req.min_tokens <= max_tokens:
        raise bad_request(f"min_tokens must be in [0, max_tokens], got {req.min_tokens} (max_tokens is {max_tokens})",
                          "min_tokens")
    for name, (lo, hi) in RANGES.items():
        v = getattr(req, name)
        if v is not None and not lo <= v <= hi:
            raise bad_request(f"{name} must be in [{lo:g}, {hi:g}], got {v}", name)

    prompts = _prompts(req.prompt, gen)
    ctx = gen.max_context
    for p in prompts:
        if len(p.ids) + max_tokens > ctx:
            raise bad_request(f"this model's maximum context length is {ctx} tokens, but {len(p.ids) + max_tokens} "
                              f"were requested ({len(p.ids)} in the prompt, {max_tokens} for the completion): shorten "
                              "the prompt or lower max_tokens", "prompt", "context_length_exceeded")
    if max_tokens > 0 and len(prompts) * n > capacity:
        raise bad_request(f"{len(prompts)} prompt(s) x n={n} = {len(prompts) * n} submissions, more than this server "
                          f"holds at once ({capacity}: --max-batch + --max-queue): send fewer per request", "n")

    base = None
    if max_tokens > 0:
        base = _params(req, max_tokens, gen.config.vocab_size)
    engine_prompt_lp = base is not None and echo and req.logprobs is not None and not req.stream
    choices = []
    for pi in range(len(prompts)):
        for j in range(n):
            params = None
            if base is not None:
                params = base if base.seed is None or j == 0 else _replace(base, seed=base.seed + j)
                if engine_prompt_lp and j == 0:   # the prompt's logprobs once per prompt: its other choices share them
                    params = _replace(params, prompt_logprobs=req.logprobs)
            choices.append(Choice(pi * n + j, pi, params))
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed with stream=true", "stream_options")
    return Plan(f"cmpl-{uuid.uuid4().hex}", int(time.time()), model_name, prompts, choices, echo, req.logprobs,
                bool(req.stream), include_usage, req.user, engine_prompt_lp)


def _prompts(prompt, gen) -> list[Prompt]:
    if isinstance(prompt, str):
        items = [prompt]
    elif all(isinstance(p, str) for p in prompt):
        items = list(prompt)
    elif all(isinstance(t, int) for t in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    out = []
    vocab = gen.config.vocab_size
    for i, item in enumerate(items):
        where = f"prompt[{i}]" if len(items) > 1 else "prompt"
        if isinstance(item, str):
            ids, text = gen.encode(item), item
        else:
            bad = [t for t in item if not 0 <= t < vocab]
            if bad:
                raise bad_request(f"{where}: token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt")
            ids, text = list(item), gen.decode(item)
        if not ids:
            raise bad_request(f"{where} is empty: give at least one token (send '<|endoftext|>' to generate from "
                              "the start of a document, which is what an omitted prompt does)", "prompt")
        out.append(Prompt(ids, text))
    return out


def _params(req: CompletionRequest, max_tokens: int, vocab: int) -> SamplingParams:
    bias = None
    if req.logit_bias:
        bias = {}
        lo, hi = LOGIT_BIAS_RANGE
        for k, v in req.logit_bias.items():
            try:
                tok = int(k)
            except ValueError:
                raise bad_request(f"logit_bias keys must be token ids (as strings), got {k!r}", "logit_bias") from None
            if not 0 <= tok < vocab:
                raise bad_request(f"logit_bias: token id {tok} is outside the vocabulary [0, {vocab})", "logit_bias")
            if not lo <= v <= hi:
                raise bad_request(f"logit_bias values must be in [{lo:g}, {hi:g}], got {v} for token {tok}", "logit_bias")
            bias[tok] = float(v)
    for tok in req.stop_token_ids or ():
        if not 0 <= tok < vocab:
            raise bad_request(f"stop_token_ids: token id {tok} is outside the vocabulary [0, {vocab})", "stop_token_ids")
    kwargs = dict(
        max_new_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if req.top_k is None else req.top_k,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        seed=req.seed,
        stop=tuple(req.stop or ()),
        stop_at_eos=not req.ignore_eos,
        min_tokens=req.min_tokens or 0,
        stop_token_ids=tuple(req.stop_token_ids or ()),
        presence_penalty=0.0 if req.presence_penalty is None else req.presence_penalty,
        frequency_penalty=0.0 if req.frequency_penalty is None else req.frequency_penalty,
        logit_bias=bias,
        logprobs=req.logprobs,
    )
    try:
        return SamplingParams(**kwargs)
    except EngineError as e:
        raise from_engine(e) from None


def _replace(params: SamplingParams, **kw) -> SamplingParams:
    try:
        return replace(params, **kw)
    except EngineError as e:
        raise from_engine(e) from None


# ---- running -------------------------------------------------------------------------------------------------


async def cancel_and_wait(tasks) -> None:
    """Cancel tasks and wait until every one has ended, cancelling again while any runs: on Python < 3.12
    `asyncio.wait_for` (which the engine's stream awaits each delta with) swallows a cancellation that
    lands just as its inner wait completes, and the task then goes on."""
    tasks = [t for t in tasks if not t.done()]
    while tasks:
        for t in tasks:
            t.cancel()
        await asyncio.wait(tasks, timeout=0.05)
        tasks = [t for t in tasks if not t.done()]


async def _wait_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnect(receive, work: Awaitable, on_disconnect=None) -> bool:
    """Run `work` until it ends or the client disconnects (then cancel it). True when the client left first.

    Plain asyncio tasks: a cancelled task's cleanup (closing the engine streams) can still await.
    `on_disconnect` runs before the cancellation, so the work also stops at its next delta (a flag,
    for a cancellation that does not land: see `cancel_and_wait`).
    """
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone = watch.done() and not task.done()
        if gone and on_disconnect is not None:
            on_disconnect()
        await cancel_and_wait([task, watch])
        await asyncio.gather(task, watch, return_exceptions=True)
    if not task.cancelled() and task.exception() is not None:
        raise task.exception()
    return gone


async def gather_or_cancel(aws: list[Awaitable]) -> list:
    """asyncio.gather, except that one failure (or our own cancellation) cancels and awaits all the others."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        await cancel_and_wait(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class CompletionResponse(Response):
    """The ASGI response that runs the request: JSON or SSE, cancelled when the client disconnects."""

    def __init__(self, state, plan: Plan, request_id: str):
        self.state = state
        self.plan = plan
        self.request_id = request_id
        self.status_code = 200
        self.background = None
        self.raw_headers = []
        self.gen = state.gen
        self.started = False          # response headers sent
        self.states = [ChoiceState(c) for c in plan.choices]
        self._prompt_lp: dict[int, list] = {}
        self._scored: dict[int, object] = {}   # prompt index -> the scoring submission's GenerationOutput
        self._admitted: set[int] = set()
        self.gone = False             # the client disconnected: stop at the next delta
        state.inflight += 1

    async def __call__(self, scope, receive, send) -> None:
        try:
            gone = await run_until_disconnect(receive, self._respond(send), self._client_gone)
            if gone:
                log.info("%s client disconnected: %s cancelled", self.request_id, self.plan.id)
                scope.setdefault("state", {})["client_gone"] = True
        finally:
            self.state.inflight -= 1
            self._account()

    def _client_gone(self) -> None:
        self.gone = True

    async def _next(self, it):
        """The next delta of an engine stream, unless the client has left (then end like a cancellation)."""
        d = await it.__anext__()
        if self.gone:
            raise asyncio.CancelledError("the client disconnected")
        return d

    # -- the two shapes --

    async def _respond(self, send) -> None:
        streams = []
        try:
            if self.plan.stream:
                await self._stream(send, streams)
            else:
                await self._complete(send, streams)
        except APIError as e:
            await self._error(send, e)
        except EngineError as e:
            await self._error(send, from_engine(e))
        except Exception:
            log.exception("%s %s failed", self.request_id, self.plan.id)
            await self._error(send, internal(self.request_id))
        finally:
            for s in streams:
                try:
                    await s.aclose()
                except Exception:  # a stream that cannot close must not hide the response's own outcome
                    log.exception("%s %s: closing an engine stream failed", self.request_id, self.plan.id)

    async def _error(self, send, e: APIError) -> None:
        if not self.started:
            self.started = True
            body = json.dumps(e.body()).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            headers += [(k.lower().encode(), v.encode()) for k, v in e.headers.items()]
            await send({"type": "http.response.start", "status": e.status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        else:
            log.warning("%s %s: error after the stream started: %s", self.request_id, self.plan.id, e.message)
            await send({"type": "http.response.body", "body": e.sse() + b"data: [DONE]\n\n", "more_body": True})
            await send({"type": "http.response.body", "body": b""})

    def _open(self, streams: list) -> list[tuple[ChoiceState, AsyncIterator]]:
        out = []
        for st in self.states:
            if st.choice.params is None:
                continue
            p = self.plan.prompts[st.choice.prompt]
            it = self.gen.astream_deltas(p.ids, st.choice.params)
            streams.append(it)
            out.append((st, it))
        return out

    async def _first_deltas(self, opened) -> list:
        async def first(st, it):
            d = await self._next(it)
            self._admit(st)       # the engine took it (a full queue raises before any delta)
            return d
        return await gather_or_cancel([first(st, it) for st, it in opened])

    def _admit(self, st: ChoiceState) -> None:
        self._admitted.add(st.choice.index)
        self.state.metrics.admitted(len(self.plan.prompts[st.choice.prompt].ids))

    async def _echo_logprobs(self) -> None:
        """Prompt logprobs from a scoring submission per distinct prompt: for max_tokens 0 (nothing to
        generate) and streams (their first chunk carries the prompt's logprobs before any token exists); the
        other echo requests get them from their own submission (`_engine_prompt_logprobs`). Up to max_batch
        prompts at once."""
        if not (self.plan.echo and self.plan.logprobs is not None) or self.plan.engine_prompt_logprobs:
            return
        slots = asyncio.Semaphore(self.gen.stats().max_batch)

        async def score(pi: int) -> None:
            async with slots:
                await self._score_prompt(pi)

        await gather_or_cancel([score(pi) for pi in sorted({c.prompt for c in self.plan.choices})])

    async def _score_prompt(self, pi: int) -> None:
        """Score a prompt through the engine: a one-token greedy submission with prompt_logprobs, whose
        prefill forward gives every position's logprobs. It shares the loop's forwards and, with prefix
        caching, the pool's prefixes: lm-evaluation-harness's continuations of one context compute the
        context once (engine/prefix_cache.py). A prompt that fills the context has no room for that token:
        one teacher-forced forward off the loop (Generator.logits) instead."""
        ids = self.plan.prompts[pi].ids
        k = self.plan.logprobs
        if len(ids) < self.gen.max_context:
            out = await self.gen.agenerate(ids, SamplingParams.greedy(1, stop_at_eos=False, prompt_logprobs=k))
            self._scored[pi] = out
            self._prompt_lp[pi] = [(ids[0], None, [])] + [(t.token_id, t.logprob, t.top) for t in out.prompt_logprobs[1:]]
            return
        logits = await asyncio.to_thread(self.gen.logits, ids)                         # (T, V)
        self._prompt_lp[pi] = await asyncio.to_thread(prompt_logprobs, logits, ids, k)

    async def _engine_prompt_logprobs(self) -> None:
        """Each prompt's logprobs from the engine's output (its prefill forward scored the prompt)."""
        if not self.plan.engine_prompt_logprobs:
            return
        for st in self.states:
            out = st.output
            pi = st.choice.prompt
            if pi in self._prompt_lp or st.choice.params.prompt_logprobs is None:
                continue
            lps = getattr(out, "prompt_logprobs", None)
            if lps is None:   # an engine core that does not score prompts: one scoring forward instead
                await self._score_prompt(pi)
                continue
            ids = self.plan.prompts[pi].ids
            assert len(lps) == len(ids), (len(lps), len(ids))
            self._prompt_lp[pi] = [(ids[0], None, [])] + [(t.token_id, t.logprob, t.top) for t in lps[1:]]

    def _start_choice(self, st: ChoiceState) -> str:
        """The text a choice starts with (the prompt, with echo), put before what it has so far, and its
        logprobs builder (the prompt's entries, then the tokens' that arrived before it)."""
        prompt = self.plan.prompts[st.choice.prompt]
        head = prompt.text if self.plan.echo else ""
        if self.plan.logprobs is not None:
            st.logprobs = LogprobsBuilder(self.state.token_text)
            for tok, lp, top in self._prompt_lp.get(st.choice.prompt, ()):
                st.logprobs.add(tok, lp, top)
            if self.plan.echo:
                st.logprobs.offset = len(head)   # offsets count the text as sent (the prompt as given)
            st.logprobs.add_engine(st.token_logprobs)
        if st.choice.params is None:          # echo-only scoring
            st.finish_reason, st.done = "length", True
        st.text = head + st.text
        return head

    def _apply(self, st: ChoiceState, d) -> None:
        if d.finish_reason == "abort":   # not the client (that is a cancellation): the server stopping past its drain bound
            raise unavailable("the server stopped before this request finished (shutdown past its drain bound): "
                              "retry on another instance", "server_shutting_down")
        st.text += d.text
        st.n_tokens += len(d.token_ids)
        if d.logprobs:
            if st.logprobs is not None:
                st.logprobs.add_engine(d.logprobs)
            else:                            # not streaming: built after the prompt's entries, at the end
                st.token_logprobs.extend(d.logprobs)
        if d.output is not None:
            st.output = d.output
        if d.finish_reason is not None:
            st.finish_reason = FINISH.get(d.finish_reason, d.finish_reason)
            st.done = True
            if d.output is not None:
                self.state.metrics.finished(d.output, st.finish_reason)

    def _usage(self) -> dict:
        """OpenAI's usage; prompt_tokens_details.cached_tokens: per distinct prompt (counted once, as
        prompt_tokens does), the prompt tokens that none of its submissions computed (the least any of them
        reused from the prefix cache; Timings.cached_tokens)."""
        prompts = {c.prompt for c in self.plan.choices}
        prompt = sum(len(self.plan.prompts[pi].ids) for pi in prompts)
        completion = sum(st.n_tokens for st in self.states)
        cached = 0
        for pi in prompts:
            outs = [st.output for st in self.states if st.choice.prompt == pi and st.output is not None]
            outs += [self._scored[pi]] if pi in self._scored else []
            cached += min((o.timings.cached_tokens for o in outs), default=0)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def _account(self) -> None:
        """Submissions that never finished (client gone, error): count them as aborted."""
        for st in self.states:
            if st.choice.index in self._admitted and not st.done:
                self.state.metrics.aborted(st.n_tokens)
        u = self._usage()
        log.info("%s %s prompts=%d choices=%d prompt_tokens=%d completion_tokens=%d finish=%s%s", self.request_id,
                 self.plan.id, len(self.plan.prompts), len(self.states), u["prompt_tokens"], u["completion_tokens"],
                 ",".join(str(st.finish_reason) for st in self.states),
                 f" user={self.plan.user!r}" if self.plan.user else "")

    async def _complete(self, send, streams: list) -> None:
        opened = self._open(streams)
        await self._echo_logprobs()

        async def drain(st, it):
            d = await self._next(it)
            self._admit(st)       # the engine took it (a full queue raises before any delta)
            self._apply(st, d)
            while d.finish_reason is None:
                d = await self._next(it)
                self._apply(st, d)

        await gather_or_cancel([drain(st, it) for st, it in opened])
        await self._engine_prompt_logprobs()
        for st in self.states:
            self._start_choice(st)
        choices = [{"index": st.choice.index, "text": st.text,
                    "logprobs": st.logprobs.take() if st.logprobs is not None else None,
                    "finish_reason": st.finish_reason} for st in self.states]
        body = {"id": self.plan.id, "object": "text_completion", "created": self.plan.created, "model": self.plan.model,
                "choices": choices, "usage": self._usage()}
        data = json.dumps(body, ensure_ascii=False).encode()
        self.started = True
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})

    def _chunk(self, index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> bytes:
        obj = {"id": self.plan.id, "object": "text_completion", "created": self.plan.created, "model": self.plan.model,
               "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}
        if self.plan.include_usage:
            obj["usage"] = None
        return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"

    async def _stream(self, send, streams: list) -> None:
        opened = self._open(streams)
        await self._echo_logprobs()
        firsts = await self._first_deltas(opened)
        self.started = True
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                                (b"x-accel-buffering", b"no")]})

        async def emit(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        for st in self.states:
            head = self._start_choice(st)
            if self.plan.echo or st.done:
                lp = st.logprobs.take() if st.logprobs is not None else None
                await emit(self._chunk(st.choice.index, head, lp, st.finish_reason if st.done else None))
        try:
            async for st, d in _merged(opened, firsts, self._next):
                self._apply(st, d)
                if not (d.text or d.token_ids or d.finish_reason is not None):
                    continue
                lp = st.logprobs.take() if st.logprobs is not None else None
                await emit(self._chunk(st.choice.index, d.text, lp, st.finish_reason if st.done else None))
        except APIError as e:
            await self._error(send, e)
            return
        except EngineError as e:
            await self._error(send, from_engine(e))
            return
        if self.plan.include_usage:
            obj = {"id": self.plan.id, "object": "text_completion", "created": self.plan.created,
                   "model": self.plan.model, "choices": [], "usage": self._usage()}
            await emit(b"data: " + json.dumps(obj).encode() + b"\n\n")
        await emit(b"data: [DONE]\n\n")
        await send({"type": "http.response.body", "body": b""})


async def _merged(opened: list[tuple[ChoiceState, AsyncIterator]], firsts: list, next_delta):
    """(choice state, delta) from every stream as they come, each stream's deltas in order."""
    if len(opened) == 1:
        (st, it), d = opened[0], firsts[0]
        yield st, d
        while d.finish_reason is None:
            try:
                d = await next_delta(it)
            except StopAsyncIteration:
                return
            yield st, d
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k: int, it, d) -> None:
        try:
            queue.put_nowait((k, d, None))
            while d.finish_reason is None:
                d = await next_delta(it)
                queue.put_nowait((k, d, None))
        except StopAsyncIteration:
            pass
        except Exception as e:  # handed to the consumer, which raises it
            queue.put_nowait((k, None, e))
        queue.put_nowait((k, None, None))

    tasks = [asyncio.ensure_future(pump(k, it, d)) for k, ((_, it), d) in enumerate(zip(opened, firsts))]
    try:
        live = len(tasks)
        while live:
            k, d, err = await queue.get()
            if err is not None:
                raise err
            if d is None:
                live -= 1
                continue
            yield opened[k][0], d
    finally:
        await cancel_and_wait(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)

