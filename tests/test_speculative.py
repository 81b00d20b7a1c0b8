"""Speculative decoding: greedy output is the target's own token for token, whatever the draft;
sampled output follows the target's distribution (the accept/resample rule, on fixed distributions,
with a stated statistical bound); drafts that do not share the target's tokens are refused.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from engine import InputError, SamplingParams
from engine.speculative import accept_drafts
from export.exporter import export_model
from tests.runtime_fixtures import PROMPT_IDS, PROMPTS, load_generator, make_model

N_DRAWS = 40_000
# Each empirical frequency has std <= sqrt(0.25 / N) = 0.0025; total variation over 6 tokens stays
# below 0.015 with overwhelming probability when the rule is right (measured ~0.004), while the
# control below (always accepting the draft) is off by TV(p, q) ~ 0.3.
TV_BOUND = 0.015


def _dists(rng, k, V=6):
    p = rng.dirichlet(np.ones(V), size=k + 1)                                  # (k+1, V) target
    q = rng.dirichlet(np.ones(V) * 0.5, size=k)                                # (k, V) a different draft
    return p, q


def _tv(counts: np.ndarray, p: np.ndarray) -> float:
    return 0.5 * float(np.abs(counts / counts.sum() - p).sum())


def test_sampled_tokens_follow_the_target_distribution():
    rng = np.random.default_rng(0)
    p, q = _dists(rng, k=2)
    first, second = np.zeros(6), np.zeros(6)
    for _ in range(N_DRAWS):
        drafts = [int(rng.choice(6, p=q[0])), int(rng.choice(6, p=q[1]))]
        tokens, accepted = accept_drafts(p, q, drafts, rng, greedy=False)
        assert len(tokens) == accepted + 1 and tokens[:accepted] == drafts[:accepted]
        first[tokens[0]] += 1
        if accepted >= 1:                      # the second position was reached: its token ~ p[1]
            second[tokens[1]] += 1
    assert _tv(first, p[0]) < TV_BOUND, _tv(first, p[0])
    assert second.sum() > N_DRAWS / 4 and _tv(second, p[1]) < TV_BOUND * 1.5, _tv(second, p[1])


def test_the_statistical_check_can_fail():
    """Control: emitting the draft's tokens unchecked gives the draft's distribution, which the bound rejects."""
    rng = np.random.default_rng(1)
    p, q = _dists(rng, k=1)
    counts = np.bincount([int(rng.choice(6, p=q[0])) for _ in range(N_DRAWS)], minlength=6)
    assert _tv(counts, p[0]) > 5 * TV_BOUND


def test_greedy_rule_keeps_the_target_argmax_path():
    p = np.eye(5)[[3, 1, 4]]                                                   # target argmax: 3, 1, then 4
    q = np.eye(5)[[3, 2]]
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    assert accept_drafts(p, q, [3, 2], rng, greedy=True) == ([3, 1], 1)        # second draft rejected: target's 1
    assert accept_drafts(p, np.eye(5)[[3, 1]], [3, 1], rng, greedy=True) == ([3, 1, 4], 2)  # all + bonus
    assert rng.bit_generator.state == state                                    # greedy draws nothing


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A gpt2-config random target (init 0.1: diverse greedy output), its int8 export, and a draft of
    the same architecture with other weights (seed 1: low acceptance)."""
    target = make_model(tmp_path_factory, "gpt2")
    root = tmp_path_factory.mktemp("drafts")
    int8 = export_model(str(target.ckpt), root / "int8", precision="int8", show_progress=False)
    other = make_model(tmp_path_factory, "gpt2", seed=1)
    return target, int8, other.art


@pytest.mark.parametrize("which", ["int8", "other-seed"])
def test_speculative_greedy_equals_the_target_alone(pair, which):
    target, int8, other = pair
    draft = int8 if which == "int8" else other
    params = SamplingParams.greedy(64, stop_at_eos=False)
    # speculate="always": every round proposes 4 drafts, however few are accepted (the rule's exactness);
    # the default policy would stop drafting with the other-seed draft (test below).
    with load_generator(target, threads=2) as alone, \
            load_generator(target, threads=2, draft=draft, draft_k=4, speculate="always") as spec:
        for prompt in (PROMPT_IDS[0], PROMPTS[1]):
            a, b = alone.generate(prompt, params), spec.generate(prompt, params)
            assert b.token_ids == a.token_ids and b.text == a.text
            assert len(set(a.token_ids)) > 10                                   # diverse: the comparison can fail
            assert b.timings.drafts_proposed > 0 and b.timings.acceptance_rate is not None
            print(f"{which}: acceptance {b.timings.acceptance_rate:.2f}")
        if which == "other-seed":
            assert b.timings.acceptance_rate < 0.5                              # mostly rejected, still exact
        # Penalties and stop strings go through the same processing on both sides.
        pen = SamplingParams.greedy(40, repetition_penalty=1.3, presence_penalty=0.5, stop_at_eos=False)
        assert spec.generate(PROMPTS[0], pen).token_ids == alone.generate(PROMPTS[0], pen).token_ids


