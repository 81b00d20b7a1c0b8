"""Find and load GPT-2 checkpoints as numpy arrays, checked against the architecture.

Sources, in the order `resolve_checkpoint` tries them:
  1. a local Hugging Face directory (config.json + model.safetensors, or pytorch_model.bin with torch);
  2. a model name (`gpt2` .. `gpt2-xl`, `distilgpt2`, or their `openai-community/...` hub ids), or any
     Hugging Face repo id (`owner/name`) whose config.json is GPT-2's (fine-tunes, `sshleifer/tiny-gpt2`),
     in any case as the hub takes them: found in the local HF hub cache, else downloaded when
     `huggingface_hub` is installed and the hub answers.
`random_checkpoint` makes a randomly initialised checkpoint of a named size instead (demos, benchmarks,
tests: no real weights exist offline).

Weights come out under hub names without the `transformer.` prefix (`h.0.attn.c_attn.weight`), which
are also the ONNX initializer names.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.config import HUB_IDS, SIZES, GPT2Config, canonical_size_name
from engine.errors import CPU_TORCH, CheckpointError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# A Hugging Face repo id, `owner/name` (the hub's rule: letters, digits, '-', '_', '.'; no '--' or '..').
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# Buffers some checkpoints carry that are not weights (the causal mask of old transformers versions).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


@dataclass
class Checkpoint:
    config: GPT2Config
    weights: dict[str, np.ndarray]
    source: dict = field(default_factory=dict)  # written to the manifest: kind, name, path, sha256, seed
    directory: Path | None = None               # where tokenizer files may live


def expected_shapes(cfg: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of a GPT-2 checkpoint, Conv1D weights stored (in, out)."""
    C, V, P = cfg.n_embd, cfg.vocab_size, cfg.n_positions
    shapes = {"wte.weight": (V, C), "wpe.weight": (P, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for i in range(cfg.n_layer):
        h = f"h.{i}"
        shapes.update({
            f"{h}.ln_1.weight": (C,), f"{h}.ln_1.bias": (C,),
            f"{h}.attn.c_attn.weight": (C, 3 * C), f"{h}.attn.c_attn.bias": (3 * C,),
            f"{h}.attn.c_proj.weight": (C, C), f"{h}.attn.c_proj.bias": (C,),
            f"{h}.ln_2.weight": (C,), f"{h}.ln_2.bias": (C,),
            f"{h}.mlp.c_fc.weight": (C, 4 * C), f"{h}.mlp.c_fc.bias": (4 * C,),
            f"{h}.mlp.c_proj.weight": (4 * C, C), f"{h}.mlp.c_proj.bias": (C,),
        })
    return shapes


def check_weights(cfg: GPT2Config, weights: dict[str, np.ndarray]) -> None:
    """Raise CheckpointError naming the first missing, unexpected or mis-shaped tensor."""
    shapes = expected_shapes(cfg)
    missing = [k for k in shapes if k not in weights]
    if missing:
        raise CheckpointError(f"checkpoint lacks tensor {missing[0]!r} ({len(missing)} missing): "
                              "is this a GPT-2 checkpoint, and is its weights file complete?")
    for k, shape in shapes.items():
        if tuple(weights[k].shape) != shape:
            raise CheckpointError(f"tensor {k!r} has shape {tuple(weights[k].shape)}, the config "
                                  f"(n_layer={cfg.n_layer}, n_embd={cfg.n_embd}, vocab={cfg.vocab_size}) needs {shape}")
    extra = [k for k in weights if k not in shapes and k != "lm_head.weight"]
    if extra:
        raise CheckpointError(f"checkpoint has tensor {extra[0]!r} that GPT-2 (n_layer={cfg.n_layer}) does not: "
                              "config.json and the weights disagree")
    if "lm_head.weight" in weights and tuple(weights["lm_head.weight"].shape) != shapes["wte.weight"]:
        raise CheckpointError(f"tensor 'lm_head.weight' has shape {tuple(weights['lm_head.weight'].shape)}, "
                              f"needs {shapes['wte.weight']}")


def config_from_hf(path: Path) -> GPT2Config:
    """GPT2Config from a Hugging Face config.json; refuses variants this graph does not implement."""
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if d.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"{path} describes a {d.get('model_type')!r} model; gpt2-engine exports GPT-2 only")
    act = d.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"{path}: activation_function {act!r} is not supported (GPT-2 uses 'gelu_new')")
    if d.get("scale_attn_by_inverse_layer_idx") or d.get("scale_attn_weights") is False:
        raise CheckpointError(f"{path}: non-standard attention scaling is not supported")
    try:
        return GPT2Config(
            n_layer=int(d["n_layer"]), n_head=int(d["n_head"]), n_embd=int(d["n_embd"]),
            vocab_size=int(d["vocab_size"]), n_positions=int(d.get("n_positions", d.get("n_ctx", 1024))),
            layer_norm_epsilon=float(d.get("layer_norm_epsilon", 1e-5)),
            eos_token_id=int(d.get("eos_token_id") or 50256))
    except KeyError as e:
        raise CheckpointError(f"{path} lacks {e.args[0]!r}: not a GPT-2 config.json") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _strip_prefix(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Accept save_pretrained's `transformer.` prefix and the hub's bare names alike."""
    out = {}
    for k, v in raw.items():
        name = k[len("transformer."):] if k.startswith("transformer.") else k
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        out[name] = v
    return out


def _read_weights(path: Path) -> dict[str, np.ndarray]:
    if path.name.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {path} ({e}): the file is truncated or corrupt; download it again") from None
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path} is a PyTorch pickle: install torch (the CPU build: `pip install {CPU_TORCH}`) "
                              "or convert the checkpoint to model.safetensors") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated/corrupt pickles
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}: {e}): the file is truncated or corrupt") from None
    return {k: v.float().numpy() for k, v in state.items()}


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_checkpoint_dir(directory: Path, name: str | None = None) -> Checkpoint:
    """Load a Hugging Face GPT-2 directory, checking every tensor against config.json."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory")
    config_path = directory / "config.json"
    weights_path = next((directory / f for f in WEIGHT_FILES if (directory / f).is_file()), None)
    if not config_path.is_file() or weights_path is None:
        found = "config.json" if config_path.is_file() else "no config.json"
        raise CheckpointError(f"{directory} is not a GPT-2 checkpoint ({found}, no model.safetensors or "
                              "pytorch_model.bin): pass a Hugging Face model directory or a name such as gpt2")
    cfg = config_from_hf(config_path)
    weights = {k: np.asarray(v, dtype=np.float32) for k, v in _strip_prefix(_read_weights(weights_path)).items()}
    check_weights(cfg, weights)
    if "lm_head.weight" in weights and np.array_equal(weights["lm_head.weight"], weights["wte.weight"]):
        del weights["lm_head.weight"]  # tied, as GPT-2 is: one initializer serves both
    source = {"kind": "checkpoint", "name": name or directory.name, "path": str(directory.resolve()),
              "weights_file": weights_path.name, "sha256": sha256_file(weights_path)}
    return Checkpoint(cfg, weights, source, directory)


