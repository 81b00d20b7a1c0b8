"""`Generator.from_pretrained` takes what `gpt2-engine generate` takes (issue 24, items 5-7): a model
directory, a size name (real weights, or init='random'), a Hugging Face repo id of any GPT-2 model, in
any case, or a checkpoint directory, the names exported once through the same model cache
(export/model_cache.py); random weights are labelled (a warning at load, a field on every output); and
a prompt that does not fit says what does.

No downloads: the hub's models are checkpoints these tests save in the hub cache's own layout
(models--OWNER--NAME/snapshots/REV, refs/main), under a temporary HF_HUB_CACHE; the sizes are the tiny
config (SIZES patched), so an export takes about a second.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings

import pytest

import engine.config
import export.exporter
import export.model_cache
from engine import Generator, RandomWeightsWarning, SamplingParams
from engine.errors import ArtifactError, CheckpointError, EngineError, InputError
from tests.runtime_fixtures import REPO, TINY

GREEDY = SamplingParams.greedy(6)


def visible(directory) -> list[str]:
    """What a directory holds but the hidden lock files beside each export (export.model_cache.dir_lock)."""
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith(".")) if directory.exists() else []


def put_in_hub_cache(hub, repo_id: str, ckpt, model_type: str = "gpt2"):
    """A checkpoint in the hub cache's layout, as huggingface_hub's snapshot_download leaves it."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    shutil.copy(ckpt / "model.safetensors", snap)
    config = json.loads((ckpt / "config.json").read_text())
    (snap / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")


@pytest.fixture
def exports(monkeypatch, tmp_path, tiny_model):
    """Tiny stands in for gpt2 and distilgpt2; empty model cache and hub cache; export_model calls recorded."""
    monkeypatch.setitem(engine.config.SIZES, "gpt2", TINY)
    monkeypatch.setitem(engine.config.SIZES, "distilgpt2", TINY)
    monkeypatch.setenv("GPT2_ENGINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    put_in_hub_cache(tmp_path / "hub", "Someone/Tiny-GPT2", tiny_model.ckpt)          # a fine-tune, cased
    put_in_hub_cache(tmp_path / "hub", "openai-community/gpt2", tiny_model.ckpt)      # the real gpt2's id
    put_in_hub_cache(tmp_path / "hub", "someone/tiny-llama", tiny_model.ckpt, model_type="llama")
    calls = []
    real = export.exporter.export_model

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(export.model_cache, "export_model", counting)
    return calls


@pytest.fixture(scope="module")
def want(tiny_gen):
    """What the tiny checkpoint's own export generates: every name for those weights must give it."""
    return tiny_gen.generate("Hello", GREEDY).token_ids


# ---- item 6: names ---------------------------------------------------------------------------------------

def test_a_hub_repo_id_of_a_gpt2_model_in_any_case(exports, want, tmp_path):
    for name in ("someone/tiny-gpt2", "Someone/Tiny-GPT2", "SOMEONE/TINY-GPT2"):   # the hub's ids are case-insensitive
        with Generator.from_pretrained(name) as g:
            assert g.config == TINY and not g.artifact.is_random
            assert g.generate("Hello", GREEDY).token_ids == want
    assert exports == ["someone/tiny-gpt2"], "one export, reused for every spelling"
    assert visible(tmp_path / "cache") == ["hub-someone--tiny-gpt2-fp32"]


def test_a_fine_tune_shaped_like_sshleifer_tiny_gpt2(exports, tmp_path):
    """sshleifer/tiny-gpt2's shape: 2 layers, 2 wide, 2 heads (head size 1, which ONNX Runtime's
    GroupQueryAttention refuses: the export takes the standard Attention), weights as a PyTorch pickle."""
    import torch

    from engine.config import GPT2Config
    from export.checkpoint import random_weights, save_checkpoint
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=2)
    src = save_checkpoint(tmp_path / "src", cfg, random_weights(cfg, 0, 0.02))
    repo = tmp_path / "hub" / "models--sshleifer--tiny-gpt2"
    snap = repo / "snapshots" / "5f91d94b"
    snap.mkdir(parents=True)
    shutil.copy(src / "config.json", snap)
    from safetensors.numpy import load_file
    torch.save({k: torch.from_numpy(v) for k, v in load_file(str(src / "model.safetensors")).items()},
               snap / "pytorch_model.bin")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("5f91d94b")
    with Generator.from_pretrained("sshleifer/tiny-gpt2") as g:
        assert g.config == cfg and g.artifact.manifest["attention"] == "fused"
        assert len(g.generate("Hello", GREEDY).token_ids) == 6
    from export.exporter import export_model
    with pytest.raises(EngineError, match="--attention gqa needs a head size that is a multiple of 8"):
        export_model(str(src), tmp_path / "gqa", attention="gqa", show_progress=False)


def test_a_size_name_with_real_weights_reads_the_hub_cache(exports, want):
    for name in ("gpt2", "GPT2", "OpenAI-Community/gpt2"):
        with Generator.from_pretrained(name) as g:
            assert g.generate("Hello", GREEDY).token_ids == want and g.artifact.manifest["source"]["name"] == "gpt2"
    assert len(exports) == 1


def test_init_random_is_the_clis_random_model_and_is_labelled(exports, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gen = Generator.from_pretrained("gpt2", init="random")
        loaded = [w for w in caught if issubclass(w.category, RandomWeightsWarning)]
        assert len(loaded) == 1, [str(w.message) for w in caught]
        assert "RANDOM weights" in str(loaded[0].message) and loaded[0].filename == __file__   # points at the caller
        with gen:
            out = gen.generate("Hello", GREEDY)
            outs = gen.generate(["a", "b"], GREEDY)
        assert [w for w in caught if issubclass(w.category, RandomWeightsWarning)] == loaded   # at load only
    assert out.random_weights and all(o.random_weights for o in outs)
    assert (tmp_path / "cache" / "gpt2-fp32-random-seed0" / "manifest.json").is_file()
    # The CLI's `generate gpt2 --init random` finds the same export.
    from export.model_cache import resolve_model_dir
    assert resolve_model_dir("gpt2", init="random") == tmp_path / "cache" / "gpt2-fp32-random-seed0"
    assert len(exports) == 1


def test_real_weights_are_not_labelled(tiny_gen):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)
        with Generator.from_pretrained(tiny_gen.artifact.path) as g:
            assert g.generate("Hello", GREEDY).random_weights is False


def test_a_checkpoint_directory_is_exported_once(exports, tiny_model, want):
    for _ in range(2):
        with Generator.from_pretrained(str(tiny_model.ckpt)) as g:
            assert g.generate("Hello", GREEDY).token_ids == want
    assert exports == [str(tiny_model.ckpt)]


def test_what_is_not_a_gpt2_model(exports, tmp_path):
    with pytest.raises(CheckpointError, match="describes a 'llama' model; gpt2-engine exports GPT-2 only"):
        Generator.from_pretrained("someone/tiny-llama")
    with pytest.raises(CheckpointError, match="'nobody/nothing' is not a directory here, and as a Hugging Face "
                                              "repo id: nobody/nothing is not in the local Hugging Face cache"):
        Generator.from_pretrained("nobody/nothing")
    with pytest.raises(InputError, match=r"random weights need a size name .*got 'someone/tiny-gpt2'"):
        Generator.from_pretrained("someone/tiny-gpt2", init="random")
    with pytest.raises(InputError, match="nor a Hugging Face repo id"):
        Generator.from_pretrained("gpt3")
    with pytest.raises(ArtifactError, match="does not exist"):          # a path stays a path
        Generator.from_pretrained(tmp_path / "nowhere")
    assert visible(tmp_path / "cache") == []          # failed exports leave nothing behind (but their lock files)


def test_the_cli_takes_the_same_repo_ids(exports):
    from click.testing import CliRunner

    from cli.main import main
    r = CliRunner().invoke(main, ["generate", "Someone/Tiny-GPT2", "Hello", "-n", "4", "--greedy"])
    assert r.exit_code == 0, r.output
    assert exports == ["Someone/Tiny-GPT2"]


def test_loading_a_model_directory_never_loads_the_exporter(tiny_model):
    code = (f"import sys; from engine import Generator; g = Generator.from_pretrained({str(tiny_model.art)!r}); "
            "g.close(); print(sorted(m for m in sys.modules if m.split('.')[0] == 'export'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---- item 7: a prompt that does not fit says what does ----------------------------------------------------

def test_a_prompt_longer_than_the_context_says_how_long_it_may_be(tiny_gen):
    with pytest.raises(InputError) as e:
        tiny_gen.generate([464] * 1101, SamplingParams(max_new_tokens=5))
    msg = str(e.value)
    assert "prompt (1101 tokens)" in msg and "shorten the prompt to at most 1019 tokens" in msg, msg
    assert "truncate='left'" in msg and "keeps the prompt's last 1019 tokens" in msg
    assert "at most 0" not in msg and "max_new_tokens to" not in msg   # no max_new_tokens fits: not offered


def test_a_prompt_that_fits_alone_offers_both_fixes(tiny_gen):
    with pytest.raises(InputError) as e:
        tiny_gen.generate([464] * 1000, SamplingParams(max_new_tokens=100))
    msg = str(e.value)
    assert "lower max_new_tokens to at most 24" in msg and "shorten the prompt to at most 924 tokens" in msg, msg
    out = tiny_gen.generate([464] * 1000, SamplingParams(max_new_tokens=24))   # what it offered works
    assert len(out.token_ids) <= 24
