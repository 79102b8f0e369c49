"""Applying a plan to a graph: sliced/rescaled tensors, declared shapes, metadata, external data.

Tolerances: slicing with unit scales is bit-exact; merging duplicated neurons is exact up to
float32 rounding of the doubled weights (1e-6 relative); the pruned-versus-original error is
checked only through a property (it shrinks as more neurons are kept).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import CHAIN_FORMS, constants_of, float_input, init, model, weights
from onnx import TensorProto, helper, numpy_helper

import onnxcoreset
from onnxcoreset import surgery
from onnxcoreset.chains import find_chains
from onnxcoreset.coreset import Selection
from onnxcoreset.io import from_proto
from onnxcoreset.pipeline import PruneConfig, prune_file


def run(built: onnx.ModelProto | str, feed: dict) -> list[np.ndarray]:
    source = built if isinstance(built, str) else built.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feed)


def declared(built: onnx.ModelProto) -> dict[str, list]:
    """Every declared tensor shape: dim_value as int, dim_param as str."""
    infos = list(built.graph.input) + list(built.graph.value_info) + list(built.graph.output)
    return {
        i.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in i.type.tensor_type.shape.dim]
        for i in infos
    }


def test_value_info_follows_the_new_sizes_and_keeps_dynamic_dims(rng):
    """A [batch, seq, d] FFN: the hidden tensors' last axis shrinks 16 -> 8; 'batch' and 'seq' stay symbolic."""
    built = CHAIN_FORMS["mlp_matmul_3d_input"](rng)
    before = declared(built.model)
    assert before["a"] == ["batch", "seq", 16]
    pruned, _ = onnxcoreset.prune(built.model, keep=0.5)
    after = declared(pruned)
    for name in ("m1", "h", "a"):
        assert after[name] == ["batch", "seq", 8], name
    assert after["m2"] == before["m2"] == ["batch", "seq", 5]
    assert after["x"] == before["x"] and after["y"] == before["y"]
    # what onnx infers from the pruned weights agrees with every declared shape
    stripped = onnx.ModelProto()
    stripped.CopyFrom(pruned)
    del stripped.graph.value_info[:]
    inferred = declared(onnx.shape_inference.infer_shapes(stripped, strict_mode=True))
    assert {k: inferred[k] for k in after} == after


@pytest.mark.parametrize(
    ("form", "tensor", "shape"),
    [
        ("mlp_dynamo_transpose_matmul_add", "W1_t", [12, 8]),  # the Transpose of a sliced weight
        ("mlp_dynamo_transpose_matmul_add", "W2_t", [8, 5]),
        ("mlp_dropout_mask_unused", "mask", ["batch", 8]),  # an unread Dropout mask
        ("mlp_cast_float_around_activation", "a_cast", ["batch", 8]),
        ("mlp_deep_3_chains", "a1", ["batch", 12]),
    ],
)
def test_declared_shapes_of_views_and_side_outputs_shrink(rng, form, tensor, shape):
    built = CHAIN_FORMS[form](rng)
    pruned, _ = onnxcoreset.prune(built.model, keep=0.5)
    assert declared(pruned)[tensor] == shape
    onnx.checker.check_model(pruned, full_check=True)


def test_model_properties_and_metadata_are_kept(rng):
    built = CHAIN_FORMS["mlp_ir8_opset13"](rng).model
    built.producer_name, built.producer_version, built.doc_string = "exporter", "9.9", "a model"
    built.graph.name = "mlp_graph"
    for key, value in (("author", "someone"), ("onnxcoreset.seed", "stale")):
        entry = built.metadata_props.add()
        entry.key, entry.value = key, value
    pruned, _ = onnxcoreset.prune(built, keep=0.5, seed=11, method="uniform")
    assert (pruned.ir_version, pruned.producer_name, pruned.producer_version, pruned.doc_string, pruned.graph.name) == (
        8, "exporter", "9.9", "a model", "mlp_graph",
    )
    assert [(o.domain, o.version) for o in pruned.opset_import] == [("", 13)]
    assert list(pruned.graph.input) == list(built.graph.input)
    assert list(pruned.graph.output) == list(built.graph.output)
    metadata = {p.key: p.value for p in pruned.metadata_props}
    assert metadata["author"] == "someone"
    assert [p.key for p in pruned.metadata_props].count("onnxcoreset.seed") == 1
    assert metadata["onnxcoreset.seed"] == "11"
    assert metadata["onnxcoreset.method"] == "uniform"
    assert metadata["onnxcoreset.keep"] == "0.5"
    assert metadata["onnxcoreset.version"] == onnxcoreset.__version__
    assert onnxcoreset.inspect(pruned).metadata == {k: v for k, v in metadata.items() if k.startswith("onnxcoreset.")}