def test_speculative_sampling_runs_and_reproduces_with_a_seed(pair):
    target, int8, _ = pair
    params = SamplingParams(max_new_tokens=32, top_k=20, temperature=0.8, seed=5)
    with load_generator(target, threads=2, draft=int8) as spec:
        a, b = spec.generate(PROMPTS[0], params), spec.generate(PROMPTS[0], params)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 32
    assert a.timings.drafts_proposed > 0


def test_no_speculation_while_requests_share_the_batch(pair):
    target, int8, _ = pair
    with load_generator(target, threads=2, draft=int8) as spec:
        outs = spec.generate([PROMPT_IDS[0], PROMPT_IDS[2]], SamplingParams.greedy(8, stop_at_eos=False))
    assert [o.timings.drafts_proposed for o in outs] == [0, 0]


def test_a_draft_with_other_tokens_is_refused(pair, tmp_path_factory):
    target, int8, _ = pair
    bad_vocab = tmp_path_factory.mktemp("bad-vocab") / "d"
    shutil.copytree(int8, bad_vocab)
    manifest = json.loads((bad_vocab / "manifest.json").read_text())
    manifest["config"]["vocab_size"] = 50000
    (bad_vocab / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="vocabulary of 50000 tokens.*share the target's vocabulary"):
        load_generator(target, draft=bad_vocab)

    bad_tok = tmp_path_factory.mktemp("bad-tok") / "d"
    shutil.copytree(int8, bad_tok)
    tok = json.loads((bad_tok / "tokenizer.json").read_text())
    tok["model"]["vocab"]["Hello"], tok["model"]["vocab"]["hello"] = tok["model"]["vocab"]["hello"], tok["model"]["vocab"]["Hello"]
    (bad_tok / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(InputError, match="another tokenizer"):
        load_generator(target, draft=bad_tok)


# ---- when to speculate: SpeculationPolicy ----------------------------------------------------------------

def test_policy_speculates_only_when_it_pays():
    from engine.speculative import SpeculationPolicy
    p = SpeculationPolicy(4, draft_cost=0.35)                 # gpt2-large fp32 with its int8 export
    assert p.choose_k(40, 40, 0, 0, k_cap=4) == (4, False)    # every draft accepted: the longest round pays most
    assert p.choose_k(40, 40, 0, 0, k_cap=2) == (2, False)    # ...up to what fits (context, max_new_tokens)
    assert p.choose_k(40, 40, 0, 0, k_cap=0) == (0, False)
    # Acceptance ~0.1 (gpt2-large at init 0.1): no k beats a plain step: decode plainly...
    assert p.choose_k(4, 40, 0, 0, k_cap=4) == (0, False)
    # ...and probe with one draft after PROBE_EVERY plain steps, then after twice as many each time.
    assert p.choose_k(4, 40, p.PROBE_EVERY, 0, k_cap=4) == (1, True)
    assert p.choose_k(4, 40, p.PROBE_EVERY, 1, k_cap=4) == (0, False)
    assert p.choose_k(4, 40, 2 * p.PROBE_EVERY, 1, k_cap=4) == (1, True)
    assert p.choose_k(4, 40, (8 * p.PROBE_EVERY), 10, k_cap=4) == (1, True)   # the backoff stops growing
    # In between, a shorter round (acceptance 0.6).
    assert p.choose_k(24, 40, 0, 0, k_cap=4)[0] in (1, 2)
    # The first round, on the prior alone (0.75), is a short one; two drafts accepted make it longer.
    assert p.choose_k(0, 0, 0, 0, k_cap=4) == (2, False)
    assert p.choose_k(2, 2, 0, 0, k_cap=4)[0] >= 3
    # A draft as costly as the target never pays, even accepting everything.
    assert SpeculationPolicy(4, draft_cost=1.0).choose_k(40, 40, 0, 0, k_cap=4) == (0, False)
    # always: the rule itself, whatever it costs.
    assert SpeculationPolicy(4, draft_cost=1.0, always=True).choose_k(0, 40, 0, 0, k_cap=3) == (3, False)


def test_policy_arithmetic():
    from engine.config import SIZES
    from engine.speculative import SpeculationPolicy, draft_cost
    assert SpeculationPolicy.expected_tokens(1.0, 4) == 5
    assert SpeculationPolicy.expected_tokens(0.0, 4) == 1
    assert abs(SpeculationPolicy.expected_tokens(0.5, 2) - 1.75) < 1e-12      # 1 + 0.5 + 0.25
    assert abs(draft_cost(SIZES["gpt2-large"], "fp32", SIZES["gpt2-large"], "int8") - 0.35) < 1e-9
    assert draft_cost(SIZES["gpt2-xl"], "fp32", SIZES["gpt2"], "fp32") < 0.1                # a smaller family member
    assert draft_cost(SIZES["gpt2"], "fp32", SIZES["gpt2"], "fp32") == 1.0


def test_a_draft_that_does_not_pay_is_not_used(pair):
    """The other-seed draft costs as much as the target: the request decodes plainly but for probe
    rounds (after 32, then 64 more tokens); output still the target's. The int8 draft is used."""
    from engine.speculative import SpeculationPolicy
    target, int8, other = pair
    params = SamplingParams.greedy(96, stop_at_eos=False)
    with load_generator(target, threads=2) as alone, load_generator(target, threads=2, draft=other) as spec, \
            load_generator(target, threads=2, draft=int8) as spec8:
        a, b, c = (g.generate(PROMPT_IDS[0], params) for g in (alone, spec, spec8))
    assert b.token_ids == a.token_ids == c.token_ids
    assert 0 < b.timings.drafts_proposed <= 2, b.timings.drafts_proposed     # probes at 32 and 32 + 64 at most
    assert c.timings.drafts_proposed > 96 // SpeculationPolicy.PROBE_EVERY, c.timings.drafts_proposed


def test_target_and_draft_sessions_stop_spinning_between_runs(pair):
    """They take turns on the same cores (engine/backends/ort.py, spin_after_run); alone, a model keeps
    ONNX Runtime's default."""
    target, int8, _ = pair

    def spin_stop(backend):
        try:
            return backend.session.get_session_options().get_session_config_entry("session.force_spinning_stop")
        except RuntimeError:  # "does not have configuration with key": ORT's default (spinning)
            return None
    with load_generator(target, threads=1, draft=int8) as spec, load_generator(target, threads=1) as alone:
        assert spin_stop(spec.core.backend) == spin_stop(spec.core.draft) == "1"
        assert spin_stop(alone.core.backend) != "1"


def test_a_broken_draft_fails_the_load_with_its_own_message(tiny_model, tmp_path):
    """Target and draft load at once (engine/generator.py _load_pair): a draft that cannot load raises
    its one-line ArtifactError, naming its directory, and the target's backend is closed."""
    import shutil

    from engine.errors import ArtifactError
    from engine.generator import Generator
    bad = tmp_path / "bad-draft"
    shutil.copytree(tiny_model.art, bad)
    (bad / "model.onnx").write_bytes((bad / "model.onnx").read_bytes()[:100])
    with pytest.raises(ArtifactError, match="truncated or corrupt") as e:
        Generator.from_pretrained(tiny_model.art, threads=1, draft=bad)
    assert str(bad) in str(e.value)


def test_a_client_going_away_mid_speculation_frees_its_slot(pair):
    """Closing a stream while the request speculates aborts it between rounds, like a plain one: the
    slot is free, and the next request still gets the target's own greedy tokens."""
    import time
    target, int8, _ = pair
    params = SamplingParams.greedy(200, stop_at_eos=False)
    with load_generator(target, threads=2, draft=int8, speculate="always") as spec:
        it = spec.stream(PROMPT_IDS[0], params)
        next(it), next(it)                                  # drafting rounds are under way
        it.close()
        deadline = time.monotonic() + 30
        while spec.stats().running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert spec.stats().running == 0 and spec.stats().waiting == 0
        short = SamplingParams.greedy(16, stop_at_eos=False)
        with load_generator(target, threads=2) as alone:
            assert spec.generate(PROMPT_IDS[1], short).token_ids == alone.generate(PROMPT_IDS[1], short).token_ids
