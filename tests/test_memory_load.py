"""Memory and load: the weight storage (every size's weights in page-aligned model.onnx.data, which ONNX
Runtime memory-maps; fp32's tied LM head as its own initializer over wte's bytes), old directories,
the slot pool's lazily committed memory, and the harness's RSS / weight bytes and load / read figures.

No timing is asserted; the one memory bound (a loaded gpt2 in a fresh process) is loose enough for
any machine and tight enough to catch the weights being held twice again (1.97x before).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

from engine import Generator, SamplingParams
from engine import artifact as io
from engine.artifact import load_artifact
from engine.backends.ort import PREPACKED_DIR, OrtBackend, find_prepacked, lazy_zeros
from engine.errors import ArtifactError, EngineError
from export.checkpoint import resolve_checkpoint, sha256_file
from export.exporter import EXTERNAL_DATA_FILE, export_model
from export.graph import HEAD_ALIAS, ExternalData, build_decoder_graph
from tests.conftest import TINY, Case
from tests.runtime_fixtures import REPO

IDS = np.array([[464, 3616, 286, 1204, 318, 11, 290]], np.int64)  # (1, T)


def _logits(path, ids=IDS, **options) -> np.ndarray:
    be = OrtBackend(load_artifact(path), threads=1, **options)
    try:
        cache = be.new_cache(1, 32)
        T = ids.shape[1]
        return be.forward(cache, ids, np.zeros(1, np.int64), np.arange(T)[None])   # (1, T, V)
    finally:
        be.close()


def _external(t: onnx.TensorProto) -> dict:
    return {e.key: e.value for e in t.external_data}


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_checkpoint):
    d = tmp_path_factory.mktemp("memory")
    return {p: export_model(str(tiny_checkpoint), d / p, precision=p, show_progress=False, prepack=True)
            for p in ("fp32", "int8")}


@pytest.fixture(scope="module")
def old_dir(tmp_path_factory, tiny_checkpoint, exports):
    """A directory as the exporter made them before graph version 3 for models under 1.9 GB: every
    weight inside model.onnx, the head reading wte itself, no external data."""
    d = tmp_path_factory.mktemp("old") / "fp32"
    d.mkdir()
    onnx.save_model(build_decoder_graph(TINY, resolve_checkpoint(str(tiny_checkpoint)).weights, "fp32"),
                    str(d / io.MODEL_FILE))
    shutil.copy(exports["fp32"] / io.TOKENIZER_FILE, d / io.TOKENIZER_FILE)
    manifest = json.loads((exports["fp32"] / io.MANIFEST).read_text())
    manifest.update(graph_version=2, external_data_file=None, onnx_sha256={io.MODEL_FILE: sha256_file(d / io.MODEL_FILE)})
    (d / io.MANIFEST).write_text(json.dumps(manifest, indent=2))
    return d


# ---- the storage -----------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_every_weight_is_in_page_aligned_external_data(exports, precision):
    art = exports[precision]
    manifest = json.loads((art / io.MANIFEST).read_text())
    assert manifest["external_data_file"] == EXTERNAL_DATA_FILE and manifest["graph_version"] == io.GRAPH_VERSION
    assert set(manifest["onnx_sha256"]) == {io.MODEL_FILE, EXTERNAL_DATA_FILE}
    model = onnx.load(str(art / io.MODEL_FILE), load_external_data=False)
    size = (art / EXTERNAL_DATA_FILE).stat().st_size
    big = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert {t.name for t in big} >= {"wte.weight", "wpe.weight"}
    for t in big:
        ext = _external(t)
        assert ext["location"] == EXTERNAL_DATA_FILE
        assert int(ext["offset"]) % ExternalData.ALIGN == 0, t.name  # what lets ORT map each weight
        assert int(ext["offset"]) + int(ext["length"]) <= size
    # Nothing of 1 KB or more stays inside the graph file.
    assert all(len(t.raw_data) < 1024 for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL)
    onnx.checker.check_model(str(art / io.MODEL_FILE))  # a valid ONNX model for third-party tools


def test_fp32_tied_head_reads_wte_bytes_through_its_own_initializer(exports):
    model = onnx.load(str(exports["fp32"] / io.MODEL_FILE), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    assert _external(inits[HEAD_ALIAS]) == _external(inits["wte.weight"])  # the same bytes, stored once
    head = next(n for n in model.graph.node if n.op_type == "Gemm" and n.name.startswith("/lm_head/"))
    assert head.input[1] == HEAD_ALIAS
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] == "wte.weight"]
    assert len(gathers) == 1
    assert not any("wte.weight" in n.input for n in model.graph.node if n.op_type != "Gather")


def test_an_untied_head_keeps_its_own_weight(tmp_path, tiny_weights):
    w = dict(tiny_weights, **{"lm_head.weight": tiny_weights["wte.weight"] + 1.0})
    model = build_decoder_graph(TINY, w, "fp32", external_data=tmp_path / EXTERNAL_DATA_FILE)
    names = {t.name for t in model.graph.initializer}
    assert "lm_head.weight" in names and HEAD_ALIAS not in names


def test_new_storage_gives_the_old_formats_logits(exports, old_dir):
    """Export -> load -> the same logits as the weights inside model.onnx (the format before version 3),
    in fp32; int8 stays within its stated accuracy of fp32 (tests/test_int8.py states it on gpt2)."""
    old = _logits(old_dir)
    new = _logits(exports["fp32"])
    assert np.abs(new - old).max() <= 1e-5
    int8 = _logits(exports["int8"])
    assert np.isfinite(int8).all() and np.abs(int8 - old).max() <= 0.25 * old.std()


def test_old_format_directory_still_loads_and_is_re_exported_by_the_caches(old_dir, exports):
    art = load_artifact(old_dir)
    assert art.manifest["external_data_file"] is None
    assert not io.is_current_export(old_dir) and io.is_current_export(exports["fp32"])
    params = SamplingParams.greedy(8)
    with Generator.from_pretrained(old_dir, threads=1) as old, Generator.from_pretrained(exports["fp32"], threads=1) as new:
        assert old.generate("Hello world", params).token_ids == new.generate("Hello world", params).token_ids


def test_missing_or_truncated_external_data_says_what_to_re_run(tmp_path, exports):
    d = tmp_path / "broken"
    shutil.copytree(exports["fp32"], d)
    data = d / EXTERNAL_DATA_FILE
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    with pytest.raises(ArtifactError, match="re-run `gpt2-engine export`"):
        Generator.from_pretrained(d, threads=1, prepacked=False)  # (the pre-packed model holds its own copy)
    data.unlink()
    with pytest.raises(ArtifactError, match=f"incomplete: {EXTERNAL_DATA_FILE} is missing; re-run `gpt2-engine export`"):
        load_artifact(d)


# ---- ONNX Runtime's pre-packed model --------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_prepacked_model_is_saved_with_the_export_and_used(exports, precision):
    art = load_artifact(exports[precision])
    packed = find_prepacked(art)
    assert packed is not None and packed.parent == art.path / PREPACKED_DIR
    meta = json.loads(packed.with_suffix(".json").read_text())
    assert meta["key"]["onnx_sha256"] == art.manifest["onnx_sha256"] and meta["key"]["precision"] == precision
    be = OrtBackend(art, threads=1)
    try:
        assert be.model_file == packed
    finally:
        be.close()
    plain = OrtBackend(art, threads=1, prepacked=False)
    try:
        assert plain.model_file == art.model_path
    finally:
        plain.close()
    # The same graph and the same packed weights: the same logits.
    assert np.abs(_logits(art.path) - _logits(art.path, prepacked=False)).max() <= 1e-6


def test_prepacked_model_for_another_runtime_cpu_or_export_is_ignored(tmp_path, exports):
    d = tmp_path / "stale"
    shutil.copytree(exports["fp32"], d)
    packed = find_prepacked(load_artifact(d))
    meta_path = packed.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    for field, value in (("onnxruntime", "0.0.1"), ("cpu", {"machine": "riscv64", "flags": []}),
                         ("onnx_sha256", {io.MODEL_FILE: "0" * 64})):
        stale = dict(meta, key=dict(meta["key"], **{field: value}))
        meta_path.write_text(json.dumps(stale))
        assert find_prepacked(load_artifact(d)) is None, field
        be = OrtBackend(load_artifact(d), threads=1)
        try:
            assert be.model_file == d / io.MODEL_FILE
        finally:
            be.close()
    meta_path.write_text(json.dumps(meta))
    assert find_prepacked(load_artifact(d)) == packed


def test_a_corrupt_prepacked_model_falls_back_to_model_onnx(tmp_path, exports):
    d = tmp_path / "corrupt"
    shutil.copytree(exports["fp32"], d)
    packed = find_prepacked(load_artifact(d))
    data = packed.with_name(packed.name + ".data")
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 3)
    with pytest.warns(RuntimeWarning, match="loaded model.onnx instead"):
        be = OrtBackend(load_artifact(d), threads=1)
    try:
        assert be.model_file == d / io.MODEL_FILE
    finally:
        be.close()
    with pytest.warns(RuntimeWarning):
        assert np.abs(_logits(d) - _logits(exports["fp32"], prepacked=False)).max() <= 1e-6
    packed.with_suffix(".json").unlink()                # no json (a crashed write): not even tried
    assert find_prepacked(load_artifact(d)) is None


def test_a_replaced_or_damaged_model_onnx_is_not_hidden_by_the_prepacked_model(tmp_path, exports):
    d = tmp_path / "replaced"
    shutil.copytree(exports["fp32"], d)
    with open(d / io.MODEL_FILE, "r+b") as f:
        f.truncate(1000)
    assert find_prepacked(load_artifact(d)) is None    # its sources' sizes changed: stale
    with pytest.raises(ArtifactError, match="truncated or corrupt"):
        OrtBackend(load_artifact(d), threads=1)


def test_export_without_prepack_has_no_prepacked_model_and_fp16_refuses_it(tmp_path, tiny_checkpoint):
    plain = export_model(str(tiny_checkpoint), tmp_path / "plain", show_progress=False)  # the default
    assert not (plain / PREPACKED_DIR).exists()
    assert find_prepacked(load_artifact(plain)) is None
    with pytest.raises(EngineError, match="--prepack is for"):
        export_model(str(tiny_checkpoint), tmp_path / "fp16", precision="fp16", show_progress=False, prepack=True)
    assert not (tmp_path / "fp16").exists()


# ---- the slot pool's memory ----------------------------------------------------------------------

def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_lazy_zeros_commit_memory_only_where_written():
    a = lazy_zeros((8, 12, 1024, 64), np.float32)                    # 25 MB, a gpt2 layer's 8-row key pool
    assert a.shape == (8, 12, 1024, 64) and a.dtype == np.float32 and a.flags.writeable and a.flags.c_contiguous
    before = _rss_anon()
    a[0, :, :2] = 1.0                     # one row, two positions per head: what one short prompt writes
    grown = _rss_anon() - before
    # 12 heads x one 4 KB page each; huge pages would commit 2 MB per head range (>= 4 MB here).
    assert grown < 1_000_000, grown
    assert a[0, :, :2].sum() == 12 * 2 * 64 and not a[1:].any() and not a[0, :, 2:].any()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_lazy_zeros_committed_up_front_is_resident_and_zero():
    """A server's warm-up (EngineCore.warm_up): the whole pool resident before the first forward, so no
    forward under load faults fresh rows in."""
    before = _rss_anon()
    a = lazy_zeros((8, 12, 1024, 64), np.float32, commit=True)       # 25 MB
    grown = _rss_anon() - before
    assert grown >= 0.9 * a.nbytes, grown
    assert a.shape == (8, 12, 1024, 64) and a.flags.writeable and not a.any()


def test_engine_warm_up_commits_the_pool_once_and_changes_no_output(exports):
    cold = Generator.from_pretrained(exports["fp32"], threads=1, max_batch=2, prefix_caching=False)
    warm = Generator.from_pretrained(exports["fp32"], threads=1, max_batch=2, prefix_caching=False)
    try:
        warm.warm_up()
        pool = warm.core._cache
        assert pool is not None and pool.row0_huge and pool.batch == 3     # max_batch + the scratch row
        warm.warm_up()
        assert warm.core._cache is pool                                  # once
        params = SamplingParams(max_new_tokens=6, temperature=0.0)
        assert warm.generate(IDS[0, :5].tolist(), params).token_ids == cold.generate(IDS[0, :5].tolist(), params).token_ids
    finally:
        cold.close()
        warm.close()


def test_cache_is_zeroed_views_share_memory_and_rows_copy(exports):
    be = OrtBackend(load_artifact(exports["fp32"]), threads=1)
    try:
        cache = be.new_cache(3, 16)
        assert all(not a.any() for a in cache.arrays)
        view = be.view(cache, 1, 2)
        be.forward(view, IDS[:, :3], np.zeros(1, np.int64), np.array([[2]]))
        assert cache.arrays[0][1, :, :3].any() and not cache.arrays[0][0].any()  # written in place, row 1 only
        be.copy_row(cache, 1, 2, 3)
        assert np.array_equal(cache.arrays[0][2], cache.arrays[0][1])
        assert not cache.row0_huge                                  # one row at a time so far: 4 KB pages
        be.forward(be.view(cache, 0, 1), IDS[:, :3], np.zeros(1, np.int64), np.array([[2]]))
        before = [a.copy() for a in cache.arrays]
        be.forward(be.view(cache, 0, 2), IDS[:, 3:4].repeat(2, 0), np.full(2, 3, np.int64), np.zeros((2, 1), np.int64))
        assert cache.row0_huge                       # rows share the pool: row 0 moved onto huge pages, once
        for a, b in zip(cache.arrays, before):       # ... with its contents: only position 3 was written
            assert np.array_equal(a[:2, :, :3], b[:2, :, :3]) and a[:2, :, 3].any()
    finally:
        be.close()


# ---- a loaded model's RSS (fresh process) --------------------------------------------------------------

_RSS_PROBE = r"""
import json, sys, psutil
import onnxruntime, tokenizers  # the libraries' own pages are not the model's
from engine import Generator, SamplingParams
from benchmarks.memory import weight_bytes, weight_files
p = psutil.Process(); before = p.memory_info().rss
gen = Generator.from_pretrained(sys.argv[1], threads=2)
gen.generate("Hello world", SamplingParams.greedy(4))
print(json.dumps({"added": p.memory_info().rss - before, "weights": weight_bytes(weight_files(sys.argv[1]))}))
"""


def test_a_loaded_gpt2_holds_its_weights_about_once(zoo):
    """gpt2 fp32 (498 MB of weights): RSS added by load + one short generate (after the libraries are
    imported), measured 1.97x the weight bytes with the weights inside model.onnx (the protobuf's copy
    and the packed one), ~1.05x now (the packed weights + the tokenizer)."""
    art = zoo.artifact(Case("gpt2", 0), "fp32")
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(art)], capture_output=True, text=True, cwd=REPO,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["added"] / got["weights"] <= 1.25, got


# ---- the harness's figures -------------------------------------------------------------------------

def test_weight_files_and_page_cache_read(exports, tiny_checkpoint):
    from benchmarks.memory import page_cache_read_s, weight_bytes, weight_files
    files = weight_files(exports["fp32"])
    assert [f.name for f in files] == [io.MODEL_FILE, EXTERNAL_DATA_FILE]
    assert weight_bytes(files) == sum(f.stat().st_size for f in files)
    assert [f.name for f in weight_files(tiny_checkpoint)] == ["model.safetensors"]
    assert page_cache_read_s(files, repeats=2) > 0


def test_records_carry_rss_over_weights_and_load_over_read(tmp_path_factory):
    from benchmarks import gates, models, peers
    from benchmarks.harness import Plan, measure_runner
    from benchmarks.models import ModelSpec, prepare_model
    from benchmarks.records import BenchRecord
    from benchmarks.runners import engine_spec
    from benchmarks.tables import add_ratios, memory_load_table

    model = prepare_model(ModelSpec("tiny", "random", TINY, seed=0, init_range=0.1), tmp_path_factory.mktemp("work"))
    prompt = models.shipped_tokenizer().encode(gates.VALIDATION_TEXT, add_special_tokens=False).ids
    reference = peers.hf_reference(model.checkpoint_dir, prompt, gates.VALIDATION_NEW_TOKENS, threads=1)
    plan = Plan(batches=(1,), prompt_lens=(8,), new_tokens=(4,), peers=(), threads=1, repeats=1, warmup=0,
                positions=())
    recs = measure_runner(engine_spec("ort", model, 1), model, plan, reference, prompt)
    assert [r.status for r in recs] == ["ok"]
    r = recs[0]
    e = r.extra
    assert e["weight_bytes"] == sum(f.stat().st_size for f in
                                    (model.artifact("fp32") / n for n in (io.MODEL_FILE, EXTERNAL_DATA_FILE)))
    assert e["weight_read_s"] > 0 and e["rss_after_load_mb"] >= e["rss_baseline_mb"] > 0
    assert e["loaded_model_file"] == io.MODEL_FILE  # the bench's export has no pre-packed model
    add_ratios(recs)
    assert r.ratios["rss_x_weights"] == pytest.approx(
        (e["rss_after_load_mb"] - e["rss_baseline_mb"]) * 1e6 / e["weight_bytes"], abs=1e-3)
    assert r.ratios["load_x_read"] == pytest.approx(r.load_s / e["weight_read_s"], rel=1e-2)
    again = BenchRecord.from_json(r.to_json())                      # stored with the record
    assert again.ratios == r.ratios and again.extra["weight_bytes"] == e["weight_bytes"]
    table = memory_load_table(recs)
    assert "| engine-ort | tiny | fp32 |" in table and "RSS / weights" in table and "load / read" in table
