"""Chain matching on MLP graphs: every skip reason, skipped layers left bit for bit, inspect's listing.

Each negative model below holds one would-be hidden layer that must NOT be pruned; the test
asserts the exact reason text, that ``prune`` changes no tensor of it (bit for bit), and that
the model's outputs stay bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import CHAIN_FORMS, DEEP_SIZES, constants_of, float_input, init, model, weights
from onnx import TensorProto, helper

import onnxcoreset

D, N, K = 12, 16, 5


def run(built: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(built.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def mlp_inits(rng: np.random.Generator, bias_shape: tuple[int, ...] = (N,)) -> list[TensorProto]:
    """W1 [N, D] and W2 [K, N] in Gemm(transB=1) layout, with their biases."""
    return [
        init("W1", weights(rng, D, N).T.copy()),
        init("b1", rng.standard_normal(bias_shape).astype(np.float32)),
        init("W2", weights(rng, N, K).T.copy()),
        init("b2", rng.standard_normal(K).astype(np.float32)),
    ]


def fc(inputs: list[str], output: str, name: str, **attrs) -> onnx.NodeProto:
    return helper.make_node("Gemm", inputs, [output], name=name, transB=1, **attrs)


def xfeed(rng: np.random.Generator, batch: int = 3) -> dict[str, np.ndarray]:
    return {"x": rng.standard_normal((batch, D)).astype(np.float32)}


@dataclass
class Negative:
    model: onnx.ModelProto
    feed: dict[str, np.ndarray]
    layer: str  # the producer reported as skipped
    reason: str  # the exact reason text


def hidden_is_graph_output(rng):
    nodes = [fc(["x", "W1", "b1"], "h", "fc1"), helper.make_node("Relu", ["h"], ["a"], name="relu1"), fc(["a", "W2", "b2"], "y", "fc2")]
    outputs = [float_input("y", ["batch", K]), float_input("a", ["batch", N])]
    m = model(nodes, [float_input("x", ["batch", D])], outputs, mlp_inits(rng))
    return Negative(m, xfeed(rng), "fc1", "tensor 'a' is a graph output")


def pre_activation_is_graph_output(rng):
    nodes = [fc(["x", "W1", "b1"], "h", "fc1"), helper.make_node("Relu", ["h"], ["a"], name="relu1"), fc(["a", "W2", "b2"], "y", "fc2")]
    outputs = [float_input("y", ["batch", K]), float_input("h", ["batch", N])]
    m = model(nodes, [float_input("x", ["batch", D])], outputs, mlp_inits(rng))
    return Negative(m, xfeed(rng), "fc1", "tensor 'h' is a graph output")


def hidden_read_outside_chain(rng):
    """The activation's output also feeds a ReduceSum next to the consumer."""
    nodes = [
        fc(["x", "W1", "b1"], "h", "fc1"),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        fc(["a", "W2", "b2"], "y", "fc2"),
        helper.make_node("ReduceSum", ["a"], ["total"], name="sum1", keepdims=0),
    ]
    outputs = [float_input("y", ["batch", K]), float_input("total", [])]
    m = model(nodes, [float_input("x", ["batch", D])], outputs, mlp_inits(rng))
    return Negative(m, xfeed(rng), "fc1", "tensor 'a' is read by sum1 (ReduceSum), which is not a neuron-wise op between layers")


def pre_activation_read_outside_chain(rng):
    """The pre-activation also feeds a Sigmoid whose result leaves the graph (a side output)."""
    nodes = [
        fc(["x", "W1", "b1"], "h", "fc1"),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        helper.make_node("Sigmoid", ["h"], ["side"], name="side1"),
        fc(["a", "W2", "b2"], "y", "fc2"),
    ]
    outputs = [float_input("y", ["batch", K]), float_input("side", ["batch", N])]
    m = model(nodes, [float_input("x", ["batch", D])], outputs, mlp_inits(rng))
    return Negative(m, xfeed(rng), "fc1", "tensor 'h' is read by relu1 (Relu), side1 (Sigmoid), which is not a neuron-wise op between layers")


def producer_weight_is_graph_input(rng):
    nodes = [fc(["x", "W1", "b1"], "h", "fc1"), helper.make_node("Relu", ["h"], ["a"], name="relu1"), fc(["a", "W2", "b2"], "y", "fc2")]
    inits = [t for t in mlp_inits(rng) if t.name != "W1"]
    inputs = [float_input("x", ["batch", D]), float_input("W1", [N, D])]
    m = model(nodes, inputs, [float_input("y", ["batch", K])], inits)
    feed = xfeed(rng) | {"W1": weights(rng, D, N).T.copy()}
    return Negative(m, feed, "fc1", "weight 'W1' is a graph input, not an initializer")