def loaded_chain(built: onnx.ModelProto):
    loaded = from_proto(built)
    chains, _ = find_chains(loaded.model.graph, loaded.store)
    (chain,) = chains
    return loaded, chain


def test_apply_slices_rows_and_rescales_consumer_columns_exactly(rng):
    built = CHAIN_FORMS["gemm_transB1_relu"](rng).model
    original = constants_of(built)
    loaded, chain = loaded_chain(built)
    kept, scale = np.array([1, 4, 5, 11]), np.array([0.5, 2.0, 1.25, 3.0])
    surgery.apply(chain, Selection(kept, scale), loaded.store)
    assert set(loaded.store.replaced) == {"W1", "b1", "W2"}
    np.testing.assert_array_equal(loaded.store.read("W1"), original["W1"][kept])
    np.testing.assert_array_equal(loaded.store.read("b1"), original["b1"][kept])
    expected = (original["W2"][:, kept].astype(np.float64) * scale).astype(np.float32)  # one rounding
    np.testing.assert_array_equal(loaded.store.read("W2"), expected)
    assert loaded.store.read("W2").dtype == np.float32


def test_identity_selection_changes_no_bit(rng):
    built = CHAIN_FORMS["mlp_gemm_alpha_beta"](rng).model
    loaded, chain = loaded_chain(built)
    surgery.apply(chain, Selection(np.arange(chain.size), np.ones(chain.size)), loaded.store)
    for name, value in constants_of(built).items():
        assert np.asarray(loaded.store.read(name)).tobytes() == value.tobytes()


def test_merging_duplicated_neurons_is_exact(rng):
    """Neurons 8..15 duplicate 0..7 (same incoming row and bias): keeping 0..7 with scale 2 is the same
    function when the outgoing columns are duplicated too."""
    d, half, k = 10, 8, 4
    w = weights(rng, d, half).T
    u = weights(rng, half, k).T
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        helper.make_node("Gemm", ["a", "W2", "b2"], ["y"], name="fc2", transB=1),
    ]
    b = rng.standard_normal(half).astype(np.float32)
    inits = [
        init("W1", np.vstack([w, w])),
        init("b1", np.concatenate([b, b])),
        init("W2", np.hstack([u, u])),
        init("b2", rng.standard_normal(k).astype(np.float32)),
    ]
    built = model(nodes, [float_input("x", ["batch", d])], [float_input("y", ["batch", k])], inits)
    loaded, chain = loaded_chain(built)
    surgery.apply(chain, Selection(np.arange(half), np.full(half, 2.0)), loaded.store)
    surgery.resize_shapes(loaded.model.graph, chain, half, loaded.store)
    loaded.store.materialize()
    onnx.checker.check_model(loaded.model, full_check=True)
    feed = {"x": rng.standard_normal((6, d)).astype(np.float32)}
    np.testing.assert_allclose(run(loaded.model, feed)[0], run(built, feed)[0], rtol=1e-6, atol=1e-6)


