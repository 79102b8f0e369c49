"""Activation, neuron-wise, fan-out, gated and low-precision forms beyond the standard suite, and tiny BERT.

What is pinned, with its tolerance:
* every form of tests/builders_ffn.py, before and after pruning, equals a float64 numpy forward pass
  of the weights the matcher read (recognised φ, folded affine steps, sliced biases): 2e-5 relative
  + 2e-5 absolute in float32, 1e-2 in float16 (its unit roundoff 4.9e-4 times the ~20 terms summed);
* the certified bound holds: on inputs with ‖x‖ ≤ β no consumer pre-activation moves by more;
* fp16 and bf16 initializers keep their type;
* every declined form gives its exact reason;
* tiny BERT (three GELU forms): 2 FFN chains, keep 1.0 bit-exact, pruned runs at any batch/length.
"""

from __future__ import annotations

import build_tiny_bert
import builders_ffn
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import CHAIN_FORMS, Built, model, weights
from builders_ffn import D, Graph, K, N, ffn
from onnx import TensorProto, helper, numpy_helper

import onnxcoreset
from onnxcoreset import bounds, coreset
from onnxcoreset.chains import find_chains
from onnxcoreset.io import from_proto
from onnxcoreset.neurons import read_layer

FFN_FORMS = sorted(name for name, builder in CHAIN_FORMS.items() if builder.__module__ == builders_ffn.__name__)
FLOAT32_FORMS = [f for f in FFN_FORMS if not f.startswith("fp16")]