def weight_initializer_overridable_as_input(rng):
    """W2 is an initializer AND a graph input (IR >= 4: a default the caller may override)."""
    nodes = [fc(["x", "W1", "b1"], "h", "fc1"), helper.make_node("Relu", ["h"], ["a"], name="relu1"), fc(["a", "W2", "b2"], "y", "fc2")]
    inputs = [float_input("x", ["batch", D]), float_input("W2", [K, N])]
    m = model(nodes, inputs, [float_input("y", ["batch", K])], mlp_inits(rng))
    return Negative(m, xfeed(rng), "fc1", "weight 'W2' is a graph input, not an initializer")


def weight_shared_with_another_node(rng):
    """W1 is also read by a second Gemm on another input (tied weights)."""
    nodes = [
        fc(["x", "W1", "b1"], "h", "fc1"),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        fc(["a", "W2", "b2"], "y", "fc2"),
        helper.make_node("Gemm", ["x2", "W1"], ["z"], name="tied", transB=1),
    ]
    inputs = [float_input("x", ["batch", D]), float_input("x2", ["batch", D])]
    outputs = [float_input("y", ["batch", K]), float_input("z", ["batch", N])]
    m = model(nodes, inputs, outputs, mlp_inits(rng))
    feed = xfeed(rng) | {"x2": rng.standard_normal((3, D)).astype(np.float32)}
    return Negative(m, feed, "fc1", "weight initializer 'W1' is also read by tied")


def bias_shared_with_another_node(rng):
    """b1 is also the bias of a second Gemm: slicing it would change that layer too."""
    nodes = [
        fc(["x", "W1", "b1"], "h", "fc1"),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        fc(["a", "W2", "b2"], "y", "fc2"),
        helper.make_node("Gemm", ["x", "V", "b1"], ["z"], name="other", transB=1),
    ]
    inits = mlp_inits(rng) + [init("V", weights(rng, D, N).T.copy())]
    outputs = [float_input("y", ["batch", K]), float_input("z", ["batch", N])]
    m = model(nodes, [float_input("x", ["batch", D])], outputs, inits)
    return Negative(m, xfeed(rng), "fc1", "bias 'b1' is also read by another node")


def producer_gemm_trans_a(rng):
    nodes = [
        fc(["xt", "W1", "b1"], "h", "fc1", transA=1),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        fc(["a", "W2", "b2"], "y", "fc2"),
    ]
    m = model(nodes, [float_input("xt", [D, "batch"])], [float_input("y", ["batch", K])], mlp_inits(rng))
    return Negative(m, {"xt": rng.standard_normal((D, 3)).astype(np.float32)}, "fc1", "Gemm with transA=1 is not supported as a producer")


def consumer_gemm_trans_a(rng):
    """The consumer reads the hidden tensor transposed: its features are on the wrong axis."""
    nodes = [
        fc(["x", "W1", "b1"], "h", "fc1"),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        helper.make_node("Gemm", ["a", "V"], ["y"], name="fc2", transA=1),
    ]
    inits = mlp_inits(rng)[:2] + [init("V", weights(rng, 3, K))]
    m = model(nodes, [float_input("x", [3, D])], [float_input("y", [N, K])], inits)
    return Negative(m, xfeed(rng), "fc1", "fc2 is a Gemm with transA=1")


def integer_weights(rng):
    """An integer MatMul -> Relu -> MatMul (valid ONNX; integer weights are never pruned)."""
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        helper.make_node("MatMul", ["a", "W2"], ["y"], name="mm2"),
    ]
    inits = [init("W1", rng.integers(-3, 4, (D, N)).astype(np.int32)), init("W2", rng.integers(-3, 4, (N, K)).astype(np.int32))]
    inputs = [helper.make_tensor_value_info("x", TensorProto.INT32, ["batch", D])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.INT32, ["batch", K])]
    m = model(nodes, inputs, outputs, inits)
    feed = {"x": rng.integers(-3, 4, (3, D)).astype(np.int32)}
    return Negative(m, feed, "mm1", "weight 'W1' has integer or quantized type INT32; only float weights are pruned")


