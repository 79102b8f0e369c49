"""ε-driven pruning, input radii and the network-level bound, through the pipeline on small graphs.

Tolerances: radii and bounds are compared with the formulas they implement to 1e-9 relative;
soundness against onnxruntime (float32) allows the relative 1e-5 that float32 evaluation of a
few dozen terms needs, stated at each use.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import build_mlp
import onnxcoreset
from builders import CHAIN_FORMS, float_input, init, model, weights
from onnxcoreset import attack, radii
from onnxcoreset.chains import GraphView, find_chains
from onnxcoreset.errors import UsageError
from onnxcoreset.io import from_proto
from onnxcoreset.pipeline import PruneConfig, measured_radii, prune_loaded


def run(proto: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def mlp(seed: int = 0, sizes=(12, 40, 24, 5)) -> onnx.ModelProto:
    return build_mlp.build(seed, sizes)


# ---------------------------------------------------------------------------------------------
# Configuration


def test_epsilon_alone_is_a_valid_config():
    assert PruneConfig(epsilon=0.5).epsilon == 0.5
    assert PruneConfig(keep=0.5, epsilon=0.1).keep == 0.5


@pytest.mark.parametrize(
    "options, message",
    [
        ({}, "give --keep FRACTION, --neurons N.* --epsilon E"),
        ({"keep": 0.5, "neurons": 3}, "exactly one of --keep and --neurons \\(or neither, with --epsilon\\)"),
        ({"epsilon": -1.0}, "--epsilon must be a non-negative number"),
        ({"epsilon": math.inf}, "--epsilon must be a non-negative number"),
    ],
)
def test_bad_configs_say_why(options, message):
    with pytest.raises(UsageError, match=message):
        PruneConfig(**options)


# ---------------------------------------------------------------------------------------------
# ε mode


@pytest.mark.parametrize("method", ["coreset", "uniform", "percentile", "sensitivity"])
def test_epsilon_is_met_by_every_chain(method):
    _, report = onnxcoreset.prune(mlp(), epsilon=2.0, beta=3.0, method=method, seed=1)
    for layer in report.layers:
        assert layer.certified_bound <= 2.0
        assert layer.neurons_after < layer.neurons_before or "kept whole" in layer.note


@settings(max_examples=6, deadline=None, derandomize=True)
@given(seed=st.integers(0, 1000), eps=st.lists(st.floats(0.0, 20.0), min_size=2, max_size=4, unique=True))
def test_smaller_epsilon_never_keeps_fewer_neurons(seed, eps):
    """Single-chain model: the chain's weights do not depend on another chain's plan."""
    proto = build_mlp.build(seed, (10, 48, 4))
    counts = []
    for epsilon in sorted(eps):
        _, report = onnxcoreset.prune(proto, epsilon=epsilon, beta=2.0, seed=seed)
        (layer,) = report.layers
        assert layer.certified_bound <= epsilon
        counts.append(layer.neurons_after)
    assert counts == sorted(counts, reverse=True)


def test_first_chain_of_a_deep_mlp_is_monotone_too():
    proto = mlp(3)
    counts = [onnxcoreset.prune(proto, epsilon=e, beta=3.0)[1].layers[0].neurons_after for e in (8.0, 4.0, 2.0, 1.0, 0.5)]
    assert counts == sorted(counts)
    assert counts[0] < counts[-1]  # the range of ε really moves the count


def test_keep_is_a_cap_the_larger_count_wins():
    proto = mlp()
    loose = onnxcoreset.prune(proto, epsilon=1e6, beta=3.0)[1]
    assert [l.neurons_after for l in loose.layers] == [1, 1]  # one neuron is certified within 1e6
    capped = onnxcoreset.prune(proto, keep=0.75, epsilon=1e6, beta=3.0)[1]
    assert [l.neurons_after for l in capped.layers] == [30, 18]
    strict = onnxcoreset.prune(proto, keep=0.25, epsilon=1e-3, beta=3.0)[1]
    assert all(l.neurons_after > round(0.25 * l.neurons_before) for l in strict.layers)


def test_a_chain_that_cannot_meet_epsilon_is_left_whole_and_reported():
    pruned, report = onnxcoreset.prune(mlp(), epsilon=0.0, beta=3.0)
    for layer in report.layers:
        assert layer.neurons_after == layer.neurons_before
        assert layer.certified_bound == 0.0
        assert layer.note == "kept whole: no smaller count is certified within ε = 0"
    assert {p.key: p.value for p in pruned.metadata_props}["onnxcoreset.epsilon"] == "0.0"


# ---------------------------------------------------------------------------------------------
# Radii


def _single_chain_after(prefix_nodes, prefix_inits, d, n=16, k=5, *, input_shape=None, rng=None, opset=17, ir_version=10):
    """x -> [prefix] -> MatMul -> Add -> Relu -> MatMul -> y, the prefix ending in tensor 'pre'."""
    rng = rng or np.random.default_rng(0)
    nodes = list(prefix_nodes) + [
        helper.make_node("MatMul", ["pre", "W1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["h"], name="add1"),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        helper.make_node("MatMul", ["a", "W2"], ["y"], name="mm2"),
    ]
    inits = list(prefix_inits) + [
        init("W1", weights(rng, d, n)),
        init("b1", rng.standard_normal(n).astype(np.float32)),
        init("W2", weights(rng, n, k)),
    ]
    return model(nodes, [float_input("x", input_shape or ["batch", d])], [float_input("y", ["batch", k])], inits,
                 opset=opset, ir_version=ir_version)


def _chain_radius(proto, beta=1.0, measured=None):
    loaded = from_proto(proto)
    chains, _ = find_chains(loaded.model.graph, loaded.store)
    view = GraphView(loaded.model.graph, loaded.store)
    return radii.chain_radius(view, chains[0].producer.input, beta, {}, measured)


@pytest.mark.parametrize("op, opset, ir_version", [("LayerNormalization", 17, 10), ("RMSNormalization", 23, 11)])
def test_normalization_radius_is_gamma_and_beta_alone(rng, op, opset, ir_version):
    gamma, shift = rng.uniform(-2, 2, 8).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    with_shift = op == "LayerNormalization"  # RMSNormalization has no β
    proto = _single_chain_after(
        [helper.make_node(op, ["x", "g", "s"] if with_shift else ["x", "g"], ["pre"], name="norm", axis=-1)],
        [init("g", gamma)] + ([init("s", shift)] if with_shift else []), 8, opset=opset, ir_version=ir_version,
    )
    radius = _chain_radius(proto, beta=1000.0)
    expected = np.max(np.abs(gamma.astype(np.float64))) * math.sqrt(8) + with_shift * np.linalg.norm(shift.astype(np.float64))
    assert radius.kind == radii.CERTIFIED and radius.value == pytest.approx(expected, rel=1e-12)
    x = rng.standard_normal((2000, 8)).astype(np.float32) * 50
    pre = run(_expose(proto, "pre"), {"x": x})[-1]
    assert np.max(np.linalg.norm(pre, axis=1)) <= radius.value * (1 + 1e-6)  # float32 LayerNorm


def _expose(proto, name):
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    copy.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return copy


def test_radius_propagates_soundly_through_linear_layers_constants_activations_and_residuals(rng):
    d = 6
    prefix = [
        helper.make_node("Gemm", ["x", "G", "gb"], ["g1"], name="gemm0", transB=1),
        helper.make_node("Tanh", ["g1"], ["t1"], name="tanh0"),
        helper.make_node("Mul", ["t1", "scale"], ["s1"], name="mul0"),
        helper.make_node("Add", ["s1", "shift"], ["a1"], name="add0"),
        helper.make_node("MatMul", ["x", "P"], ["p1"], name="proj0"),
        helper.make_node("Add", ["a1", "p1"], ["pre"], name="residual0"),
    ]
    inits = [
        init("G", rng.standard_normal((d, d)).astype(np.float32)),
        init("gb", rng.standard_normal(d).astype(np.float32)),
        init("scale", rng.uniform(-2, 2, d).astype(np.float32)),
        init("shift", rng.standard_normal(d).astype(np.float32)),
        init("P", rng.standard_normal((d, d)).astype(np.float32)),
    ]
    proto = _single_chain_after(prefix, inits, d)
    beta = 2.5
    radius = _chain_radius(proto, beta)
    assert radius.kind == radii.CERTIFIED
    # tanh is bounded (√6·1 = 2.449) below its Lipschitz bound here; then ·max|scale|, +‖shift‖, + ‖P‖₂β
    exposed = _expose(proto, "pre")
    x = attack.ball_points(20000, d, beta, rng).astype(np.float32)
    pre = run(exposed, {"x": x})[-1]
    assert np.max(np.linalg.norm(pre, axis=1)) <= radius.value * (1 + 1e-5)
    scale = np.max(np.abs(onnx.numpy_helper.to_array(inits[2]).astype(np.float64)))
    shift = np.linalg.norm(onnx.numpy_helper.to_array(inits[3]).astype(np.float64))
    projection = np.linalg.norm(onnx.numpy_helper.to_array(inits[4]).astype(np.float64), 2) * beta
    assert radius.value <= math.sqrt(d) * scale + shift + projection * (1 + 1e-6)


def test_unpropagatable_radius_is_measured_on_data_or_assumed(rng, tmp_path):
    proto = _single_chain_after([helper.make_node("Softmax", ["x"], ["pre"], name="softmax0", axis=-1)], [], 7)
    assumed = _chain_radius(proto, beta=4.0)
    assert assumed.kind == radii.ASSUMED and assumed.value == 4.0 and "Softmax" in assumed.how
    x = rng.standard_normal((300, 7)).astype(np.float32) * 3
    loaded = from_proto(proto)
    path = tmp_path / "softmax.onnx"
    onnx.save(proto, path)
    measured = measured_radii(loaded, path, {"x": x}, device="cpu")
    softmax = np.exp(x - x.max(axis=1, keepdims=True))
    softmax /= softmax.sum(axis=1, keepdims=True)
    (value,) = measured.values()
    assert value == pytest.approx(np.max(np.linalg.norm(softmax, axis=1)), rel=1e-6)
    radius = _chain_radius(proto, beta=4.0, measured=measured)
    assert radius.kind == radii.MEASURED and radius.value == value


def test_hidden_radius_is_propagated_on_the_pruned_network():
    proto = mlp(1)
    loaded = from_proto(proto)
    report = prune_loaded(loaded, PruneConfig(keep=0.5, beta=3.0))
    first, second = report.layers
    assert second.radius_kind == radii.CERTIFIED and second.radius_source == f"hidden output of {first.name}"
    # sound on the pruned model: the first hidden output's norm never exceeds the second chain's radius
    pruned = onnx.ModelProto()
    pruned.CopyFrom(loaded.model)
    hidden = _expose(pruned, "relu1_out")
    x = attack.ball_points(20000, 12, 3.0, np.random.default_rng(0)).astype(np.float32)
    assert np.max(np.linalg.norm(run(hidden, {"input": x})[-1], axis=1)) <= second.radius * (1 + 1e-5)


def test_beta_from_data_is_the_largest_sample_norm(rng):
    proto = build_mlp.build(0, (4, 6, 2))
    data = {"input": rng.standard_normal((50, 4)), "unrelated": np.ones((3, 3))}
    assert radii.largest_sample_norm(proto.graph, data) == pytest.approx(np.max(np.linalg.norm(data["input"], axis=1)))
    with pytest.raises(ValueError, match="none of the model's float inputs"):
        radii.largest_sample_norm(proto.graph, {"other": np.ones((2, 4))})


# ---------------------------------------------------------------------------------------------
# Network-level bound


def test_network_bound_covers_the_end_to_end_change_of_an_mlp(rng):
    proto = mlp(2)
    pruned, report = onnxcoreset.prune(proto, keep=0.5, beta=3.0)
    assert report.network_bound is not None and set(report.network_bound) == {"logits"}
    x = attack.ball_points(20000, 12, 3.0, rng).astype(np.float32)
    change = np.abs(run(proto, {"input": x})[0].astype(np.float64) - run(pruned, {"input": x})[0])
    # float32 logits of magnitude ≤ 100 here: 1e-4 absolute covers their rounding
    assert change.max() <= report.network_bound["logits"] + 1e-4
    assert report.network_bound["logits"] >= max(l.certified_bound for l in report.layers)


def test_no_network_bound_where_chains_do_not_form_one_sequence():
    built = CHAIN_FORMS["fanout_two_consumers"](np.random.default_rng(0))
    _, report = onnxcoreset.prune(built.model, keep=0.5)
    assert report.network_bound is None and "several consumers" in report.network_note


def test_residual_branches_are_followed_once(rng):
    """25 blocks t ← t + c·t: every Add reaches t twice, so without memory the walk would take 2²⁵ steps."""
    import time

    nodes, inits, current = [], [], "x"
    scales = rng.uniform(0.1, 0.5, 25)
    for i, c in enumerate(scales):
        inits.append(init(f"c{i}", np.full(6, c, np.float32)))
        nodes += [helper.make_node("Mul", [current, f"c{i}"], [f"scaled{i}"], name=f"mul{i}"),
                  helper.make_node("Add", [current, f"scaled{i}"], [f"sum{i}"], name=f"res{i}")]
        current = f"sum{i}"
    nodes.append(helper.make_node("Identity", [current], ["pre"], name="last"))
    proto = _single_chain_after(nodes, inits, 6)
    start = time.perf_counter()
    radius = _chain_radius(proto, beta=2.0)
    # 2²⁵ steps would take hours; a minute only guards against that on a loaded machine
    assert time.perf_counter() - start < 60.0
    expected = 2.0 * np.prod(1 + scales.astype(np.float32).astype(np.float64))
    assert radius.kind == radii.CERTIFIED and radius.value == pytest.approx(expected, rel=1e-9)