def run(model_proto: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def initializer_types(model_proto: onnx.ModelProto) -> dict[str, int]:
    return {t.name: t.data_type for t in model_proto.graph.initializer}


def numpy_forward(model_proto: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    """The single chain's consumers' outputs in float64, from the weights the matcher reads, plus their biases."""
    loaded = from_proto(model_proto)
    (chain,), _ = find_chains(loaded.model.graph, loaded.store)
    layer = read_layer(chain, loaded.store)
    values = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model_proto.graph.initializer}
    graph = model_proto.graph
    outputs, row = [], 0
    for consumer in chain.consumers:
        node = graph.node[consumer.node]
        rows = loaded.store.shape(consumer.weight.tensor)[1 - consumer.weight.neuron_axis]
        value = layer.output(x.astype(np.float64))[:, row : row + rows]
        row += rows
        if node.op_type == "Gemm" and len(node.input) > 2:
            value = value + values[node.input[2]]
        adds = [n for n in graph.node if n.op_type == "Add" and node.output[0] in n.input]
        if adds:
            value = value + values[next(i for i in adds[0].input if i != node.output[0])]
        outputs.append(value)
    return outputs


def _tolerance(built: Built) -> float:
    return 1e-2 if built.notes.get("dtype") == "float16" else 2e-5


@pytest.mark.parametrize("form", FFN_FORMS)
def test_recognised_layer_reproduces_the_graph(form, rng):
    """The activation, folded steps and biases the matcher read compute what onnxruntime computes."""
    built = CHAIN_FORMS[form](rng)
    pruned, report = onnxcoreset.prune(built.model, keep=0.5, seed=1)
    assert report.layers[0].neurons_after == N // 2
    x = next(iter(built.feed.values()))
    tolerance = _tolerance(built)
    for proto in (built.model, pruned):
        for got, want in zip(run(proto, built.feed), numpy_forward(proto, x)):
            np.testing.assert_allclose(got.astype(np.float64), want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("form", FLOAT32_FORMS)
def test_certified_bound_holds_on_the_ball(form, rng):
    """No consumer pre-activation moves by more than the certified bound for any ‖x‖ ≤ β."""
    built = CHAIN_FORMS[form](rng)
    beta = 2.0
    directions = rng.standard_normal((256, D))
    x = (directions / np.linalg.norm(directions, axis=1, keepdims=True) * beta * rng.uniform(0, 1, (256, 1)) ** 0.1)
    feed = {"x": x.astype(np.float32)}
    for method in ("coreset", "percentile"):
        pruned, report = onnxcoreset.prune(built.model, keep=0.5, method=method, beta=beta, seed=5)
        bound = report.layers[0].certified_bound
        moved = max(float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in zip(run(pruned, feed), run(built.model, feed)))
        assert moved <= bound * (1 + 1e-5) + 1e-5, (method, moved, bound)
        assert 0 < moved  # half the neurons were dropped: something must move


@pytest.mark.parametrize("form", [f for f in FFN_FORMS if f.startswith(("fp16", "bf16"))])
def test_low_precision_initializers_keep_their_type(form, rng):
    built = CHAIN_FORMS[form](rng)
    pruned, _ = onnxcoreset.prune(built.model, keep=0.5, seed=2)
    before, after = initializer_types(built.model), initializer_types(pruned)
    assert after == before
    expected = TensorProto.FLOAT16 if built.notes["dtype"] == "float16" else TensorProto.BFLOAT16
    assert after["W1"] == after["W2"] == expected
    shapes = {t.name: list(t.dims) for t in pruned.graph.initializer}
    assert N // 2 in shapes["W1"] and shapes["W2"][0] == N // 2
    onnx.checker.check_model(pruned, full_check=True)


def test_bf16_cast_views_are_resized_in_declared_shapes(rng):
    """Shapes declared for the Cast/Transpose outputs of bf16 weights shrink with them (else the checker fails)."""
    built = CHAIN_FORMS["bf16_cast_transposed_weights_gelu"](rng)
    inferred = onnx.shape_inference.infer_shapes(built.model, strict_mode=True)
    assert len(inferred.graph.value_info) > 5
    pruned, _ = onnxcoreset.prune(inferred, keep=0.5, seed=2)
    onnx.checker.check_model(pruned, full_check=True)
    declared = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim] for v in pruned.graph.value_info}
    assert declared["cast_0"] == [N // 2, D] and declared["transpose_1"] == [D, N // 2] and declared["cast_10"] == [N // 2, K]
    assert declared["cast_3"] == [N // 2] and declared["erf_6"] == ["batch", N // 2]
    run(pruned, built.feed)


# ---- fan-out ---------------------------------------------------------------------------------


def test_fanout_sensitivity_is_the_max_over_every_consumer(rng):
    """s(j) = max over both consumers' weights of |w_i(j)| · sup|φ_j|, written out by hand."""
    built = CHAIN_FORMS["fanout_two_consumers"](rng)
    values = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in built.model.graph.initializer}
    # Make neuron 3's largest outgoing weight live in the second consumer only.
    values["W3"][:, 3] = [9.0, -11.0, 0.5]
    proto = onnx.ModelProto()
    proto.CopyFrom(built.model)
    for tensor in proto.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(values[tensor.name].astype(np.float32), tensor.name))
    _, report = onnxcoreset.prune(proto, keep=0.5, beta=1.5)
    w1, b1 = values["W1"].astype(np.float32).astype(np.float64), values["b1"].astype(np.float32).astype(np.float64)
    sup = np.maximum(b1 + 1.5 * np.linalg.norm(w1, axis=0), 0.0)  # relu on [b − β‖w‖, b + β‖w‖]
    outgoing = np.maximum(np.abs(values["W2"]).max(axis=1), np.abs(values["W3"]).max(axis=0))
    assert outgoing[3] == 11.0
    np.testing.assert_allclose(report.layers[0].sensitivity_total, float(np.sum(outgoing * sup)), rtol=1e-9)


