"""Random valid graphs (hypothesis): every one must prune into a valid, exact-where-promised model.

A generated graph is an MLP of 1 to 3 hidden layers with random widths; each layer's producer is
Gemm (transB 0 or 1, with or without bias) or MatMul (+ Add bias), followed by optional neuron-wise
ops (BatchNormalization, or a per-neuron Mul or Div, before the activation; Identity, Dropout or
Cast after it; then a per-neuron Add or Sub) and one of the registry's single-op activations
(PRelu with a per-neuron slope and Clip with constant bounds included). For each graph:

* inspect finds one prunable chain per hidden layer;
* keep-all (--keep 1) is exact: every initializer and every output bit for bit;
* a real prune passes onnx.checker (full), loads in onnxruntime, shrinks every hidden layer;
* every pruned weight equals, bit for bit, the original sliced and rescaled in numpy by the plan
  the model records (kept indices and scales per chain), and nothing else changed;
* onnxruntime's outputs equal onnx's reference evaluator on those weights within 1e-5 relative
  + 1e-5 absolute (float32 accumulation order differs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from builders import float_input, init, model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxcoreset
from onnxcoreset.validate import PLAN_KEY, decode_plan

PRODUCERS = ("gemm_transB1", "gemm_transB0", "gemm_no_bias", "matmul_add", "matmul_add_bias_first", "matmul")
ACTIVATIONS = {
    "PRelu": {},  # its slope is a per-neuron initializer, sliced with the neurons
    "Clip": {},  # ReLU6: min and max as scalar initializer inputs
    "Relu": {},
    "Tanh": {},
    "Sigmoid": {},
    "Softsign": {},
    "Softplus": {},
    "LeakyRelu": {"alpha": 0.1},
    "Elu": {"alpha": 0.7},
    "Selu": {},
    "HardSigmoid": {"alpha": 0.25, "beta": 0.5},
}


@dataclass(frozen=True)
class Layer:
    width: int
    producer: str
    activation: str
    scale_before: str | None  # BatchNormalization, or a per-neuron Mul or Div, between producer and activation
    pass_through: str | None  # Identity, Dropout or Cast after the activation
    shift_after: str | None  # a per-neuron Add or Sub after the activation


layers_strategy = st.lists(
    st.builds(
        Layer,
        width=st.integers(2, 12),
        producer=st.sampled_from(PRODUCERS),
        activation=st.sampled_from(sorted(ACTIVATIONS)),
        scale_before=st.sampled_from([None, "Mul", "Div", "BatchNormalization"]),
        pass_through=st.sampled_from([None, "Identity", "Dropout", "Cast"]),
        shift_after=st.sampled_from([None, "Add", "Sub"]),
    ),
    min_size=1,
    max_size=3,
)


def _dense(nodes, inits, rng, source: str, d: int, n: int, form: str, tag: str) -> str:
    """Append one affine layer x[.., d] -> [.., n] in the given producer form; return its output name."""
    w = (rng.standard_normal((d, n)) / np.sqrt(d)).astype(np.float32)
    b = (0.2 * rng.standard_normal(n)).astype(np.float32)
    out = f"{tag}_out"
    if form.startswith("gemm"):
        transposed = form == "gemm_transB1"
        inits.append(init(f"{tag}_W", w.T.copy() if transposed else w))
        inputs = [source, f"{tag}_W"] + ([] if form == "gemm_no_bias" else [f"{tag}_b"])
        if form != "gemm_no_bias":
            inits.append(init(f"{tag}_b", b))
        nodes.append(helper.make_node("Gemm", inputs, [out], name=tag, transB=int(transposed)))
        return out
    inits.append(init(f"{tag}_W", w))
    if form == "matmul":
        nodes.append(helper.make_node("MatMul", [source, f"{tag}_W"], [out], name=tag))
        return out
    inits.append(init(f"{tag}_b", b))
    nodes.append(helper.make_node("MatMul", [source, f"{tag}_W"], [f"{tag}_mm"], name=tag))
    operands = [f"{tag}_b", f"{tag}_mm"] if form == "matmul_add_bias_first" else [f"{tag}_mm", f"{tag}_b"]
    nodes.append(helper.make_node("Add", operands, [out], name=f"{tag}_bias"))
    return out


def build(layers: list[Layer], d: int, k: int, last: str, seed: int) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    current, width = "x", d
    for i, layer in enumerate(layers):
        current = _dense(nodes, inits, rng, current, width, layer.width, layer.producer, f"fc{i}")
        if layer.scale_before == "BatchNormalization":
            for part, values in (("scale", rng.uniform(0.5, 1.5, layer.width)), ("shift", 0.1 * rng.standard_normal(layer.width)),
                                 ("mean", 0.1 * rng.standard_normal(layer.width)), ("var", rng.uniform(0.5, 2.0, layer.width))):
                inits.append(init(f"bn{i}_{part}", values.astype(np.float32)))
            nodes.append(helper.make_node("BatchNormalization", [current] + [f"bn{i}_{p}" for p in ("scale", "shift", "mean", "var")],
                                          [f"scaled{i}"], name=f"bn{i}"))
            current = f"scaled{i}"
        elif layer.scale_before:
            inits.append(init(f"s{i}", rng.uniform(0.5, 1.5, layer.width).astype(np.float32)))
            nodes.append(helper.make_node(layer.scale_before, [current, f"s{i}"], [f"scaled{i}"], name=f"scale{i}"))
            current = f"scaled{i}"
        extra = []
        if layer.activation == "PRelu":
            inits.append(init(f"slope{i}", rng.uniform(0.01, 0.3, layer.width).astype(np.float32)))
            extra = [f"slope{i}"]
        elif layer.activation == "Clip":
            inits += [init(f"lo{i}", np.array(0.0, np.float32)), init(f"hi{i}", np.array(6.0, np.float32))]
            extra = [f"lo{i}", f"hi{i}"]
        nodes.append(helper.make_node(layer.activation, [current, *extra], [f"act{i}"], name=f"act{i}", **ACTIVATIONS[layer.activation]))
        current = f"act{i}"
        if layer.pass_through:
            cast = {"to": onnx.TensorProto.FLOAT} if layer.pass_through == "Cast" else {}
            nodes.append(helper.make_node(layer.pass_through, [current], [f"pass{i}"], name=f"pass{i}", **cast))
            current = f"pass{i}"
        if layer.shift_after:
            inits.append(init(f"t{i}", (0.1 * rng.standard_normal(layer.width)).astype(np.float32)))
            nodes.append(helper.make_node(layer.shift_after, [current, f"t{i}"], [f"shifted{i}"], name=f"shift{i}"))
            current = f"shifted{i}"
        width = layer.width
    out = _dense(nodes, inits, rng, current, width, k, last, "head")
    nodes.append(helper.make_node("Identity", [out], ["y"], name="output"))
    return model(nodes, [float_input("x", ["batch", d])], [float_input("y", ["batch", k])], inits)


PER_NEURON = ("fc{i}_b", "s{i}", "t{i}", "slope{i}", "bn{i}_scale", "bn{i}_shift", "bn{i}_mean", "bn{i}_var")


def replay_plan(original: onnx.ModelProto, layers: list[Layer], last: str, plan: dict) -> dict[str, np.ndarray]:
    """The original weights sliced and rescaled in numpy by the recorded plan, layer by layer.

    Hidden layer i keeps K_i with scales σ_i: its producer's outputs, its per-neuron constants and
    the next layer's inputs are indexed by K_i, and those inputs are multiplied by σ_i (in float64,
    rounded once to float32, as the stored weights are).
    """
    weights = initializers(original)
    forms = [layer.producer for layer in layers] + [last]
    for i, (kept, scale) in enumerate(plan):
        producer, consumer = f"fc{i}_W", f"fc{i + 1}_W" if i + 1 < len(layers) else "head_W"
        weights[producer] = weights[producer][kept] if forms[i] == "gemm_transB1" else weights[producer][:, kept]
        for name in (p.format(i=i) for p in PER_NEURON):
            if name in weights:
                weights[name] = weights[name][kept]
        if forms[i + 1] == "gemm_transB1":  # stored [outputs, inputs]
            weights[consumer] = (weights[consumer][:, kept].astype(np.float64) * scale).astype(np.float32)
        else:
            weights[consumer] = (weights[consumer][kept].astype(np.float64) * scale[:, None]).astype(np.float32)
    return weights


def run(m: onnx.ModelProto, feed: dict) -> np.ndarray:
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def initializers(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    layers=layers_strategy,
    d=st.integers(2, 8),
    k=st.integers(1, 4),
    last=st.sampled_from(PRODUCERS),
    seed=st.integers(0, 2**16),
    keep=st.sampled_from([0.3, 0.5, 0.75]),
)
def test_generated_graph_prunes_validly_and_exactly(layers, d, k, last, seed, keep):
    original = build(layers, d, k, last, seed)
    feed = {"x": np.random.default_rng(seed + 1).standard_normal((5, d)).astype(np.float32)}
    report = onnxcoreset.inspect(original)
    assert len(report.chains) == len(layers), report.skipped

    kept_all, _ = onnxcoreset.prune(original, keep=1.0, seed=seed)
    for name, value in initializers(original).items():
        np.testing.assert_array_equal(initializers(kept_all)[name], value)
    np.testing.assert_array_equal(run(kept_all, feed), run(original, feed))

    pruned, pruned_report = onnxcoreset.prune(original, keep=keep, seed=seed)
    onnx.checker.check_model(pruned, full_check=True)
    assert [l.neurons_before for l in pruned_report.layers] == [layer.width for layer in layers]
    for layer in pruned_report.layers:
        assert 1 <= layer.neurons_after <= max(1, int(np.floor(keep * layer.neurons_before + 0.5)))
    assert pruned.ir_version == original.ir_version
    recorded = decode_plan({p.key: p.value for p in pruned.metadata_props}[PLAN_KEY])
    plan = [recorded[layer.name] for layer in pruned_report.layers]
    expected_weights = replay_plan(original, layers, last, plan)
    actual_weights = initializers(pruned)
    assert sorted(actual_weights) == sorted(expected_weights)
    for name, value in expected_weights.items():
        np.testing.assert_array_equal(actual_weights[name], value, err_msg=name)
    assert [n.op_type for n in pruned.graph.node] == [n.op_type for n in original.graph.node]
    got = run(pruned, feed)
    assert got.shape == (5, k)
    expected = ReferenceEvaluator(pruned).run(None, feed)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_generator_builds_every_producer_and_activation():
    """The strategy's building blocks all yield valid models (so a failure above is onnxcoreset's)."""
    for i, form in enumerate(PRODUCERS):
        activation = sorted(ACTIVATIONS)[i % len(ACTIVATIONS)]
        layers = [Layer(5, form, activation, ("Mul", "Div", "BatchNormalization")[i % 3], ("Dropout", "Cast", "Identity")[i % 3],
                        ("Add", "Sub")[i % 2]), Layer(3, form, "Relu", None, None, None)]
        onnx.checker.check_model(build(layers, 4, 2, form, i), full_check=True)