def test_error_shrinks_as_more_neurons_are_kept(rng):
    """Mean over 12 seeds of the largest output deviation, at keep 0.25 > 0.5 > 0.9 > 1.0 == 0 (exact)."""
    d, n, k = 16, 96, 4
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        helper.make_node("Gemm", ["a", "W2", "b2"], ["y"], name="fc2", transB=1),
    ]
    inits = [
        init("W1", weights(rng, d, n).T.copy()),
        init("b1", (0.1 * rng.standard_normal(n)).astype(np.float32)),
        init("W2", weights(rng, n, k).T.copy()),
        init("b2", np.zeros(k, np.float32)),
    ]
    built = model(nodes, [float_input("x", ["batch", d])], [float_input("y", ["batch", k])], inits)
    x = rng.standard_normal((64, d))
    feed = {"x": (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)}  # on the β=1 sphere
    (reference,) = run(built, feed)
    errors = []
    for keep in (0.25, 0.5, 0.9, 1.0):
        deviations = []
        for seed in range(12):
            pruned, _ = onnxcoreset.prune(built, keep=keep, seed=seed)
            deviations.append(np.abs(run(pruned, feed)[0] - reference).max())
        errors.append(float(np.mean(deviations)))
    assert errors[0] > errors[1] > errors[2] > errors[3] == 0.0, errors


# ---- external data ----


def external_mlp(folder: Path, rng: np.random.Generator) -> tuple[Path, dict]:
    """A 64-96-10 MLP saved with every tensor in 'weights.bin' beside the model."""
    d, n, k = 64, 96, 10
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        helper.make_node("Gemm", ["a", "W2", "b2"], ["y"], name="fc2", transB=1),
    ]
    inits = [
        init("W1", weights(rng, d, n).T.copy()),
        init("b1", rng.standard_normal(n).astype(np.float32)),
        init("W2", weights(rng, n, k).T.copy()),
        init("b2", rng.standard_normal(k).astype(np.float32)),
    ]
    built = model(nodes, [float_input("x", ["batch", d])], [float_input("y", ["batch", k])], inits)
    path = folder / "mlp.onnx"
    onnx.save_model(built, path, save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    return path, {"x": rng.standard_normal((4, d)).astype(np.float32)}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def external_locations(path: Path) -> set[str]:
    proto = onnx.load(str(path), load_external_data=False)
    return {
        entry.value
        for tensor in proto.graph.initializer
        if tensor.data_location == TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }


def test_external_data_in_external_data_out(tmp_path, rng):
    source_dir, out_dir = tmp_path / "in", tmp_path / "out"
    source_dir.mkdir(), out_dir.mkdir()
    source, feed = external_mlp(source_dir, rng)
    hashes = {p.name: digest(p) for p in source_dir.iterdir()}
    target = out_dir / "small.onnx"
    report = prune_file(source, target, PruneConfig(keep=0.5), device="cpu", probes=8)
    assert report.validation is not None and report.validation.ok
    assert sorted(p.name for p in out_dir.iterdir()) == ["small.onnx", "small.onnx.data"]
    assert external_locations(target) == {"small.onnx.data"}  # nothing points back at weights.bin
    assert b"weights.bin" not in target.read_bytes()
    assert {p.name: digest(p) for p in source_dir.iterdir()} == hashes  # the input is untouched
    onnx.checker.check_model(str(target), full_check=True)
    pruned = onnx.load(str(target))
    assert numpy_helper.to_array(next(t for t in pruned.graph.initializer if t.name == "W1")).shape == (48, 64)
    # the external file holds the pruned weights: the model runs from its path and matches the in-memory prune
    in_memory, _ = onnxcoreset.prune(source, keep=0.5)
    np.testing.assert_array_equal(run(str(target), feed)[0], run(in_memory, feed)[0])


def test_external_data_output_is_byte_identical_across_runs(tmp_path, rng):
    source, _ = external_mlp(tmp_path, rng)
    outputs = []
    for attempt in ("a", "b"):
        folder = tmp_path / attempt
        folder.mkdir()
        prune_file(source, folder / "out.onnx", PruneConfig(keep=0.5, seed=4), validate=False)
        outputs.append({p.name: p.read_bytes() for p in folder.iterdir()})
    assert outputs[0] == outputs[1]
    assert set(outputs[0]) == {"out.onnx", "out.onnx.data"}