def test_fanout_consumers_are_sliced_alike(rng):
    built = CHAIN_FORMS["fanout_two_consumers"](rng)
    original = {t.name: numpy_helper.to_array(t) for t in built.model.graph.initializer}
    loaded = from_proto(built.model)
    (chain,), _ = find_chains(loaded.model.graph, loaded.store)
    layer = read_layer(chain, loaded.store)
    sup = bounds.activation_sup(layer, 1.0)
    selection = coreset.select(
        "coreset", sensitivity=coreset.sensitivities(layer.out_weights, sup),
        point_norms=np.linalg.norm(layer.points, axis=1), target=8, rng=np.random.default_rng([0, 0]),
    )
    pruned, _ = onnxcoreset.prune(built.model, keep=0.5, seed=0)
    after = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    kept, scale = selection.kept, selection.scale
    np.testing.assert_array_equal(after["W1"], original["W1"][:, kept])
    np.testing.assert_allclose(after["W2"], original["W2"][kept] * scale[:, None], rtol=1e-6)
    np.testing.assert_allclose(after["W3"], original["W3"][:, kept] * scale[None, :], rtol=1e-6)


# ---- gated FFNs --------------------------------------------------------------------------------


def test_gated_chain_slices_gate_up_and_down_together(rng):
    built = CHAIN_FORMS["gated_geglu_biases"](rng)
    report = onnxcoreset.inspect(built.model)
    (chain,) = report.chains
    assert chain.activation == "gelu*up" and chain.steps == ("gelu*up", "gate") and chain.consumers == ("down",)
    assert chain.params == 2 * (D * N + N) + N * K
    assert [s.name for s in report.skipped] == ["down"]  # the up projection is part of the chain, not skipped
    pruned, _ = onnxcoreset.prune(built.model, neurons=5, seed=0)
    shapes = {t.name: tuple(t.dims) for t in pruned.graph.initializer}
    assert shapes == {"W_gate": (D, 5), "W_gate_bias": (5,), "W_up": (D, 5), "W_up_bias": (5,), "W_down": (5, K)}


def test_gated_sensitivity_bounds_the_product_of_both_factors(rng):
    """sup|φ(g·x)·(u·x)| ≤ sup|φ| on the gate interval × (β‖u_j‖ + |c_j|): checked on the numpy layer."""
    built = CHAIN_FORMS["gated_geglu_biases"](rng)
    loaded = from_proto(built.model)
    (chain,), _ = find_chains(loaded.model.graph, loaded.store)
    layer = read_layer(chain, loaded.store)
    beta = 1.0
    sup = bounds.activation_sup(layer, beta)
    gate = layer.activation.sup_abs(beta * np.linalg.norm(layer.weights.astype(np.float64), axis=1), layer.bias)
    up = beta * np.linalg.norm(layer.multiplier_weights, axis=1) + np.abs(layer.multiplier_bias)
    assert np.all(sup <= gate * up * (1 + 1e-9))
    x = rng.standard_normal((20000, D))
    x *= beta / np.linalg.norm(x, axis=1, keepdims=True)
    assert np.all(np.abs(layer.hidden(x)).max(axis=0) <= sup)


