"""The model directory: manifest schema, I/O declared once as data, and the loader's checks.

export/ writes it, engine/ only reads it. Everything the runtime needs to know about the graph
(names, dtypes, shapes, cache capacity) comes from manifest.json, never from literals in code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engine.config import GPT2Config
from engine.errors import ArtifactError

FORMAT_VERSION = 1
# Bumped whenever the exporter's default graph changes (2: GroupQueryAttention + Gemm for the CPU; 3:
# every size's weights in model.onnx.data at page-aligned offsets, memory-mapped by ONNX Runtime, and
# fp32's tied LM head as its own initializer over wte's bytes; 4: int8 block size by role, residual Add +
# LayerNorm as SkipLayerNormalization in the CPU graphs; 5: the CPU graphs take a second segment of rows,
# the chunk segment, so a prompt chunk rides in the decode step's forward). Old directories still load;
# exports the engine caches for itself are redone when it differs.
GRAPH_VERSION = 5
MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
ENGINES_DIR = "engines"
# One opset for every graph family: 24 brings TensorScatter (in-place cache write).
OPSET = 24
# fp32: the CPU default; fp16: for TensorRT/GPUs; int8: CPU, weight-only int8 matmuls (MatMulNBits).
PRECISIONS = ("fp32", "fp16", "int8")

# Graph inputs/outputs, declared once. Shapes use the symbolic dims below.
#   batch: rows; seq: new tokens this call; n_logits: positions per row that get logits;
#   capacity: KV-cache slots per row (<= n_positions), chosen by the runtime at allocation.
INPUT_IDS = "input_ids"                # int64 (batch, seq)
CACHE_POSITIONS = "cache_positions"    # int64 (batch,): slot of this call's first token per row
LOGITS_INDICES = "logits_indices"      # int64 (batch, n_logits): which of the seq tokens get logits
LOGITS = "logits"                      # float32 (batch, n_logits, vocab)
# The chunk segment (GroupQueryAttention graphs, graph version 5): a second set of rows in the same forward,
# any number of new tokens at any positions (prompt chunks), with its own view of the slot pool. Its
# dims: chunk_batch, chunk_seq, chunk_n_logits. The first segment (the names above) is the decode rows.
CHUNK = "chunk."


def chunk_name(name: str) -> str:
    """The chunk segment's twin of a first-segment input or output name."""
    return CHUNK + name


def past_key(i: int) -> str:
    return f"past_key_values.{i}.key"


def past_value(i: int) -> str:
    return f"past_key_values.{i}.value"


def present_key(i: int) -> str:
    return f"present.{i}.key"


def present_value(i: int) -> str:
    return f"present.{i}.value"


def cache_io_pairs(n_layer: int) -> list[tuple[str, str]]:
    """(past input, present output) names that the runtime binds to one buffer."""
    pairs = []
    for i in range(n_layer):
        pairs.append((past_key(i), present_key(i)))
        pairs.append((past_value(i), present_value(i)))
    return pairs


def io_spec(config: GPT2Config, precision: str, chunk_segment: bool = False) -> dict:
    """The graph's I/O as data: written to the manifest, checked against the ONNX graph in tests.
    chunk_segment: the GroupQueryAttention graphs' second segment (its names prefixed by CHUNK)."""
    cache_dtype = "float16" if precision == "fp16" else "float32"
    inputs: list[dict] = []
    outputs: list[dict] = []
    for prefix, dim in [("", "")] + ([(CHUNK, "chunk_")] if chunk_segment else []):
        cache_shape = [f"{dim}batch", config.n_head, "capacity", config.head_dim]
        inputs += [
            {"name": prefix + INPUT_IDS, "dtype": "int64", "shape": [f"{dim}batch", f"{dim}seq"]},
            {"name": prefix + CACHE_POSITIONS, "dtype": "int64", "shape": [f"{dim}batch"]},
            {"name": prefix + LOGITS_INDICES, "dtype": "int64", "shape": [f"{dim}batch", f"{dim}n_logits"]},
        ]
        outputs.append({"name": prefix + LOGITS, "dtype": "float32",
                        "shape": [f"{dim}batch", f"{dim}n_logits", config.vocab_size]})
    for prefix, dim in [("", "")] + ([(CHUNK, "chunk_")] if chunk_segment else []):
        cache_shape = [f"{dim}batch", config.n_head, "capacity", config.head_dim]
        for past, present in cache_io_pairs(config.n_layer):
            inputs.append({"name": prefix + past, "dtype": cache_dtype, "shape": cache_shape})
            outputs.append({"name": prefix + present, "dtype": cache_dtype, "shape": cache_shape,
                            "aliases": prefix + past})
    return {"inputs": inputs, "outputs": outputs}


def has_chunk_segment(manifest: dict) -> bool:
    """Whether the model directory's graph takes the chunk segment (graph version >= 5, GQA graphs)."""
    return any(t["name"] == CHUNK + INPUT_IDS for t in manifest.get("io", {}).get("inputs", []))


@dataclass(frozen=True)
class Artifact:
    """A loaded, validated model directory."""

    path: Path
    manifest: dict

    @property
    def config(self) -> GPT2Config:
        return GPT2Config.from_dict(self.manifest["config"])

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest["model_file"]

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.manifest["tokenizer_file"]

    @property
    def max_capacity(self) -> int:
        return int(self.manifest["cache"]["max_capacity"])

    @property
    def is_random(self) -> bool:
        return self.manifest["source"].get("kind") == "random"

    @property
    def label(self) -> str:
        """How outputs that show text name the weights (random weights are always labelled)."""
        src = self.manifest["source"]
        if src.get("kind") == "random":
            return f"{src.get('name')} (RANDOM weights, seed {src.get('seed')}: output is not language)"
        return str(src.get("name"))


def load_artifact(path: str | Path) -> Artifact:
    """Read and check a model directory; every failure says what to re-run."""
    p = Path(path)
    if not p.is_dir():
        raise ArtifactError(f"model directory {p} does not exist: create it with `gpt2-engine export MODEL --out {p}`")
    mpath = p / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{p} is not a gpt2-engine model directory (no {MANIFEST}): "
                            f"create one with `gpt2-engine export MODEL --out {p}`")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath} is corrupt ({e}): re-run `gpt2-engine export` into a fresh directory") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{p} has manifest format version {version!r}, this gpt2-engine reads version "
                            f"{FORMAT_VERSION}: re-run `gpt2-engine export` with this version")
    required = ("config", "precision", "model_file", "tokenizer_file", "cache", "io", "source")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise ArtifactError(f"{mpath} lacks {', '.join(missing)}: re-run `gpt2-engine export`")
    art = Artifact(p, manifest)
    external = manifest.get("external_data_file")  # the weights (graph version >= 3: every size)
    for f in (art.model_path, art.tokenizer_path, *([p / external] if external else [])):
        if not f.is_file():
            raise ArtifactError(f"{p} is incomplete: {f.name} is missing; re-run `gpt2-engine export`")
    return art


def is_current_export(path: str | Path) -> bool:
    """A loadable model directory made by this exporter's graph version: what the engine's own caches
    (named models, the benchmark's work dir) may reuse instead of exporting again."""
    try:
        art = load_artifact(path)
    except ArtifactError:
        return False
    return art.manifest.get("graph_version") == GRAPH_VERSION
