"""Finding and loading checkpoints: HF directories (safetensors or pytorch_model.bin, with or without the
`transformer.` prefix), the HF hub cache by model name, and every way a checkpoint can be wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.config import SIZES, GPT2Config
from engine.errors import CheckpointError
from export import checkpoint as ck
from export.checkpoint import (
    expected_shapes,
    find_in_hub_cache,
    load_checkpoint_dir,
    random_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from tests.conftest import TINY

HASH = "607a30d783dfa663caf39e06633721c8d4cfcd7e"  # any 40-hex commit id


def assert_same_weights(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == np.float32, k
        assert np.array_equal(got[k], want[k]), k


# ---- local directories ------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_load_with_and_without_transformer_prefix(tmp_path, tiny_weights, prefix):
    d = save_checkpoint(tmp_path / "ckpt", TINY, tiny_weights, prefix=prefix)
    if prefix:  # the file really carries the prefix
        from safetensors import safe_open
        with safe_open(str(d / "model.safetensors"), "np") as f:
            assert all(k.startswith(prefix) for k in f.keys())
    c = load_checkpoint_dir(d)
    assert c.config == TINY
    assert_same_weights(c.weights, tiny_weights)
    assert c.source["kind"] == "checkpoint" and c.source["weights_file"] == "model.safetensors"
    assert c.source["sha256"] == ck.sha256_file(d / "model.safetensors")
    assert c.directory == d


def test_transformers_reads_what_save_checkpoint_writes(tmp_path, tiny_weights):
    """The oracle loads the same directory; an error in save_checkpoint's config would show here."""
    import torch
    from transformers import GPT2LMHeadModel
    d = save_checkpoint(tmp_path / "ckpt", TINY, tiny_weights, prefix="transformer.")
    m = GPT2LMHeadModel.from_pretrained(str(d), dtype=torch.float32)
    sd = {k: v.numpy() for k, v in m.transformer.state_dict().items()}
    for k, v in tiny_weights.items():
        assert np.array_equal(sd[k], v), k
    assert m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()  # tied


def test_pytorch_model_bin_with_prefix_and_mask_buffers(tmp_path, tiny_weights):
    """An old-style save: torch.save of a state dict, `transformer.` keys, causal-mask buffers, a tied
    lm_head.weight copy. The buffers are ignored and the tied head folded into wte."""
    import torch
    d = tmp_path / "ckpt"
    save_checkpoint(d, TINY, tiny_weights)
    (d / "model.safetensors").unlink()
    state = {"transformer." + k: torch.from_numpy(v.copy()) for k, v in tiny_weights.items()}
    for i in range(TINY.n_layer):
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 8, 8))
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    state["lm_head.weight"] = torch.from_numpy(tiny_weights["wte.weight"].copy())
    torch.save(state, d / "pytorch_model.bin")
    c = load_checkpoint_dir(d)
    assert_same_weights(c.weights, tiny_weights)
    assert c.source["weights_file"] == "pytorch_model.bin"


def test_pytorch_model_bin_fp16_is_upcast(tmp_path, tiny_weights):
    import torch
    d = tmp_path / "ckpt"
    save_checkpoint(d, TINY, tiny_weights)
    (d / "model.safetensors").unlink()
    torch.save({k: torch.from_numpy(v).half() for k, v in tiny_weights.items()}, d / "pytorch_model.bin")
    c = load_checkpoint_dir(d)
    assert all(v.dtype == np.float32 for v in c.weights.values())
    np.testing.assert_allclose(c.weights["h.1.mlp.c_fc.weight"], tiny_weights["h.1.mlp.c_fc.weight"], rtol=1e-3, atol=1e-6)


def test_untied_lm_head_is_kept(tmp_path, tiny_weights):
    w = dict(tiny_weights, **{"lm_head.weight": tiny_weights["wte.weight"] + 1.0})
    c = load_checkpoint_dir(save_checkpoint(tmp_path / "ckpt", TINY, w))
    assert "lm_head.weight" in c.weights
    assert np.array_equal(c.weights["lm_head.weight"], w["lm_head.weight"])