def _gated_variant(rng: np.random.Generator, up_input: str = "x", activation: bool = True) -> onnx.ModelProto:
    g = Graph()
    g.const("W_gate", weights(rng, D, N))
    g.const("W_up", weights(rng, D, N))
    g.const("W_down", weights(rng, N, K))
    gate = g.node("MatMul", ["x", "W_gate"])
    if activation:
        gate = g.node("Gelu", [gate])
    source = "x" if up_input == "x" else g.node("Relu", ["x"])
    product = g.node("Mul", [gate, g.node("MatMul", [source, "W_up"])])
    g.nodes.append(helper.make_node("MatMul", [product, "W_down"], ["y"], name="down"))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", D])]
    return model(g.nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", K])], g.inits, opset=20)


def test_gated_product_with_another_input_is_declined(rng):
    report = onnxcoreset.inspect(_gated_variant(rng, up_input="relu"))
    assert report.chains == ()
    reasons = {s.name: s.reason for s in report.skipped}
    assert reasons["matmul_0"] == (
        "mul_4 (Mul) multiplies the hidden tensor by the run-time tensor 'matmul_3', which is not a projection "
        "of the same input 'x' with 16 neurons: not the gated-FFN form act(x·Wg) ⊙ (x·Wu)"
    )


def test_bilinear_product_without_activation_is_declined(rng):
    reasons = {s.name: s.reason for s in onnxcoreset.inspect(_gated_variant(rng, activation=False)).skipped}
    assert reasons["matmul_0"] == (
        "mul_2 (Mul) multiplies the hidden tensor by the run-time tensor 'matmul_1', and neither factor has "
        "an activation: not the gated-FFN form act(x·Wg) ⊙ (x·Wu)"
    )


# ---- declined forms, with their exact reasons ------------------------------------------------


def _reason(built_model: onnx.ModelProto, producer: str) -> str:
    report = onnxcoreset.inspect(built_model)
    assert report.chains == ()
    return {s.name: s.reason for s in report.skipped}[producer]


def test_constant_divided_by_hidden_is_declined(rng):
    built = ffn(rng, lambda g, h: g.node("Div", [g.const("c", np.ones(N)), g.node("Relu", [h])]), "relu")
    assert _reason(built.model, "matmul_0") == "div_3 divides a constant by the hidden tensor, which is not neuron-wise affine"


def test_batchnorm_on_3d_hidden_is_declined(rng):
    g = Graph()
    g.const("W1", weights(rng, D, N))
    h = g.node("MatMul", ["x", "W1"])
    params = [g.const(n, v) for n, v in (("s", np.ones(N)), ("t", np.zeros(N)), ("mu", np.zeros(N)), ("var", np.ones(N)))]
    bn = g.node("BatchNormalization", [h] + params)
    g.const("W2", weights(rng, N, K))
    g.nodes.append(helper.make_node("MatMul", [g.node("Relu", [bn]), "W2"], ["y"], name="fc2"))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", N, D])]
    built = model(g.nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", N, K])], g.inits)
    assert _reason(built, "matmul_0") == (
        "batchnormalization_1: BatchNormalization normalises axis 1, which is the feature axis only for 2-D tensors"
    )


@pytest.mark.parametrize(
    ("shape", "text"),
    [((N, 1), "has shape [16, 1], not one value per neuron (16)"), ((2, N), "has shape [2, 16], not one value per neuron (16)")],
)
def test_wrongly_shaped_constant_is_declined(rng, shape, text):
    g = Graph()
    g.const("W1", weights(rng, D, N))
    scaled = g.node("Mul", [g.node("MatMul", ["x", "W1"]), g.const("c", np.ones(shape))])
    g.const("W2", weights(rng, N, K))
    g.nodes.append(helper.make_node("MatMul", [g.node("Relu", [scaled]), "W2"], ["y"], name="fc2"))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [shape[0], D])]
    built = model(g.nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [shape[0], K])], g.inits)
    assert _reason(built, "matmul_0") == f"Mul constant 'c' {text}"


def test_per_feature_constant_read_twice_is_declined(rng):
    def middle(g: Graph, h: str) -> str:
        c = g.const("c", np.ones(N))
        return g.node("Mul", [g.node("Relu", [g.node("Add", [h, c])]), c])

    assert _reason(ffn(rng, middle, "relu").model, "matmul_0") == "Add constant 'c' is also read by another node"


def test_two_activations_are_declined(rng):
    built = ffn(rng, lambda g, h: g.node("Tanh", [g.node("Relu", [h])]), "relu")
    assert _reason(built.model, "matmul_0") == "two activations between producer and consumer (relu_2, tanh_3)"


def test_negative_threshold_is_declined(rng):
    built = ffn(rng, lambda g, h: g.node("ThresholdedRelu", [h], alpha=-0.5), "thresholded_relu")
    assert _reason(built.model, "matmul_0") == "thresholdedrelu_2: ThresholdedRelu with a negative alpha is not supported"


