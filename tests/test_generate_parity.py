"""Generation parity: the engine's tokens against Hugging Face `generate`, and the runtime's invariants.

- greedy == HF `generate(do_sample=False)` token for token, 64 new tokens, on the real gpt2 config
  (12 x 768) with random weights at init 0.1 (diverse greedy output), 2 weight seeds x 2 prompts;
- the same with repetition_penalty=1.3 (HF's RepetitionPenaltyLogitsProcessor is the oracle);
- a batch of different-length prompts == each prompt alone (greedy, and seeded sampling with per-row
  parameters and per-row lengths, so rows finish at different steps);
- stream's concatenated deltas == generate's text.

HF stops at <|endoftext|> (50256); the engine is run with stop_at_eos=False so it always makes 64
tokens, and the comparison covers HF's output up to and including its eos, if any.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field

import pytest

from engine.sampling import SamplingParams
from tests.runtime_fixtures import EOS, PROMPT_IDS, PROMPTS, TINY_INIT, Model, distinct, hf_generate, hf_model, load_generator, make_model

N_NEW = 64
SEEDS = (0, 1)
LONG_PROMPT = ("Long before the first railways, goods moved along rivers and canals. Barges pulled by horses "
               "carried coal, grain and timber from the interior to the ports, and whole towns grew up around "
               "the locks where boats waited their turn. When the steam engine arrived, engineers argued for "
               "decades about whether it could ever compete with water: a canal boat needed no fuel, only "
               "patience.")                                                           # 75 tokens
PARITY_PROMPTS = ("The meaning of life is", LONG_PROMPT)                             # 5 and 75 tokens


@dataclass
class Loaded:
    model: Model
    gen: object
    hf: object
    refs: dict = field(default_factory=dict)

    def ref(self, prompt_ids: list[int], **kwargs) -> list[int]:
        """HF's continuation, memoized: HF generation is the slow part of this module."""
        key = (tuple(prompt_ids), tuple(sorted(kwargs.items())))
        if key not in self.refs:
            self.refs[key] = hf_generate(self.hf, prompt_ids, N_NEW, do_sample=False, **kwargs)
        return self.refs[key]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """seed -> Loaded (engine Generator + HF oracle on the same gpt2-config random checkpoint)."""
    loaded: dict[int, Loaded] = {}

    def get(seed: int) -> Loaded:
        if seed not in loaded:
            m = make_model(tmp_path_factory, "gpt2", seed)
            loaded[seed] = Loaded(m, load_generator(m), hf_model(m))
        return loaded[seed]

    yield get
    for item in loaded.values():
        item.gen.close()
    loaded.clear()
    gc.collect()