def gemm_bias_per_row(rng):
    """A Gemm bias C of shape [batch, n] (one row per sample): not one value per neuron."""
    nodes = [fc(["x", "W1", "b1"], "h", "fc1"), helper.make_node("Relu", ["h"], ["a"], name="relu1"), fc(["a", "W2", "b2"], "y", "fc2")]
    m = model(nodes, [float_input("x", [3, D])], [float_input("y", [3, K])], mlp_inits(rng, bias_shape=(3, N)))
    return Negative(m, xfeed(rng), "fc1", f"bias 'b1' has shape [3, {N}], not one value per neuron ({N})")


def matmul_add_bias_per_row(rng):
    """MatMul + Add of a [batch, n] constant: the same for the MatMul form."""
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["h"], name="add1"),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        helper.make_node("MatMul", ["a", "W2"], ["y"], name="mm2"),
    ]
    inits = [
        init("W1", weights(rng, D, N)),
        init("b1", rng.standard_normal((3, N)).astype(np.float32)),
        init("W2", weights(rng, N, K)),
    ]
    m = model(nodes, [float_input("x", [3, D])], [float_input("y", [3, K])], inits)
    return Negative(m, xfeed(rng), "mm1", f"bias 'b1' has shape [3, {N}], not one value per neuron ({N})")


def hidden_is_matmul_weight_operand(rng):
    """The hidden tensor is the right operand of a MatMul: its features are the output axis there."""
    nodes = [
        fc(["x", "W1", "b1"], "h", "fc1"),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        helper.make_node("MatMul", ["q", "a"], ["y"], name="attn"),
    ]
    inputs = [float_input("x", [3, D]), float_input("q", [2, 3])]
    m = model(nodes, inputs, [float_input("y", [2, N])], mlp_inits(rng)[:2])
    feed = xfeed(rng) | {"q": rng.standard_normal((2, 3)).astype(np.float32)}
    return Negative(m, feed, "fc1", "attn reads hidden tensor 'a' as its weight operand, not on its reduction axis")


def softmax_between(rng):
    nodes = [
        fc(["x", "W1", "b1"], "h", "fc1"),
        helper.make_node("Softmax", ["h"], ["s"], name="sm", axis=-1),
        fc(["s", "W2", "b2"], "y", "fc2"),
    ]
    m = model(nodes, [float_input("x", ["batch", D])], [float_input("y", ["batch", K])], mlp_inits(rng))
    return Negative(m, xfeed(rng), "fc1", "tensor 'h' is read by sm (Softmax), which is not a neuron-wise op between layers")


def two_activations(rng):
    nodes = [
        fc(["x", "W1", "b1"], "h", "fc1"),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        helper.make_node("Tanh", ["a"], ["t"], name="tanh1"),
        fc(["t", "W2", "b2"], "y", "fc2"),
    ]
    m = model(nodes, [float_input("x", ["batch", D])], [float_input("y", ["batch", K])], mlp_inits(rng))
    return Negative(m, xfeed(rng), "fc1", "two activations between producer and consumer (relu1, tanh1)")


def residual_add(rng):
    """h + x (a residual): the sum's features are shared with the skip path."""
    nodes = [
        fc(["x", "W1", "b1"], "h", "fc1"),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        helper.make_node("Add", ["a", "x"], ["r"], name="res1"),
        fc(["r", "W2", "b2"], "y", "fc2"),
    ]
    inits = [init("W1", weights(rng, D, D).T.copy()), init("b1", rng.standard_normal(D).astype(np.float32))]
    inits += [init("W2", weights(rng, D, K).T.copy()), init("b2", rng.standard_normal(K).astype(np.float32))]
    m = model(nodes, [float_input("x", ["batch", D])], [float_input("y", ["batch", K])], inits)
    reason = (
        "res1 (Add) adds the run-time tensor 'x' to the hidden tensor (a residual connection): the sum's features "
        "are shared with that other path, so they cannot be removed from this layer alone"
    )
    return Negative(m, xfeed(rng), "fc1", reason)


def gated_by_input_without_activation(rng):
    """h ⊙ g with g a graph input: a run-time product that is not a gated FFN."""
    nodes = [
        fc(["x", "W1", "b1"], "h", "fc1"),
        helper.make_node("Mul", ["h", "g"], ["p"], name="gate1"),
        fc(["p", "W2", "b2"], "y", "fc2"),
    ]
    inputs = [float_input("x", ["batch", D]), float_input("g", ["batch", N])]
    m = model(nodes, inputs, [float_input("y", ["batch", K])], mlp_inits(rng))
    feed = xfeed(rng) | {"g": rng.standard_normal((3, N)).astype(np.float32)}
    reason = (
        "gate1 (Mul) multiplies the hidden tensor by the run-time tensor 'g', and neither factor has an "
        "activation: not the gated-FFN form act(x·Wg) ⊙ (x·Wu)"
    )
    return Negative(m, feed, "fc1", reason)