def test_unrecognised_subgraph_is_declined(rng):
    """The paper's soft clipping, log((1+e^{αx})/(1+e^{α(x−1)}))/α, is not a registry function."""

    def soft_clipping(g: Graph, h: str) -> str:
        upper = g.node("Softplus", [g.node("Mul", [h, g.const("a", 4.0)])])
        lower = g.node("Softplus", [g.node("Mul", [g.node("Sub", [h, g.const("one", 1.0)]), g.const("a2", 4.0)])])
        return g.node("Div", [g.node("Sub", [upper, lower]), g.const("a3", 4.0)])

    built = ffn(rng, soft_clipping, "none")
    assert _reason(built.model, "matmul_0") == (
        "tensor 'add_1' is read by mul_2 (Mul), sub_4 (Sub), which is not a neuron-wise op between layers"
    )


def test_fanout_to_a_non_consumer_is_declined(rng):
    g = Graph()
    g.const("W1", weights(rng, D, N))
    g.const("W2", weights(rng, N, K))
    hidden = g.node("Relu", [g.node("MatMul", ["x", "W1"])])
    g.nodes.append(helper.make_node("MatMul", [hidden, "W2"], ["y"], name="fc2"))
    g.nodes.append(helper.make_node("ReduceSum", [hidden], ["z"], name="total", keepdims=0))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", D])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", K]), helper.make_tensor_value_info("z", TensorProto.FLOAT, [])]
    built = model(g.nodes, inputs, outputs, g.inits)
    assert _reason(built, "matmul_0") == "tensor 'relu_1' is read by total (ReduceSum), which is not a neuron-wise op between layers"


# ---- tiny BERT ---------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=build_tiny_bert.GELU_FORMS)
def tiny_bert(request) -> onnx.ModelProto:
    return build_tiny_bert.build(request.param)


def _tokens(rng: np.random.Generator, batch: int, length: int) -> dict[str, np.ndarray]:
    mask = np.ones((batch, length), dtype=np.int64)
    mask[0, length - 1 :] = 0  # some padding
    return {"input_ids": rng.integers(0, 1000, (batch, length)), "attention_mask": mask}


def test_tiny_bert_ffn_chains_are_found(tiny_bert):
    report = onnxcoreset.inspect(tiny_bert)
    assert [(c.name, c.activation, c.hidden_size) for c in report.chains] == [
        ("layer0.intermediate/MatMul", "gelu", 128),
        ("layer1.intermediate/MatMul", "gelu", 128),
    ]
    reasons = {s.name: s.reason for s in report.skipped}
    assert len(reasons) == 10
    for layer in ("layer0", "layer1"):
        for projection in ("query", "key", "value"):
            assert reasons[f"{layer}.attention.{projection}/MatMul"].startswith(
                f"tensor '{layer}.attention.{projection}/Add' is rearranged by {layer}.attention.{projection}/Reshape (Reshape)"
            )
        for output, residual in (("attention.output", "attention/Add_residual"), ("output", "output/Add_residual")):
            assert "(a residual connection)" in reasons[f"{layer}.{output}/MatMul"]
            assert reasons[f"{layer}.{output}/MatMul"].startswith(f"{layer}.{residual} (Add) adds the run-time tensor")


def test_tiny_bert_keep_all_changes_nothing(tiny_bert, rng):
    pruned, report = onnxcoreset.prune(tiny_bert, keep=1.0)
    assert [l.neurons_after for l in report.layers] == [128, 128]
    feed = _tokens(rng, 2, 7)
    np.testing.assert_array_equal(run(pruned, feed)[0], run(tiny_bert, feed)[0])


def test_tiny_bert_pruned_runs_with_dynamic_batch_and_length(tiny_bert, rng):
    pruned, report = onnxcoreset.prune(tiny_bert, keep=0.5, seed=0)
    assert [l.neurons_after for l in report.layers] == [64, 64]
    assert all(l.radius_certified for l in report.layers)  # the FFN input is a LayerNormalization output
    onnx.checker.check_model(pruned, full_check=True)
    for batch, length in ((2, 7), (1, 3)):
        feed = _tokens(rng, batch, length)
        (got,), (want,) = run(pruned, feed), run(tiny_bert, feed)
        assert got.shape == want.shape == (batch, length, 32)
        assert np.all(np.isfinite(got)) and not np.array_equal(got, want)