def random_weights(cfg: GPT2Config, seed: int = 0, init_range: float = 0.02,
                   progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Random weights of the exact architecture. Unlike HF's init, biases and norm parameters are
    random too, so a parity test exercises every tensor's wiring. `progress(1)` after each layer's."""
    rng = np.random.default_rng(seed)
    w = {}
    for k, shape in expected_shapes(cfg).items():
        if progress is not None and k.endswith(".ln_1.weight") and k != "h.0.ln_1.weight":
            progress(1)  # the previous layer is done (expected_shapes lists each layer's tensors together)
        if k.endswith("ln_1.weight") or k.endswith("ln_2.weight") or k == "ln_f.weight":
            w[k] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif k.endswith(".bias"):
            w[k] = (init_range * rng.standard_normal(shape)).astype(np.float32)
        else:
            std = init_range / np.sqrt(2 * cfg.n_layer) if k.endswith("c_proj.weight") else init_range
            w[k] = (std * rng.standard_normal(shape)).astype(np.float32)
    if progress is not None:
        progress(1)
    return w


def random_checkpoint(name: str, seed: int = 0, init_range: float = 0.02,
                      progress: Callable[[int], None] | None = None) -> Checkpoint:
    size = canonical_size_name(name)
    if size is None:
        raise CheckpointError(f"--init random needs a size name, one of {', '.join(SIZES)}; got {name!r}")
    cfg = SIZES[size]
    source = {"kind": "random", "name": size, "seed": seed, "init_range": init_range, "sha256": None}
    return Checkpoint(cfg, random_weights(cfg, seed, init_range, progress), source, None)


def save_checkpoint(directory: Path, cfg: GPT2Config, weights: dict[str, np.ndarray], prefix: str = "") -> Path:
    """Write a Hugging Face-format directory (config.json + model.safetensors) that transformers loads."""
    from safetensors.numpy import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": cfg.n_layer,
          "n_head": cfg.n_head, "n_embd": cfg.n_embd, "vocab_size": cfg.vocab_size,
          "n_positions": cfg.n_positions, "n_ctx": cfg.n_positions, "layer_norm_epsilon": cfg.layer_norm_epsilon,
          "activation_function": "gelu_new", "bos_token_id": cfg.eos_token_id, "eos_token_id": cfg.eos_token_id,
          "tie_word_embeddings": "lm_head.weight" not in weights,
          "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    (directory / "config.json").write_text(json.dumps(hf, indent=2))
    save_file({prefix + k: np.ascontiguousarray(v) for k, v in weights.items()}, str(directory / "model.safetensors"))
    return directory


def _hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def is_repo_id(name: str) -> bool:
    """Whether `name` reads as a Hugging Face repo id (`owner/name`)."""
    return bool(_REPO_ID.fullmatch(name)) and "--" not in name and ".." not in name


def find_in_hub_cache(repo_id: str) -> Path | None:
    """The cached snapshot of `repo_id` that has config.json and a weights file (the ref `main` first).
    Repo ids are case-insensitive on the hub, so is this lookup (the cache keeps the case it was fetched as)."""
    cache = _hub_cache_dir()
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    if not repo_dir.is_dir() and cache.is_dir():
        wanted = repo_dir.name.casefold()
        repo_dir = next((d for d in sorted(cache.iterdir()) if d.name.casefold() == wanted), repo_dir)
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo_dir / "refs" / "main"
    candidates = [snapshots / ref.read_text().strip()] if ref.is_file() else []
    candidates += sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    for snap in candidates:
        if (snap / "config.json").is_file() and any((snap / f).is_file() for f in WEIGHT_FILES):
            return snap
    return None


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{repo_id} is not in the local Hugging Face cache ({_hub_cache_dir()}) and "
                              "huggingface_hub is not installed: `pip install huggingface_hub` to download it, "
                              "or pass a local checkpoint directory, or use `--init random`") from None
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise CheckpointError(f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                              "download it on a connected machine, pass a local directory, or use `--init random`")
    patterns = ["config.json", "model.safetensors", "tokenizer.json", "vocab.json", "merges.txt"]
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=10))
        if not any((path / f).is_file() for f in WEIGHT_FILES):  # older repos ship only the PyTorch pickle
            path = Path(snapshot_download(repo_id, allow_patterns=[*patterns, "pytorch_model.bin"], etag_timeout=10))
        return path
    except Exception as e:  # network errors come in many types; all mean the same to the user
        raise CheckpointError(f"could not download {repo_id} from the Hugging Face hub ({type(e).__name__}): "
                              "check the network, pass a local checkpoint directory, or use `--init random`") from None


def resolve_checkpoint(spec: str) -> Checkpoint:
    """A local directory, a known model name or a Hugging Face repo id (hub cache first, then download)."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{spec} is a file: pass the checkpoint's directory (config.json + model.safetensors)")
        return load_checkpoint_dir(path)
    size = canonical_size_name(spec)
    if size is None and not is_repo_id(spec):
        raise CheckpointError(f"{spec!r} is neither a directory nor a known model; known names: "
                              f"{', '.join(SIZES)}, or a Hugging Face repo id of a GPT-2 model (owner/name)")
    repo_id = HUB_IDS[size] if size is not None else spec
    try:
        snap = find_in_hub_cache(repo_id) or _download(repo_id)
    except CheckpointError as e:
        if size is not None:
            raise
        raise CheckpointError(f"{spec!r} is not a directory here, and as a Hugging Face repo id: {e}") from None
    return load_checkpoint_dir(snap, name=size or repo_id)
