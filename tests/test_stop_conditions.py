"""How a request ends, through the Generator on the tiny model: stop token ids, min_tokens (eos, stop tokens
and stop strings held off until that many tokens exist, as vLLM does), stop_at_eos=False (vLLM's ignore_eos).

The oracle for min_tokens is Hugging Face `generate(min_new_tokens=...)` (MinNewTokensLengthLogitsProcessor)
with eos favoured by `sequence_bias` (the engine: logit_bias), on the checkpoint the artifact came from.
"""

from __future__ import annotations

import pytest

from engine.sampling import SamplingParams
from tests.runtime_fixtures import EOS, PROMPTS, hf_generate, hf_model

EOS_FIRST = {EOS: 100.0}       # greedy picks <|endoftext|> whenever it may


def test_stop_token_id_ends_the_row_without_entering_the_output(tiny_gen):
    ref = tiny_gen.generate(PROMPTS[1], SamplingParams.greedy(12, stop_at_eos=False))
    i = next(i for i, t in enumerate(ref.token_ids) if i >= 3 and t not in ref.token_ids[:i])
    stop = ref.token_ids[i]
    out = tiny_gen.generate(PROMPTS[1], SamplingParams.greedy(12, stop_at_eos=False, stop_token_ids=[999, stop]))
    assert out.finish_reason == "stop"
    assert out.token_ids == ref.token_ids[:i]                      # the stop token is not in token_ids ...
    assert out.text == tiny_gen.decode(ref.token_ids[:i])         # ... nor in the text (vLLM's default)
    streamed = "".join(tiny_gen.stream(PROMPTS[1], SamplingParams.greedy(12, stop_at_eos=False, stop_token_ids=[stop])))
    assert streamed == out.text
    # Below min_tokens the stop token is masked: never sampled, so the row goes on past it.
    held = tiny_gen.generate(PROMPTS[1], SamplingParams.greedy(12, stop_at_eos=False, stop_token_ids=[stop],
                                                               min_tokens=i + 1))
    assert stop not in held.token_ids[:i + 1] and len(held.token_ids) > i


@pytest.mark.parametrize("min_tokens", [0, 1, 5])
def test_min_tokens_holds_eos_off_like_hf_min_new_tokens(tiny_gen, tiny_model, min_tokens):
    """eos favoured by +100 (HF: sequence_bias), min_tokens m: exactly m tokens, then eos ends the row."""
    ids = tiny_gen.encode(PROMPTS[0])
    out = tiny_gen.generate(ids, SamplingParams.greedy(16, min_tokens=min_tokens, logit_bias=EOS_FIRST))
    hf = hf_generate(hf_model(tiny_model), ids, 16, do_sample=False, min_new_tokens=min_tokens,
                     sequence_bias={(EOS,): 100.0})
    assert hf[-1] == EOS and len(hf) == min_tokens + 1
    assert out.finish_reason == "eos" and out.token_ids == hf[:-1]     # the engine leaves the eos out
    assert out.text == tiny_gen.decode(hf[:-1])


def test_stop_at_eos_false_goes_on_past_eos(tiny_gen):
    """vLLM's ignore_eos: eos is an ordinary token, the row runs to max_new_tokens."""
    out = tiny_gen.generate(PROMPTS[0], SamplingParams.greedy(6, stop_at_eos=False, logit_bias=EOS_FIRST))
    assert out.finish_reason == "length" and out.token_ids == [EOS] * 6
    # ... and min_tokens does not mask it then (it would not end the row)
    out = tiny_gen.generate(PROMPTS[0], SamplingParams.greedy(6, stop_at_eos=False, min_tokens=6, logit_bias=EOS_FIRST))
    assert out.token_ids == [EOS] * 6


def test_min_tokens_holds_stop_strings_off(tiny_gen):
    """A stop string counts only if it ends in the text of a token after the first min_tokens (vLLM)."""
    ref = tiny_gen.generate(PROMPTS[1], SamplingParams.greedy(16, stop_at_eos=False))
    texts = [tiny_gen.decode(ref.token_ids[:n]) for n in range(17)]
    assert texts[16] == ref.text
    stop = next(c for c in ref.text if c.strip() and ref.text.count(c) >= 2)   # a character that comes again
    first = ref.text.find(stop)
    out = tiny_gen.generate(PROMPTS[1], SamplingParams.greedy(16, stop_at_eos=False, stop=[stop]))
    assert out.finish_reason == "stop" and out.text == ref.text[:first]
    # min_tokens m: the first match that ends past the text of m tokens
    m = next(n for n in range(17) if len(texts[n]) >= first + 1)           # the first match is inside m tokens
    later = ref.text.find(stop, len(texts[m]))
    out = tiny_gen.generate(PROMPTS[1], SamplingParams.greedy(16, stop_at_eos=False, stop=[stop], min_tokens=m))
    assert len(out.token_ids) >= m
    if later < 0:
        assert out.finish_reason == "length" and out.text == ref.text
    else:
        assert out.finish_reason == "stop" and out.text == ref.text[:later]



def test_min_tokens_and_stop_tokens_in_speculative_rounds(tiny_model):
    """The draft's proposals and the target's check go through the same masked distribution: with eos
    favoured, a speculative request still makes exactly min_tokens tokens; a stop token ends it likewise.
    (The tiny model drafts for itself, every round k=4: speculate='always'.)"""
    from tests.runtime_fixtures import load_generator
    with load_generator(tiny_model, draft=tiny_model.art, speculate="always") as spec:
        out = spec.generate(PROMPTS[0], SamplingParams.greedy(16, min_tokens=7, logit_bias=EOS_FIRST))
        assert out.finish_reason == "eos" and len(out.token_ids) == 7 and EOS not in out.token_ids
        assert out.timings.drafts_proposed > 0
        ref = spec.generate(PROMPTS[1], SamplingParams.greedy(12, stop_at_eos=False))
        i = next(i for i, t in enumerate(ref.token_ids) if i >= 3 and t not in ref.token_ids[:i])
        cut = spec.generate(PROMPTS[1], SamplingParams.greedy(12, stop_at_eos=False, stop_token_ids=[ref.token_ids[i]]))
        assert cut.finish_reason == "stop" and cut.token_ids == ref.token_ids[:i]
