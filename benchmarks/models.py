"""The weights a bench run measures and the inputs every runner reads.

One set of weights per model: a Hugging Face checkpoint directory (for `--init random` saved here
once), from which each runner's format is made and reused: the engine's export, CTranslate2's
conversion. The reference, HF transformers and CTranslate2 all read that same file. The prompts are
fixed per (batch, length), so every runner and every run times the same tokens.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.peers import quiet_transformers
from benchmarks.records import Skipped
from engine.artifact import is_current_export
from engine.config import GPT2Config
from engine.errors import InputError
from export.model_cache import dir_lock


@dataclass(frozen=True)
class ModelSpec:
    """What to benchmark. ``init='random'``: random weights of ``config`` (saved once under the work
    dir); ``init='checkpoint'``: ``source`` is a checkpoint directory or a model name (hub cache)."""

    name: str
    init: str = "random"
    config: GPT2Config | None = None
    source: str | None = None
    seed: int = 0
    init_range: float = 0.1

    def __post_init__(self):
        if self.init not in ("random", "checkpoint"):
            raise InputError(f"init must be 'random' or 'checkpoint', got {self.init!r}")
        if self.init == "random" and self.config is None:
            raise InputError(f"random init of {self.name!r} needs a config")


@dataclass
class PreparedModel:
    name: str
    config: GPT2Config
    checkpoint_dir: Path
    weights: str                                  # "random" | "real" (BenchRecord.weights)
    work_dir: Path
    spec: ModelSpec
    setup_s: dict = field(default_factory=dict)   # seconds per setup phase (a reused one takes ~0 s)
    _artifacts: dict = field(default_factory=dict)
    _ct2: dict = field(default_factory=dict)

    def artifact(self, precision: str) -> Path:
        """The engine's model directory for this checkpoint (exported once, then reused)."""
        if precision in self._artifacts:
            return self._artifacts[precision]
        t0 = time.perf_counter()
        if self.weights == "real":
            from export.model_cache import resolve_model_dir
            # Real checkpoints resolve as `gpt2-engine generate` does: shared with the engine's cache.
            path = resolve_model_dir(self.spec.source or str(self.checkpoint_dir), precision, show_progress=False)
        else:
            from export.exporter import export_model
            path = self.work_dir / f"engine-{precision}"
            with dir_lock(path):  # another bench run may be exporting it: wait, then reuse
                if not is_current_export(path):  # absent, or made by an older exporter: export again
                    export_model(str(self.checkpoint_dir), path, precision=precision, force=True, show_progress=False)
        self.setup_s[f"export_{precision}"] = round(time.perf_counter() - t0, 2)
        self._artifacts[precision] = path
        return path

    def ct2_dir(self, quantization: str | None) -> Path:
        """This checkpoint converted by CTranslate2's TransformersConverter (once, then reused)."""
        key = quantization or "float32"
        if key in self._ct2:
            if isinstance(self._ct2[key], Exception):
                raise self._ct2[key]
            return self._ct2[key]
        t0 = time.perf_counter()
        out = self.work_dir / f"ct2-{key}"
        try:
            import ctranslate2
        except ImportError as e:
            self._ct2[key] = Skipped(f"ctranslate2 not installed ({e}): `pip install ctranslate2`")
            raise self._ct2[key] from None
        with dir_lock(self.work_dir / "ct2"):  # every conversion shares ct2-source: one at a time across runs
            if not (out / "model.bin").is_file():
                tmp = self.work_dir / f".ct2-{key}.partial"
                shutil.rmtree(tmp, ignore_errors=True)
                try:
                    quiet_transformers()  # the converter loads the checkpoint through transformers
                    ctranslate2.converters.TransformersConverter(str(self._ct2_source())).convert(
                        str(tmp), quantization=quantization, force=True)
                except Exception as e:  # noqa: BLE001 -- converter/transformers incompatibilities come in many types
                    shutil.rmtree(tmp, ignore_errors=True)
                    self._ct2[key] = Skipped(f"CTranslate2 conversion failed ({type(e).__name__}: {str(e)[:200]})")
                    raise self._ct2[key] from None
                shutil.rmtree(out, ignore_errors=True)
                tmp.rename(out)
        self.setup_s[f"convert_ct2_{key}"] = round(time.perf_counter() - t0, 2)
        self._ct2[key] = out
        return out

    def _ct2_source(self) -> Path:
        """The checkpoint as the converter wants it: it reads the vocabulary from the checkpoint's
        tokenizer, which a bare config.json + model.safetensors directory lacks. Then links to the
        user's files plus GPT-2's tokenizer, in the work dir (the user's directory is not touched)."""
        ckpt = self.checkpoint_dir
        if any((ckpt / f).is_file() for f in ("tokenizer.json", "vocab.json")):
            return ckpt
        src = self.work_dir / "ct2-source"
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir(parents=True)
        for f in ckpt.iterdir():
            if f.is_file():
                (src / f.name).symlink_to(f.resolve())
        _write_tokenizer_files(src)
        return src