def sub_non_constant(rng):
    """h − z with z a run-time tensor: not a neuron-wise constant."""
    nodes = [
        fc(["x", "W1", "b1"], "h", "fc1"),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        helper.make_node("Sub", ["a", "z"], ["d"], name="sub1"),
        fc(["d", "W2", "b2"], "y", "fc2"),
    ]
    inputs = [float_input("x", ["batch", D]), float_input("z", ["batch", N])]
    m = model(nodes, inputs, [float_input("y", ["batch", K])], mlp_inits(rng))
    feed = xfeed(rng) | {"z": rng.standard_normal((3, N)).astype(np.float32)}
    reason = "sub1 (Sub) combines the hidden tensor with the run-time tensor 'z', which is not a neuron-wise constant"
    return Negative(m, feed, "fc1", reason)


def dropout_mask_read(rng):
    nodes = [
        fc(["x", "W1", "b1"], "h", "fc1"),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        helper.make_node("Dropout", ["a"], ["a_drop", "mask"], name="drop1"),
        fc(["a_drop", "W2", "b2"], "y", "fc2"),
        helper.make_node("Not", ["mask"], ["dropped"], name="not1"),
    ]
    outputs = [float_input("y", ["batch", K]), helper.make_tensor_value_info("dropped", TensorProto.BOOL, ["batch", N])]
    m = model(nodes, [float_input("x", ["batch", D])], outputs, mlp_inits(rng))
    return Negative(m, xfeed(rng), "fc1", "drop1: the Dropout mask is read")


def dropout_mask_is_graph_output(rng):
    """The mask is not read by a node but leaves the graph: its shape would change."""
    nodes = [
        fc(["x", "W1", "b1"], "h", "fc1"),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        helper.make_node("Dropout", ["a"], ["a_drop", "mask"], name="drop1"),
        fc(["a_drop", "W2", "b2"], "y", "fc2"),
    ]
    outputs = [float_input("y", ["batch", K]), helper.make_tensor_value_info("mask", TensorProto.BOOL, ["batch", N])]
    m = model(nodes, [float_input("x", ["batch", D])], outputs, mlp_inits(rng))
    return Negative(m, xfeed(rng), "fc1", "drop1: the Dropout mask is read")


NEGATIVES: dict[str, Callable[[np.random.Generator], Negative]] = {
    f.__name__: f
    for f in [
        hidden_is_graph_output,
        pre_activation_is_graph_output,
        hidden_read_outside_chain,
        pre_activation_read_outside_chain,
        producer_weight_is_graph_input,
        weight_initializer_overridable_as_input,
        weight_shared_with_another_node,
        bias_shared_with_another_node,
        producer_gemm_trans_a,
        consumer_gemm_trans_a,
        integer_weights,
        gemm_bias_per_row,
        matmul_add_bias_per_row,
        hidden_is_matmul_weight_operand,
        softmax_between,
        two_activations,
        residual_add,
        gated_by_input_without_activation,
        sub_non_constant,
        dropout_mask_read,
        dropout_mask_is_graph_output,
    ]
}


@pytest.fixture(params=sorted(NEGATIVES))
def negative(request, rng) -> Negative:
    return NEGATIVES[request.param](rng)


def test_skip_reason_is_reported(negative):
    report = onnxcoreset.inspect(negative.model)
    assert report.chains == ()
    reasons = {s.name: s.reason for s in report.skipped}
    assert reasons.get(negative.layer) == negative.reason, reasons


def test_skipped_layer_is_left_bit_for_bit(negative):
    pruned, report = onnxcoreset.prune(negative.model, keep=0.5)
    assert report.layers == ()
    assert report.params_after == report.params_before
    assert negative.reason in [s.reason for s in report.skipped]
    before, after = constants_of(negative.model), constants_of(pruned)
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert after[name].dtype == value.dtype and after[name].tobytes() == value.tobytes(), name
    assert [n.SerializeToString() for n in pruned.graph.node] == [n.SerializeToString() for n in negative.model.graph.node]
    for a, b in zip(run(negative.model, negative.feed), run(pruned, negative.feed), strict=True):
        np.testing.assert_array_equal(a, b)


