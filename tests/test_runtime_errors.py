"""Bad input and broken model directories fail with a clear error that says the range or the fix, in the
library (InputError / ArtifactError) and in the CLI (exit code 1, one 'Error: ...' line, no traceback).
Also the context limit itself: 1024 positions, the last token at position 1023, and truncate='left'.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from engine.errors import ArtifactError, InputError
from engine.generator import Generator
from engine.sampling import SamplingParams
from tests.runtime_fixtures import EOS, run_cli

CTX = 1024
THE = 262  # " the": one token, so " the" * n is a prompt of exactly n tokens


def text_of(n_tokens: int) -> str:
    return " the" * n_tokens


# ---- sampling parameters (validated on construction) -------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1, got 0"),
    ({"max_new_tokens": -5}, "max_new_tokens must be >= 1, got -5"),
    ({"top_k": -1}, "top_k must be >= 0 (0 disables), got -1"),
    ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
    ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
    ({"top_p": -0.2}, "top_p must be in (0, 1], got -0.2"),
    ({"temperature": -0.5}, "temperature must be >= 0, got -0.5"),
    ({"temperature": float("nan")}, "temperature must be finite"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0, got 0.0"),
    ({"seed": -1}, "seed must be >= 0"),
    ({"stop": ("",)}, "stop strings must be non-empty"),
], ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()))
def test_sampling_params_out_of_range(kwargs, message):
    with pytest.raises(InputError) as e:
        SamplingParams(**kwargs)
    assert message in str(e.value)


# ---- prompts and the context --------------------------------------------------------------------------

def test_empty_prompt(tiny_gen):
    # "", a batch holding "", and a batch holding an empty id list ([] alone is a batch of no prompts).
    for prompt in ("", ["Hi", ""], [[]]):
        with pytest.raises(InputError, match="prompt is empty"):
            tiny_gen.generate(prompt, SamplingParams(max_new_tokens=4))
    with pytest.raises(InputError, match="prompt is empty"):
        list(tiny_gen.stream("", SamplingParams(max_new_tokens=4)))
    with pytest.raises(InputError, match="no prompts given"):
        tiny_gen.generate([], SamplingParams(max_new_tokens=4))


def test_bad_token_ids_truncate_mode_and_params_count(tiny_gen):
    with pytest.raises(InputError, match=r"token id 50257 is outside the vocabulary \[0, 50257\)"):
        tiny_gen.generate([464, 50257], SamplingParams(max_new_tokens=4))
    with pytest.raises(InputError, match="truncate must be one of"):
        tiny_gen.generate("Hi", SamplingParams(max_new_tokens=4), truncate="right")
    with pytest.raises(InputError, match="got 1 SamplingParams for 2 prompts"):
        tiny_gen.generate(["a", "b"], [SamplingParams(max_new_tokens=4)])


def test_prompt_over_the_context_is_refused_with_the_fix(tiny_gen):
    with pytest.raises(InputError) as e:
        tiny_gen.generate(text_of(1100), SamplingParams(max_new_tokens=8))
    msg = str(e.value)
    for part in ("prompt (1100 tokens)", "max_new_tokens (8)", f"context ({CTX} tokens)", "truncate='left'"):
        assert part in msg, msg
    # Fits alone, not with the new tokens: the message says how far to lower max_new_tokens.
    with pytest.raises(InputError, match=r"lower max_new_tokens to at most 24"):
        tiny_gen.generate(text_of(1000), SamplingParams(max_new_tokens=25))


def test_max_new_tokens_past_the_context(tiny_gen):
    for n in (CTX, 5000):
        with pytest.raises(InputError, match=rf"max_new_tokens must be < the context \({CTX}\).*got {n}"):
            tiny_gen.generate("Hi", SamplingParams(max_new_tokens=n))


def test_truncate_left_keeps_the_last_tokens(tiny_gen):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, EOS, 1100).tolist()
    params = SamplingParams(max_new_tokens=24, seed=3)
    out = tiny_gen.generate(ids, params, truncate="left")
    assert out.prompt_token_ids == ids[-(CTX - 24):]
    assert out.finish_reason == "length" and len(out.token_ids) == 24
    assert out.token_ids == tiny_gen.generate(ids[-(CTX - 24):], params).token_ids
    # A prompt that fits is not touched.
    assert tiny_gen.generate(ids[:50], params, truncate="left").prompt_token_ids == ids[:50]


def test_context_edge_last_token_at_position_1023(tiny_gen):
    """1000 prompt tokens + 24 new fill the context exactly; each greedy token is the argmax of a full
    forward over everything before it, up to the token at position 1023."""
    ids = np.random.default_rng(1).integers(0, EOS, 1000).tolist()
    out = tiny_gen.generate(ids, SamplingParams.greedy(24, stop_at_eos=False))
    assert out.finish_reason == "length"
    assert len(out.prompt_token_ids) + len(out.token_ids) == CTX          # last token at position 1023
    fed = out.prompt_token_ids + out.token_ids[:-1]                        # 1023 tokens, positions 0..1022
    argmax = tiny_gen.logits(fed)[len(ids) - 1:].argmax(-1)                # predictions for 1000..1023
    assert argmax.tolist() == out.token_ids
    # One more token has no position: refused, with the fix.
    with pytest.raises(InputError, match="exceeds the context"):
        tiny_gen.generate(ids + [THE], SamplingParams.greedy(24))
    with pytest.raises(InputError, match=r"sequence length must be in \[1, 1024\], got 1025"):
        tiny_gen.logits(fed + [THE, THE])
    # The other extreme: 1023 prompt tokens, one new one.
    last = tiny_gen.generate(ids + ids[:23], SamplingParams.greedy(1))
    assert last.finish_reason == "length" and len(last.token_ids) == 1


# ---- broken model directories -------------------------------------------------------------------------

def _break(kind: str, d) -> None:
    m = d / "manifest.json"
    if kind == "garbage-manifest":
        m.write_text("{this is not json")
    elif kind == "other-version":
        data = json.loads(m.read_text())
        data["format_version"] = 99
        m.write_text(json.dumps(data))
    elif kind == "manifest-lacks-keys":
        m.write_text(json.dumps({"format_version": 1, "config": {}}))
    elif kind == "no-model-onnx":
        (d / "model.onnx").unlink()
    elif kind == "garbage-tokenizer":
        (d / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    elif kind == "manifest-disagrees-with-graph":  # e.g. a model.onnx copied over from another export
        data = json.loads(m.read_text())
        data["config"]["n_layer"] += 1
        m.write_text(json.dumps(data))
    elif kind == "truncated-model-onnx":
        with open(d / "model.onnx", "r+b") as f:
            f.truncate(1000)
    else:
        raise AssertionError(kind)


BROKEN = {  # kind -> what the error must say
    "missing-dir": "does not exist",
    "garbage-manifest": "manifest.json is corrupt",
    "other-version": "manifest format version 99, this gpt2-engine reads version 1",
    "manifest-lacks-keys": "lacks precision, model_file",
    "no-model-onnx": "model.onnx is missing",
    "garbage-tokenizer": "tokenizer.json is corrupt",
    "truncated-model-onnx": "model.onnx",
    "manifest-disagrees-with-graph": "model.onnx",
}


@pytest.fixture(scope="module")
def broken(tmp_path_factory, tiny_model):
    """kind -> a copy of the tiny model directory broken that way."""
    root = tmp_path_factory.mktemp("broken")
    dirs = {"missing-dir": root / "does-not-exist"}
    for kind in BROKEN:
        if kind == "missing-dir":
            continue
        d = root / kind
        shutil.copytree(tiny_model.art, d)
        _break(kind, d)
        dirs[kind] = d
    return dirs


def _kinds():
    return list(BROKEN)


@pytest.mark.parametrize("kind", _kinds())
def test_broken_model_directory(broken, kind):
    with pytest.raises(ArtifactError) as e:
        Generator.from_pretrained(broken[kind])
    msg = str(e.value)
    assert BROKEN[kind] in msg, msg
    assert "gpt2-engine export" in msg, f"the message does not say what to re-run: {msg}"


# ---- the same through the CLI --------------------------------------------------------------------------

CLI_INPUT_CASES = {  # name -> (args after MODEL, what stderr must say)
    "empty-prompt": ([""], "prompt is empty"),
    "over-context": ([text_of(1100), "-n", "8"], "--truncate left"),
    "max-new-0": (["Hi", "-n", "0"], "max_new_tokens must be >= 1, got 0"),
    "max-new-past-context": (["Hi", "-n", "1024"], "max_new_tokens must be < the context (1024)"),
    "top-k-negative": (["Hi", "--top-k", "-1"], "top_k must be >= 0"),
    "top-p-above-1": (["Hi", "--top-p", "1.5"], "top_p must be in (0, 1], got 1.5"),
    "top-p-0": (["Hi", "--top-p", "0"], "top_p must be in (0, 1], got 0.0"),
    "temperature-negative": (["Hi", "--temperature", "-0.5"], "temperature must be >= 0, got -0.5"),
    "no-prompt": ([], "give either a PROMPT or --batch-file"),
}


@pytest.fixture(scope="module")
def cli_results(broken, tiny_model):
    """Every CLI error case, run at once in subprocesses (each pays Python + ONNX Runtime start-up)."""
    jobs = {f"input:{k}": [str(tiny_model.art), *args] for k, (args, _) in CLI_INPUT_CASES.items()}
    jobs.update({f"dir:{k}": [str(d), "Hi", "-n", "4"] for k, d in broken.items()})
    with ThreadPoolExecutor(4) as pool:
        futures = {k: pool.submit(run_cli, "generate", *args) for k, args in jobs.items()}
        return {k: f.result() for k, f in futures.items()}


def _assert_one_line_error(r, must_say: str) -> None:
    assert r.returncode == 1, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert must_say in lines[0], lines[0]
    assert r.stdout == "", r.stdout


@pytest.mark.parametrize("name", list(CLI_INPUT_CASES))
def test_cli_bad_input(cli_results, name):
    _assert_one_line_error(cli_results[f"input:{name}"], CLI_INPUT_CASES[name][1])


@pytest.mark.parametrize("kind", _kinds())
def test_cli_broken_model_directory(cli_results, kind):
    # A path that does not exist is not taken for a model directory: the CLI says what MODEL may be.
    must_say = "is neither a model directory" if kind == "missing-dir" else BROKEN[kind]
    _assert_one_line_error(cli_results[f"dir:{kind}"], must_say)


def test_cli_truncate_left_succeeds(tiny_model):
    r = run_cli("generate", str(tiny_model.art), text_of(1100), "-n", "8", "--greedy", "--truncate", "left",
                "--timings")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(text_of(1100))
    assert "finish length" in r.stderr
