"""Large models at the cost of reading and writing them: in-place reading of single-file weights,
streamed writing, blockwise float64 reductions, the interval certificate of large layers, and the
benchmark tools' model generator. Every result is compared with the straightforward computation.
"""

from __future__ import annotations

import io as pyio
import math
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcoreset import bounds, io, pipeline, protowire, radii
from onnxcoreset.activations import make
from onnxcoreset.blockwise import all_finite, column_abs_max, float64_blocks, row_norms
from onnxcoreset.errors import ModelError
from onnxcoreset.neurons import HiddenLayer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import gen_big_models as gen

BIG = io.IN_PLACE_MIN_BYTES // 4  # float32 elements at the in-place threshold


def ffn(rng: np.random.Generator, d: int = 16, h: int = BIG // 16, blocks: int = 2, residual: bool = True) -> onnx.ModelProto:
    """MatMul+Add → Relu → MatMul+Add blocks (with a residual Add), weights over the in-place threshold."""
    nodes, inits, x = [], [], "input"
    for b in range(blocks):
        w1, w2 = rng.standard_normal((d, h)).astype(np.float32), rng.standard_normal((h, d)).astype(np.float32)
        inits += [numpy_helper.from_array(w1 / 4, f"w1_{b}"), numpy_helper.from_array(rng.standard_normal(h).astype(np.float32), f"b1_{b}"),
                  numpy_helper.from_array(w2 / 64, f"w2_{b}"), numpy_helper.from_array(rng.standard_normal(d).astype(np.float32), f"b2_{b}")]
        nodes += [helper.make_node("MatMul", [x, f"w1_{b}"], [f"m1_{b}"]), helper.make_node("Add", [f"m1_{b}", f"b1_{b}"], [f"a1_{b}"]),
                  helper.make_node("Relu", [f"a1_{b}"], [f"r_{b}"]), helper.make_node("MatMul", [f"r_{b}", f"w2_{b}"], [f"m2_{b}"]),
                  helper.make_node("Add", [f"m2_{b}", f"b2_{b}"], [f"a2_{b}"])]
        out = "output" if b == blocks - 1 else f"x_{b + 1}"
        nodes.append(helper.make_node("Add", [x, f"a2_{b}"] if residual else [f"a2_{b}", f"a2_{b}"], [out]))
        x = out
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", d])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", d])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def outputs(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


# --- protowire ---------------------------------------------------------------------------------


def test_strip_and_splice_reproduce_the_model_exactly(rng):
    model = ffn(rng)
    model.graph.node.insert(0, helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones(BIG, np.float32))))
    data = model.SerializeToString()
    stripped, spans = protowire.strip_initializer_data(data, io.IN_PLACE_MIN_BYTES)
    # w1, w2 of both blocks (64 KiB each: at the threshold) are stripped; biases and the Constant stay
    assert [s.index for s in spans] == [0, 2, 4, 6]
    parsed = onnx.ModelProto()
    parsed.ParseFromString(stripped)
    for span in spans:
        original = model.graph.initializer[span.index]
        assert data[span.offset : span.offset + span.length] == original.raw_data
        assert not parsed.graph.initializer[span.index].HasField("raw_data")
    expected = onnx.ModelProto()
    expected.CopyFrom(model)
    for span in spans:
        expected.graph.initializer[span.index].ClearField("raw_data")
    assert parsed.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)
    out = pyio.BytesIO()
    chunks = {s.index: (s.length, lambda s=s: [data[s.offset : s.offset + s.length // 3], data[s.offset + s.length // 3 : s.offset + s.length]])
              for s in spans}
    protowire.write_with_initializer_data(out, parsed.SerializeToString(), chunks)
    again = onnx.ModelProto()
    again.ParseFromString(out.getvalue())
    assert again.SerializeToString(deterministic=True) == model.SerializeToString(deterministic=True)


@pytest.mark.parametrize("data", [b"\x3b\x00", b"\x3a\x05ab", b"\x08\xff\xff", b""])
def test_unusual_wire_bytes_are_refused(data):
    """A group, a length past the end, a truncated varint, no graph: WireError, never a wrong answer."""
    with pytest.raises(protowire.WireError):
        protowire.strip_initializer_data(data, 1)


def test_splice_counts_the_bytes_it_was_promised(rng):
    model = ffn(rng, blocks=1)
    model.graph.initializer[0].ClearField("raw_data")
    with pytest.raises(protowire.WireError, match="written"):
        protowire.write_with_initializer_data(pyio.BytesIO(), model.SerializeToString(), {0: (10, lambda: [b"abc"])})


# --- single-file models read in place and written streamed ---------------------------------------


def test_single_file_weights_are_read_in_place(tmp_path, rng):
    model = ffn(rng)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    loaded = io.load(path)
    assert loaded.in_place == {"w1_0", "w2_0", "w1_1", "w2_1"}
    assert not loaded.has_external_data and loaded.input_files() == [path]
    for tensor in model.graph.initializer:
        value = loaded.store.read(tensor.name)
        np.testing.assert_array_equal(value, numpy_helper.to_array(tensor))
        assert isinstance(value, np.memmap) == (tensor.name in loaded.in_place)
    pruned, _ = pipeline.prune(str(path), keep=0.5)  # the in-memory result holds its weights inline
    assert not any(t.data_location == TensorProto.EXTERNAL for t in pruned.graph.initializer)
    x = rng.standard_normal((2, 16)).astype(np.float32)
    sess = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"input": x})[0].shape == (2, 16)


def test_in_place_and_plain_loading_write_identical_models(tmp_path, rng, monkeypatch):
    source = tmp_path / "m.onnx"
    onnx.save(ffn(rng), str(source))
    config = pipeline.PruneConfig(keep=0.5)
    fast = pipeline.prune_file(source, tmp_path / "fast.onnx", config, validate=False)
    monkeypatch.setattr(io, "_parse_in_place", lambda path: None)
    plain = pipeline.prune_file(source, tmp_path / "plain.onnx", config, validate=False)
    assert [(l.neurons_after, l.certified_bound) for l in fast.layers] == [(l.neurons_after, l.certified_bound) for l in plain.layers]
    a, b = onnx.load(str(tmp_path / "fast.onnx")), onnx.load(str(tmp_path / "plain.onnx"))
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fast.onnx", "m.onnx", "plain.onnx"]  # single files in, single out
    onnx.checker.check_model(str(tmp_path / "fast.onnx"), full_check=True)


def test_a_lying_single_file_tensor_gets_the_usual_error(tmp_path, rng):
    model = ffn(rng, blocks=1)
    model.graph.initializer[0].dims[1] -= 1  # raw_data now longer than the shape says
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelError, match="declares shape"):
        io.load(path)