def test_pruned_and_skipped_layers_side_by_side(rng):
    """Two independent MLP branches: branch A is pruned, branch B (hidden tensor also a graph output)
    is skipped; B's tensors and B's outputs stay bit for bit while A shrinks."""
    nodes = [
        fc(["x", "WA1", "bA1"], "hA", "fcA1"),
        helper.make_node("Relu", ["hA"], ["aA"], name="reluA"),
        fc(["aA", "WA2", "bA2"], "yA", "fcA2"),
        fc(["x", "WB1", "bB1"], "hB", "fcB1"),
        helper.make_node("Relu", ["hB"], ["aB"], name="reluB"),
        fc(["aB", "WB2", "bB2"], "yB", "fcB2"),
    ]
    inits = []
    for branch in "AB":
        inits += [
            init(f"W{branch}1", weights(rng, D, N).T.copy()),
            init(f"b{branch}1", rng.standard_normal(N).astype(np.float32)),
            init(f"W{branch}2", weights(rng, N, K).T.copy()),
            init(f"b{branch}2", rng.standard_normal(K).astype(np.float32)),
        ]
    outputs = [float_input("yA", ["batch", K]), float_input("yB", ["batch", K]), float_input("aB", ["batch", N])]
    m = model(nodes, [float_input("x", ["batch", D])], outputs, inits)
    pruned, report = onnxcoreset.prune(m, keep=0.5, seed=1)
    assert [(l.name, l.neurons_before, l.neurons_after) for l in report.layers] == [("fcA1", N, N // 2)]
    assert ("fcB1", "tensor 'aB' is a graph output") in [(s.name, s.reason) for s in report.skipped]
    before, after = constants_of(m), constants_of(pruned)
    for name in ("WB1", "bB1", "WB2", "bB2"):
        assert after[name].tobytes() == before[name].tobytes()
    assert after["WA1"].shape == (N // 2, D) and after["WA2"].shape == (K, N // 2)
    feed = xfeed(rng)
    (_, yB, aB), (_, yB_pruned, aB_pruned) = run(m, feed), run(pruned, feed)
    np.testing.assert_array_equal(yB_pruned, yB)
    np.testing.assert_array_equal(aB_pruned, aB)


def test_inspect_lists_producer_activation_consumer_size_and_params(rng):
    built = CHAIN_FORMS["mlp_fan_out_two_consumers"](rng)
    report = onnxcoreset.inspect(built.model)
    (chain,) = report.chains
    assert (chain.name, chain.producer, chain.activation, chain.consumers, chain.hidden_size) == (
        "fc1", "Gemm", "relu", ("head1", "head2"), N,
    )
    # W1 [16, 12] + b1 [16] + U1 [16, 5] + U2 [3, 16]: every tensor the chain slices
    assert chain.params == N * D + N + N * 5 + 3 * N


def test_deep_mlp_layers_are_planned_on_already_rewritten_weights(rng):
    """Percentile keeps the largest ‖[w_j; b_j]‖. For the second and third layers the rows must be the
    ones already sliced by the layer before (the paper's order), not the original rows."""
    built = CHAIN_FORMS["mlp_deep_3_chains"](rng)
    original = constants_of(built.model)
    pruned, report = onnxcoreset.prune(built.model, keep=0.5, method="percentile")
    assert [l.name for l in report.layers] == ["fc0", "fc1", "fc2"]
    previous: np.ndarray | None = None
    differs = []
    for index, layer in enumerate(report.layers):
        w = original[f"W{index}"].astype(np.float64)
        b = original[f"b{index}"].astype(np.float64)
        rows = w if previous is None else w[:, previous]
        target = int(np.floor(0.5 * DEEP_SIZES[index + 1] + 0.5))
        norms = np.linalg.norm(np.hstack([rows, b[:, None]]), axis=1)
        expected = np.sort(np.argsort(-norms, kind="stable")[:target])
        np.testing.assert_array_equal(layer.kept, expected)
        naive = np.sort(np.argsort(-np.linalg.norm(np.hstack([w, b[:, None]]), axis=1), kind="stable")[:target])
        differs.append(not np.array_equal(naive, expected))
        previous = expected
    assert any(differs[1:]), "the test data must tell rewritten rows from original rows apart"
    assert [tuple(constants_of(pruned)[f"W{i}"].shape) for i in range(4)] == [(15, 20), (12, 15), (6, 12), (5, 6)]