def _write_tokenizer_files(directory: Path) -> None:
    """GPT-2's tokenizer beside the weights: CTranslate2's converter builds its vocabulary from the
    checkpoint's tokenizer (AutoTokenizer), and the exporter copies tokenizer.json from there too."""
    from export.tokenizer import SHIPPED_TOKENIZER
    shutil.copy(SHIPPED_TOKENIZER, directory / "tokenizer.json")
    eos = "<|endoftext|>"
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2TokenizerFast", "model_max_length": 1024,
         "bos_token": eos, "eos_token": eos, "unk_token": eos}, indent=2))


def prepare_model(spec: ModelSpec, work_root: Path) -> PreparedModel:
    """The checkpoint directory every runner reads; random weights are saved once and reused.

    Runs at once share the work dir: each step that writes there (this checkpoint, each export, the
    CTranslate2 conversions) holds a lock on what it makes (export.model_cache.dir_lock), so a second run
    waits for the first's, then reuses it, and writes go to a temporary name renamed into place."""
    from export.checkpoint import config_from_hf
    if spec.init == "random":
        from export.checkpoint import random_weights, save_checkpoint
        work = Path(work_root) / f"{spec.name}-random-seed{spec.seed}-init{spec.init_range:g}"
        ckpt = work / "checkpoint"
        t0 = time.perf_counter()
        with dir_lock(work):
            if not ((ckpt / "complete").is_file() and config_from_hf(ckpt / "config.json") == spec.config):
                # A different config under the same name (or a half-written directory): start over, and
                # drop what was made from the old weights.
                for old in (ckpt, *work.glob("engine-*"), *work.glob("ct2-*")):
                    shutil.rmtree(old, ignore_errors=True)
                work.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(prefix=".checkpoint.partial-", dir=work))
                save_checkpoint(tmp, spec.config, random_weights(spec.config, spec.seed, spec.init_range))
                _write_tokenizer_files(tmp)
                (tmp / "complete").write_text("")
                tmp.rename(ckpt)
        prepared = PreparedModel(spec.name, spec.config, ckpt, "random", work, spec)
        prepared.setup_s["save_checkpoint"] = round(time.perf_counter() - t0, 2)
        return prepared
    from engine.config import HUB_IDS, canonical_size_name
    from export.checkpoint import find_in_hub_cache, resolve_checkpoint
    src = Path(spec.source or spec.name).expanduser()
    if (src / "manifest.json").is_file():
        raise InputError(f"{src} is an exported model directory; bench needs the checkpoint it came from "
                         "(config.json + model.safetensors), because the reference and the peers load it")
    if src.is_dir():
        ckpt = src
    else:
        size = canonical_size_name(str(spec.source or spec.name))
        found = find_in_hub_cache(HUB_IDS[size]) if size else None
        ckpt = found or resolve_checkpoint(str(spec.source or spec.name)).directory  # downloads if needed
    work = Path(work_root) / f"ckpt-{hashlib.sha256(str(ckpt.resolve()).encode()).hexdigest()[:12]}"
    work.mkdir(parents=True, exist_ok=True)
    return PreparedModel(spec.name, config_from_hf(ckpt / "config.json"), ckpt, "real", work, spec)


def prompt_ids(batch: int, length: int, vocab: int, eos: int) -> np.ndarray:
    """The timed prompts: fixed per (batch, length), shared by every runner. (B, T) int64."""
    rng = np.random.default_rng([batch, length])
    return rng.integers(0, min(vocab, eos) if eos > 0 else vocab, size=(batch, length), dtype=np.int64)


def shipped_tokenizer():
    """GPT-2's tokenizer as the engine ships it: encodes the validation text."""
    from export.tokenizer import load_shipped_tokenizer
    return load_shipped_tokenizer()