def test_streamed_single_file_output_keeps_untouched_large_weights(tmp_path, rng):
    """An initializer no chain changes is copied from the input file, byte for byte."""
    model = ffn(rng, blocks=1)
    model.graph.initializer.append(numpy_helper.from_array(rng.standard_normal(BIG).astype(np.float32), "spare"))
    source = tmp_path / "m.onnx"
    onnx.save(model, str(source))
    pipeline.prune_file(source, tmp_path / "out.onnx", pipeline.PruneConfig(keep=0.5), validate=False)
    written = {t.name: t for t in onnx.load(str(tmp_path / "out.onnx")).graph.initializer}
    assert written["spare"].raw_data == model.graph.initializer[-1].raw_data
    assert list(written["w1_0"].dims) == [16, BIG // 16 // 2]


def test_external_output_holds_its_weights_once(tmp_path, rng):
    """The weights go to the data file only: the model file stays small (no inline copy)."""
    source = tmp_path / "m.onnx"
    onnx.save(ffn(rng), str(source), save_as_external_data=True, location="m.onnx.data", size_threshold=1024)
    pipeline.prune_file(source, tmp_path / "out.onnx", pipeline.PruneConfig(keep=0.5), validate=False)
    assert (tmp_path / "out.onnx").stat().st_size < 20_000
    pruned = onnx.load(str(tmp_path / "out.onnx"), load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in pruned.graph.initializer if t.name.startswith("w"))
    x = rng.standard_normal((3, 16)).astype(np.float32)
    assert outputs(tmp_path / "out.onnx", x).shape == (3, 16)
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)


# --- blockwise reductions ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 5), (700, 1100), (1, 9), (9, 1), (0, 4)])
@pytest.mark.parametrize("layout", ["C", "F", "T"])
def test_blockwise_reductions_match_numpy(shape, layout, rng):
    base = rng.standard_normal(shape).astype(np.float32)
    matrix = {"C": base, "F": np.asfortranarray(base), "T": np.ascontiguousarray(base.T).T}[layout]
    exact = matrix.astype(np.float64)
    np.testing.assert_allclose(row_norms(matrix), np.linalg.norm(exact, axis=1), rtol=1e-13)
    if shape[0]:
        np.testing.assert_array_equal(column_abs_max(matrix), np.abs(exact).max(axis=0))
    assert all_finite(matrix)
    covered = np.zeros(shape)
    for rows, cols, block in float64_blocks(matrix):
        covered[rows, cols] += 1
        np.testing.assert_array_equal(block, exact[rows, cols])
    assert np.all(covered == 1)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_entries_show(bad, rng):
    matrix = rng.standard_normal((300, 2000)).astype(np.float32)
    matrix[299, 1999] = bad
    assert not all_finite(matrix) and not all_finite(matrix.T)
    assert not np.isfinite(row_norms(matrix)[299]) and not np.isfinite(column_abs_max(matrix)[1999])