# ---- the hub cache ------------------------------------------------------------------------------------

def make_hub_cache(root: Path, repo_id: str, src: Path, ref: str | None = HASH, commit: str = HASH) -> Path:
    """The HF hub cache layout: blobs + snapshot symlinks, refs/main -> commit."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in src.iterdir():
        blob = repo / "blobs" / f"{commit[:8]}-{f.name}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(ref)
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch):
    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


@pytest.mark.parametrize("name", ["gpt2", "openai-community/gpt2"])
def test_resolve_name_from_hub_cache(hub, tiny_checkpoint, tiny_weights, name):
    # A tiny config under the gpt2 name: resolve_checkpoint loads whatever config the snapshot holds.
    snap = make_hub_cache(hub, "openai-community/gpt2", tiny_checkpoint)
    c = resolve_checkpoint(name)
    assert c.config == TINY
    assert_same_weights(c.weights, tiny_weights)
    assert c.source["name"] == "gpt2"
    assert c.source["path"] == str(snap.resolve())
    assert c.directory == snap


def test_hub_cache_under_hf_home(tmp_path, monkeypatch, tiny_checkpoint):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    snap = make_hub_cache(tmp_path / "home" / "hub", "openai-community/gpt2-medium", tiny_checkpoint)
    assert find_in_hub_cache("openai-community/gpt2-medium") == snap
    assert resolve_checkpoint("gpt2-medium").source["name"] == "gpt2-medium"


def test_hub_cache_prefers_refs_main_and_skips_incomplete_snapshots(hub, tiny_checkpoint):
    other = "1" * 40
    main = make_hub_cache(hub, "openai-community/gpt2", tiny_checkpoint)
    newer = hub / "models--openai-community--gpt2" / "snapshots" / other
    newer.mkdir()
    (newer / "config.json").write_text((tiny_checkpoint / "config.json").read_text())  # no weights: incomplete
    assert find_in_hub_cache("openai-community/gpt2") == main
    (hub / "models--openai-community--gpt2" / "refs" / "main").write_text(other)  # main -> the incomplete one
    assert find_in_hub_cache("openai-community/gpt2") == main                    # falls back to a complete one


def test_unknown_name_lists_the_known_names(hub):
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint("gpt3-large")
    msg = str(e.value)
    assert "'gpt3-large'" in msg
    for name in SIZES:
        assert name in msg


def test_not_cached_and_offline_says_what_to_do(hub):
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint("gpt2-xl")
    msg = str(e.value)
    assert "openai-community/gpt2-xl" in msg and "HF_HUB_OFFLINE" in msg
    assert "--init random" in msg and "local" in msg


# ---- broken checkpoints -----------------------------------------------------------------------------

def test_wrong_shape_names_the_tensor(tmp_path, tiny_weights):
    w = dict(tiny_weights, **{"h.1.attn.c_attn.weight": np.zeros((64, 190), np.float32)})
    with pytest.raises(CheckpointError, match=r"'h\.1\.attn\.c_attn\.weight' has shape \(64, 190\).*\(64, 192\)"):
        load_checkpoint_dir(save_checkpoint(tmp_path / "ckpt", TINY, w))


def test_config_disagreeing_with_weights(tmp_path, tiny_weights):
    """config.json says 3 layers, the weights have 2: the first missing tensor is named."""
    d = save_checkpoint(tmp_path / "ckpt", GPT2Config(n_layer=3, n_head=4, n_embd=64), tiny_weights)
    with pytest.raises(CheckpointError, match=r"lacks tensor 'h\.2\.ln_1\.weight'"):
        load_checkpoint_dir(d)


def test_missing_tensor(tmp_path, tiny_weights):
    w = {k: v for k, v in tiny_weights.items() if k != "h.0.mlp.c_proj.bias"}
    with pytest.raises(CheckpointError, match=r"lacks tensor 'h\.0\.mlp\.c_proj\.bias' \(1 missing\)"):
        load_checkpoint_dir(save_checkpoint(tmp_path / "ckpt", TINY, w))


def test_unexpected_tensor(tmp_path, tiny_weights):
    w = dict(tiny_weights, **{"h.2.ln_1.weight": np.ones(64, np.float32)})
    with pytest.raises(CheckpointError, match=r"'h\.2\.ln_1\.weight' that GPT-2 \(n_layer=2\) does not"):
        load_checkpoint_dir(save_checkpoint(tmp_path / "ckpt", TINY, w))


@pytest.mark.parametrize("fraction", [0.5, 0.999])
def test_truncated_safetensors(tmp_path, tiny_checkpoint, fraction):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:int(len(data) * fraction)])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint_dir(d)


def test_truncated_pytorch_bin(tmp_path, tiny_weights):
    import torch
    d = tmp_path / "ckpt"
    save_checkpoint(d, TINY, tiny_weights)
    (d / "model.safetensors").unlink()
    torch.save({k: torch.from_numpy(v) for k, v in tiny_weights.items()}, d / "pytorch_model.bin")
    data = (d / "pytorch_model.bin").read_bytes()
    (d / "pytorch_model.bin").write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint_dir(d)


def test_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="is not a GPT-2 checkpoint"):
        load_checkpoint_dir(tmp_path)
    with pytest.raises(CheckpointError, match="is not a GPT-2 checkpoint"):
        resolve_checkpoint(str(tmp_path))
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_checkpoint(str(tmp_path / "notes.txt"))


def test_config_only_no_weights(tmp_path, tiny_checkpoint):
    shutil.copy(tiny_checkpoint / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=r"\(config\.json, no model\.safetensors or pytorch_model\.bin\)"):
        load_checkpoint_dir(tmp_path)


@pytest.mark.parametrize("change,match", [
    ({"model_type": "llama"}, "GPT-2 only"),
    ({"activation_function": "relu"}, "activation_function 'relu'"),
    ({"scale_attn_by_inverse_layer_idx": True}, "attention scaling"),
    ({"n_embd": None}, "lacks 'n_embd'"),
])
def test_config_variants_refused(tmp_path, tiny_checkpoint, change, match):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, d)
    cfg = json.loads((d / "config.json").read_text())
    for k, v in change.items():
        if v is None:
            del cfg[k]
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint_dir(d)


def test_corrupt_config_json(tmp_path, tiny_checkpoint):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint_dir(d)


# ---- random checkpoints -------------------------------------------------------------------------------

def test_random_checkpoint_is_labelled_random(monkeypatch):
    # The real distilgpt2 table entry would cost seconds of random numbers; the label is what is tested.
    monkeypatch.setitem(ck.SIZES, "distilgpt2", TINY)
    c = random_checkpoint("distilgpt2", seed=5, init_range=0.1)
    assert c.source == {"kind": "random", "name": "distilgpt2", "seed": 5, "init_range": 0.1, "sha256": None}
    assert c.directory is None
    assert set(c.weights) == set(expected_shapes(TINY))
    again = random_checkpoint("distilbert/distilgpt2", seed=5, init_range=0.1)
    assert_same_weights(again.weights, c.weights)  # seeded: the same weights


def test_random_checkpoint_needs_a_size_name():
    with pytest.raises(CheckpointError, match="--init random needs a size name"):
        random_checkpoint("my-model")


def test_random_weights_cover_every_tensor_and_scale_with_init():
    a = ck.random_weights(TINY, seed=3, init_range=0.02)
    b = ck.random_weights(TINY, seed=3, init_range=0.1)
    ck.check_weights(TINY, a)
    assert {k: v.shape for k, v in a.items()} == expected_shapes(TINY)
    # Biases are random too (every tensor's wiring is exercised), and the init scales the std.
    assert a["h.0.attn.c_attn.bias"].std() > 0.01
    np.testing.assert_allclose(b["wte.weight"], 5 * a["wte.weight"], rtol=1e-5, atol=1e-7)
    assert not np.array_equal(a["wte.weight"], ck.random_weights(TINY, seed=4)["wte.weight"])