def first_diff(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def assert_matches_hf(ours: list[int], ref: list[int], what: str) -> None:
    assert len(ours) == N_NEW, f"{what}: the engine made {len(ours)} tokens, wanted {N_NEW}"
    assert len(ref) == N_NEW or ref[-1] == EOS, f"{what}: HF made {len(ref)} tokens without an eos"
    i = first_diff(ours, ref)
    assert i is None, f"{what}: first difference at new token {i}: engine {ours[i]} vs HF {ref[i]}\n{ours}\n{ref}"
    assert len(ref) >= N_NEW // 2, f"{what}: HF stopped at eos after {len(ref)} tokens; too few to compare"


# ---- the real gpt2 config against HF generate ---------------------------------------------------------

@pytest.mark.parametrize("seed,prompt", [(s, p) for s in SEEDS for p in PARITY_PROMPTS],
                         ids=[f"seed{s}-{len(p)}chars" for s in SEEDS for p in PARITY_PROMPTS])
def test_greedy_matches_hf_generate(gpt2, seed, prompt):
    g = gpt2(seed)
    out = g.gen.generate(prompt, SamplingParams.greedy(N_NEW, stop_at_eos=False))
    assert out.prompt_token_ids == g.gen.encode(prompt)
    assert out.finish_reason == "length"
    ref = g.ref(out.prompt_token_ids)
    assert_matches_hf(out.token_ids, ref, f"gpt2 seed {seed}")
    # Random weights at init 0.1 give diverse greedy output: the comparison is not of one repeated token.
    assert distinct(ref) >= 16, f"greedy output too repetitive to prove parity: {ref}"
    assert out.text == g.gen.decode(out.token_ids)


@pytest.mark.parametrize("seed", SEEDS)
def test_greedy_batch_matches_hf_generate(gpt2, seed):
    """Both prompts (5 and 75 tokens) in one right-padded batch: each row still equals HF alone."""
    g = gpt2(seed)
    outs = g.gen.generate(list(PARITY_PROMPTS), SamplingParams.greedy(N_NEW, stop_at_eos=False))
    for prompt, out in zip(PARITY_PROMPTS, outs):
        assert out.prompt_token_ids == g.gen.encode(prompt)
        assert_matches_hf(out.token_ids, g.ref(out.prompt_token_ids), f"gpt2 seed {seed}, batch row")


def test_repetition_penalty_matches_hf_generate(gpt2):
    g = gpt2(0)
    prompt_ids = g.gen.encode(PARITY_PROMPTS[0])
    out = g.gen.generate(prompt_ids, SamplingParams.greedy(N_NEW, repetition_penalty=1.3, stop_at_eos=False))
    ref = g.ref(prompt_ids, repetition_penalty=1.3)
    assert_matches_hf(out.token_ids, ref, "gpt2 seed 0, repetition_penalty 1.3")
    # The penalty must have changed the output, or this test would only repeat the plain greedy one.
    assert ref != g.ref(prompt_ids)[:len(ref)], "repetition_penalty=1.3 did not change greedy output"


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_repetition_penalty_on_negative_logits_matches_hf_generate(tmp_path_factory, penalty):
    """The gpt2 case above never has a negative logit at the top (random logits centre on 0, the argmax
    is ~+10), so the penalty's x < 0 branch cannot change its tokens; here every logit is negative."""
    m = make_model(tmp_path_factory, "tiny", init=TINY_INIT, variant="negative-logits")
    prompt_ids = PROMPT_IDS[0]
    with load_generator(m) as gen:
        assert gen.logits(prompt_ids).max() < 0
        out = gen.generate(prompt_ids, SamplingParams.greedy(N_NEW, repetition_penalty=penalty, stop_at_eos=False))
        plain = gen.generate(prompt_ids, SamplingParams.greedy(N_NEW, stop_at_eos=False))
    hf = hf_model(m)
    ref = hf_generate(hf, prompt_ids, N_NEW, do_sample=False, repetition_penalty=penalty)
    assert_matches_hf(out.token_ids, ref, f"negative logits, repetition_penalty {penalty}")
    assert out.token_ids != plain.token_ids, f"repetition_penalty={penalty} did not change greedy output"


def test_eos_ends_rows_like_hf_generate(tmp_path_factory):
    """A model that meets <|endoftext|> within 64 tokens: each row stops where HF stops (eos not included
    in the output), alone and in a batch whose rows stop at different steps; stop_at_eos=False goes on."""
    m = make_model(tmp_path_factory, "tiny", init=TINY_INIT, variant="eos-prone")
    params = SamplingParams.greedy(N_NEW, repetition_penalty=1.3)
    hf = hf_model(m)
    refs = [hf_generate(hf, p, N_NEW, do_sample=False, repetition_penalty=1.3) for p in PROMPT_IDS]
    assert all(r[-1] == EOS and len(r) < N_NEW for r in refs), [len(r) for r in refs]
    assert len({len(r) for r in refs}) == len(refs), "rows should stop at different steps"
    with load_generator(m) as gen:
        batch = gen.generate(PROMPT_IDS, params)
        for p, ref, in_batch in zip(PROMPT_IDS, refs, batch):
            alone = gen.generate(p, params)
            for out in (alone, in_batch):
                assert out.finish_reason == "eos"
                assert out.token_ids == ref[:-1]
                assert out.text == gen.decode(ref[:-1])
            going_on = gen.generate(p, SamplingParams.greedy(N_NEW, repetition_penalty=1.3, stop_at_eos=False))
            assert going_on.finish_reason == "length" and going_on.token_ids[:len(ref)] == ref


# ---- batch == alone, stream == generate (tiny config: the loop, not the model, is under test) ----------

GREEDY_ROWS = [SamplingParams.greedy(n, stop_at_eos=False) for n in (24, 7, 16, 1)]
SAMPLED_ROWS = [
    SamplingParams(max_new_tokens=20, seed=1),                                       # top-k 40, T 1
    SamplingParams(max_new_tokens=9, temperature=0.7, top_k=0, top_p=0.9, seed=2),   # nucleus only
    SamplingParams(max_new_tokens=16, top_k=5, repetition_penalty=1.2, seed=3),
    SamplingParams.greedy(12, stop_at_eos=False),                                    # a greedy row among them
]


@pytest.mark.parametrize("rows", [GREEDY_ROWS, SAMPLED_ROWS], ids=["greedy", "sampled-per-row"])
def test_batch_equals_each_prompt_alone(tiny_gen, rows):
    prompts = PROMPTS  # 5, 19, 10 and 1 tokens: right padding of 14, 0, 9 and 18 slots
    assert len({len(tiny_gen.encode(p)) for p in prompts}) == len(prompts)
    alone = [tiny_gen.generate(p, sp) for p, sp in zip(prompts, rows)]
    batch = tiny_gen.generate(prompts, rows)
    for b, (a, o) in enumerate(zip(alone, batch)):
        assert o.prompt_token_ids == a.prompt_token_ids
        assert o.token_ids == a.token_ids, f"row {b}: batch {o.token_ids} vs alone {a.token_ids}"
        assert (o.text, o.finish_reason) == (a.text, a.finish_reason), f"row {b}"
    assert [len(o.token_ids) for o in batch] == [sp.max_new_tokens for sp in rows]  # no eos met
    assert max(distinct(o.token_ids) for o in batch) >= 6  # not a degenerate repeated token


def test_seeded_sampling_reproduces_and_seeds_differ(tiny_gen):
    p = PROMPTS[0]
    a, b, c = tiny_gen.generate([p, p, p], [SamplingParams(max_new_tokens=24, top_k=0, seed=s) for s in (7, 7, 8)])
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    assert a.token_ids == tiny_gen.generate(p, SamplingParams(max_new_tokens=24, top_k=0, seed=7)).token_ids


def _stop_across_a_token_boundary(gen, prompt: str, params: SamplingParams) -> tuple[str, str]:
    """A 2-char stop string made of the last char of one token and the first of the next, and the text
    before it: a stream that does not hold back a possible stop prefix would emit that first char."""
    out = gen.generate(prompt, params)
    full = out.text
    n = len(out.token_ids)
    for k in sorted(range(2, n - 1), key=lambda k: abs(k - n // 2)):             # middle first
        b = len(gen.decode(out.token_ids[:k]))
        if full.startswith(gen.decode(out.token_ids[:k])) and 0 < b < len(full) and full.index(full[b - 1:b + 1]) == b - 1:
            return full[b - 1:b + 1], full[:b - 1]
    raise AssertionError(f"no usable token boundary in {full!r}")


def test_stream_concatenation_equals_generate_text(tiny_gen):
    base = SamplingParams(max_new_tokens=40, top_k=0, seed=5)  # full vocabulary: byte tokens, odd characters
    stop, before = _stop_across_a_token_boundary(tiny_gen, PROMPTS[1], base)
    cases = [SamplingParams.greedy(48, stop_at_eos=False), base,
             SamplingParams(max_new_tokens=40, top_k=0, seed=5, stop=(stop,))]
    for i, params in enumerate(cases):
        out = tiny_gen.generate(PROMPTS[1], params)
        deltas = list(tiny_gen.stream(PROMPTS[1], params))
        assert "".join(deltas) == out.text, f"case {i} ({params})"
        assert len(deltas) >= 2, f"case {i}: stream yielded everything at once"
        assert all(deltas), f"case {i}: empty delta yielded"
    # The stop case: cut before the first occurrence of the stop string, which is excluded.
    assert out.finish_reason == "stop"
    assert out.text == before
