"""gpt2-large and gpt2-xl (fp32, random weights at the default init): past 2 GB, so the weights go to
model.onnx.data; the artifact loads in ONNX Runtime and matches HF on a short prompt (max |diff| <= 1e-4).

Slow (minutes, up to ~13 GB of memory for gpt2-xl): `pytest -s -m slow tests/test_export_big.py`.
One size at a time; every big object is dropped before the next step. Timings and sizes are printed.
"""

from __future__ import annotations

import gc
import json
import shutil
import time

import numpy as np
import onnx
import pytest

from engine import artifact as io
from engine.config import SIZES
from tests.conftest import PARITY_INIT, PARITY_TOL

pytestmark = pytest.mark.slow

PROMPT = np.array([464, 2068, 7586, 21831, 18045, 625, 262, 16931])  # "The quick brown fox jumps over the lazy"


@pytest.mark.parametrize("size", ["gpt2-large", "gpt2-xl"])
def test_big_export_matches_hf(tmp_path, size):
    import torch
    from transformers import GPT2LMHeadModel

    from engine.artifact import load_artifact
    from engine.backends.ort import OrtBackend
    from export.checkpoint import random_weights, save_checkpoint
    from export.exporter import EXTERNAL_DATA_FILE, export_model

    cfg = SIZES[size]
    ckpt, art = tmp_path / "ckpt", tmp_path / "art"
    times = {}
    try:
        t = time.perf_counter()
        weights = random_weights(cfg, seed=0, init_range=PARITY_INIT)
        save_checkpoint(ckpt, cfg, weights)
        del weights
        gc.collect()
        times["random checkpoint"] = time.perf_counter() - t

        t = time.perf_counter()
        export_model(str(ckpt), art, show_progress=False)
        times["export"] = time.perf_counter() - t
        sizes = {p.name: p.stat().st_size for p in art.iterdir()}
        manifest = json.loads((art / io.MANIFEST).read_text())
        assert manifest["external_data_file"] == EXTERNAL_DATA_FILE
        assert sizes[EXTERNAL_DATA_FILE] > 2**31                 # > 2 GB of weights, outside the protobuf
        assert sizes[io.MODEL_FILE] < 50_000_000                  # the graph alone
        assert set(manifest["onnx_sha256"]) == {io.MODEL_FILE, EXTERNAL_DATA_FILE}

        t = time.perf_counter()
        onnx.checker.check_model(str(art / io.MODEL_FILE))       # by path: the only way past 2 GB
        graph = onnx.load(str(art / io.MODEL_FILE), load_external_data=False)
        # The fp32 default: standard ops plus ORT's GroupQueryAttention (the CPU attention).
        assert [(o.domain, o.version) for o in graph.opset_import] == [("", io.OPSET), ("com.microsoft", 1)]
        assert [v.name for v in graph.graph.input] == [t["name"] for t in manifest["io"]["inputs"]]
        del graph
        times["check_model"] = time.perf_counter() - t

        # ORT: a 7-token prefill, then one decode step for the 8th token.
        t = time.perf_counter()
        be = OrtBackend(load_artifact(art))
        times["ORT session"] = time.perf_counter() - t
        t = time.perf_counter()
        cache = be.new_cache(1, cfg.n_positions)
        pre = be.forward(cache, PROMPT[None, :7], np.array([0]), np.arange(7)[None])[0]       # (7, V)
        step = be.forward(cache, PROMPT[None, 7:], np.array([7]), np.array([[0]]))[0]        # (1, V)
        got = np.concatenate([pre, step])                                                    # (8, V)
        times["ORT prefill + step"] = time.perf_counter() - t
        be.close()
        del be, cache
        gc.collect()

        t = time.perf_counter()
        model = GPT2LMHeadModel.from_pretrained(str(ckpt), dtype=torch.float32, attn_implementation="eager").eval()
        with torch.no_grad():
            ref = model(torch.from_numpy(PROMPT[None])).logits[0].numpy()                    # (8, V)
        del model
        gc.collect()
        times["HF load + forward"] = time.perf_counter() - t

        d = float(np.abs(got.astype(np.float64) - ref).max())
        print(f"\n[big] {size}: max|ORT-HF| = {d:.2e} over 8 positions (logits std {ref.std():.3f}); "
              + ", ".join(f"{k} {v:.1f} s" for k, v in times.items())
              + "; files " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(sizes.items())))
        assert np.isfinite(got).all()
        assert d <= PARITY_TOL
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(art, ignore_errors=True)
        gc.collect()