# --- the certificate of large layers -----------------------------------------------------------


def _layer(rng, n=40, d=7, k=5, activation="gelu") -> HiddenLayer:
    return HiddenLayer(rng.standard_normal((n, d)), rng.standard_normal(n), make(activation), rng.uniform(0.5, 2, n),
                       rng.standard_normal(n) * 0.1, rng.standard_normal((k, n)))


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
def test_interval_certificate_is_the_sign_split_bound(activation, rng):
    layer = _layer(rng, activation=activation)
    kept = np.sort(rng.choice(layer.size, 25, replace=False))
    scale = rng.uniform(0.5, 3.0, kept.size)
    coef = bounds.coefficients(layer.out_weights, kept, layer.out_weights[:, kept] * scale)
    low, high = bounds.neuron_range(layer, 1.3)
    plus, minus = np.clip(coef, 0, None), np.clip(coef, None, 0)
    sign_split = np.maximum(np.abs(plus @ high + minus @ low), np.abs(plus @ low + minus @ high))
    triangle = np.abs(coef) @ np.maximum(np.abs(low), np.abs(high))
    want = float(np.max(sign_split + bounds.ROUNDING_SLACK * triangle))
    got = bounds.interval_certificate(layer, kept, scale, 1.3)
    assert got == pytest.approx(want, rel=1e-12)
    assert got >= bounds.certify(layer, coef, 1.3).bound * (1 - 1e-12)  # never tighter than the full certificate
    assert bounds.interval_certificate(layer, np.arange(layer.size), np.ones(layer.size), 1.3) == 0.0


def test_large_and_small_paths_keep_the_same_neurons(tmp_path, rng, monkeypatch):
    """Float32 views with blockwise float64 math choose exactly what float64 copies choose.

    Only the first chain is comparable: the large path bounds a hidden output's radius by the norm
    of the sups alone, so later chains see a larger (still sound) radius."""
    source = tmp_path / "m.onnx"
    onnx.save(ffn(rng, d=16, h=96, blocks=2), str(source))
    config = pipeline.PruneConfig(keep=0.5)
    small = pipeline.prune(str(source), config)[1]
    monkeypatch.setattr(pipeline, "FULL_CERTIFICATE_MAX_ENTRIES", 0)
    large = pipeline.prune(str(source), config)[1]
    a, b = small.layers[0], large.layers[0]
    assert (a.radius, a.neurons_after, a.draws, a.sensitivity_total) == (b.radius, b.neurons_after, b.draws, b.sensitivity_total)
    assert b.certified_bound >= a.certified_bound * (1 - 1e-12)
    assert large.layers[1].radius >= small.layers[1].radius


def test_shared_radius_cache_changes_no_radius(tmp_path, rng, monkeypatch):
    """Propagated radii remembered across chains are the radii recomputed chain by chain."""
    source = tmp_path / "m.onnx"
    onnx.save(ffn(rng, d=12, h=40, blocks=3), str(source))
    config = pipeline.PruneConfig(keep=0.5)
    cached = pipeline.prune(str(source), config)[1]
    original = radii.chain_radius
    monkeypatch.setattr(radii, "chain_radius", lambda *args: original(*args[:6]))  # drop the cache argument
    fresh = pipeline.prune(str(source), config)[1]
    assert len(cached.layers) == 3
    assert [(l.radius, l.certified_bound) for l in cached.layers] == [(l.radius, l.certified_bound) for l in fresh.layers]


# --- the benchmark tools -----------------------------------------------------------------------


def test_generated_benchmark_models_are_valid(tmp_path):
    for spec in (gen.ModelSpec("t_vgg", "vgg_head", 64, 32, 1, external=False, classes=10),
                 gen.ModelSpec("t_ffn", "ffn_stack", 16, 64, 3, external=True)):
        path = gen.generate(spec, tmp_path)
        assert sum(p.stat().st_size for p in gen.files_of(path)) >= spec.nbytes
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))
        assert model.ir_version == 10 and model.opset_import[0].version == 17
        assert sum(math.prod(t.dims) for t in model.graph.initializer) == spec.params
        assert gen.generate(spec, tmp_path) == path  # reused, not rewritten
    assert gen.SPECS["ffn_4096x6"].nbytes == pytest.approx(3.22e9, rel=1e-3)
    assert gen.SPECS["vgg16_head"].nbytes == pytest.approx(494.6e6, rel=1e-3)


@pytest.mark.slow
def test_bench_speed_quick_runs(tmp_path):
    import subprocess

    tools = Path(__file__).resolve().parent.parent / "tools"
    done = subprocess.run([sys.executable, str(tools / "bench_speed.py"), "--quick", "--tools", "ours,floor",
                           "--work", str(tmp_path), "--results", str(tmp_path / "r.md")], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "quick_ffn_512x8" in (tmp_path / "r.md").read_text()
