"""Tiny ONNX graphs for the tests, one builder per graph form, all in one parametrized list.

Each builder takes a seeded ``numpy.random.Generator`` and returns a :class:`Built`: the model,
its input feed for onnxruntime, and how many prunable chains it must contain. Registering a
builder with ``@chain_form("name")`` puts it through the whole standard set of tests
(tests/test_forms.py): found by inspect, keep-all exact, pruned equals a numpy forward of the
sliced weights, checker, onnxruntime, IR/opset kept.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10
OPSET = 17


@dataclass
class Built:
    model: onnx.ModelProto
    feed: dict[str, np.ndarray]
    chains: int  # prunable chains the matcher must find
    activations: tuple[str, ...] = ()  # registry names expected, in chain order (empty: not checked)
    notes: dict = field(default_factory=dict)


CHAIN_FORMS: dict[str, Callable[[np.random.Generator], Built]] = {}


def chain_form(name: str):
    """Register a builder in the standard parametrized list."""

    def register(builder: Callable[[np.random.Generator], Built]):
        if name in CHAIN_FORMS:
            raise ValueError(f"duplicate chain form '{name}'")
        CHAIN_FORMS[name] = builder
        return builder

    return register


def init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[TensorProto],
    opset: int = OPSET,
    ir_version: int = IR_VERSION,
    extra_opsets: dict[str, int] | None = None,
) -> onnx.ModelProto:
    """A checked model with an explicit IR version (onnx 1.23 would write 14, refused by onnxruntime 1.31)."""
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializers)
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    built = helper.make_model(graph, opset_imports=opsets, ir_version=ir_version, producer_name="onnxcoreset-tests")
    onnx.checker.check_model(built, full_check=True)
    return built


def float_input(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def weights(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    return (rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32)


@chain_form("gemm_transB1_relu")
def gemm_relu_mlp(rng: np.random.Generator) -> Built:
    """x[b,12] -> Gemm(transB=1) -> Relu -> Gemm(transB=1) -> y[b,5]: the PyTorch legacy form."""
    d, n, k = 12, 16, 5
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
    return Built(built, {"x": rng.standard_normal((3, d)).astype(np.float32)}, 1, ("relu",))


@chain_form("matmul_add_relu")
def matmul_add_relu(rng: np.random.Generator) -> Built:
    """x[b,12] -> MatMul -> Add(bias) -> Relu -> MatMul -> Add -> y: the tf2onnx / dynamo form."""
    d, n, k = 12, 16, 5
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["h"], name="add1"),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        helper.make_node("MatMul", ["a", "W2"], ["m2"], name="mm2"),
        helper.make_node("Add", ["m2", "b2"], ["y"], name="add2"),
    ]
    inits = [
        init("W1", weights(rng, d, n)),
        init("b1", rng.standard_normal(n).astype(np.float32)),
        init("W2", weights(rng, n, k)),
        init("b2", rng.standard_normal(k).astype(np.float32)),
    ]
    built = model(nodes, [float_input("x", ["batch", d])], [float_input("y", ["batch", k])], inits)
    return Built(built, {"x": rng.standard_normal((3, d)).astype(np.float32)}, 1, ("relu",))


# ---------------------------------------------------------------------------------------------
# MLP graph forms (Gemm/MatMul producers and consumers, pass-through ops, exporter variants).
# Every one has a numpy reference in NUMPY_REFERENCES: the forward pass of the ORIGINAL weights
# with a pruning plan (kept indices and scales per hidden layer) applied by hand, which
# tests/test_forms.py compares with onnxruntime on the pruned model.

Plan = list[tuple[np.ndarray, np.ndarray]]  # per hidden layer, in chain order: (kept, scale)


@dataclass(frozen=True)
class Dense:
    """One affine layer of a reference MLP: y = alpha·(x @ W) + beta·b, then ``activation``."""

    weight: str
    bias: str | None = None
    out_in: bool = False  # stored [out, in] (Gemm transB=1, torch Linear), else [in, out]
    alpha: float = 1.0
    beta: float = 1.0
    activation: Callable[[np.ndarray], np.ndarray] | None = None


def relu(t: np.ndarray) -> np.ndarray:
    return np.maximum(t, 0.0)


def leaky_relu(alpha: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda t: np.where(t >= 0, t, alpha * t)


def dense_forward(x: np.ndarray, layers: list[Dense], inits: dict[str, np.ndarray], plan: Plan) -> np.ndarray:
    """float64 forward of a chain of Dense layers, hidden layer i restricted to plan[i] (if given)."""
    x = np.asarray(x, np.float64)
    for index, layer in enumerate(layers):
        w = np.asarray(inits[layer.weight], np.float64)
        w = w.T if layer.out_in else w  # [in, out]
        b = np.zeros(w.shape[1]) if layer.bias is None else np.asarray(inits[layer.bias], np.float64).reshape(-1)
        b = np.broadcast_to(b, (w.shape[1],))
        if 0 < index <= len(plan):
            kept, scale = plan[index - 1]
            w = w[kept] * np.asarray(scale, np.float64)[:, None]
        if index < len(plan):
            kept, _ = plan[index]
            w, b = w[:, kept], b[kept]
        x = layer.alpha * (x @ w) + layer.beta * b
        if layer.activation is not None:
            x = layer.activation(x)
    return x


Reference = Callable[[dict[str, np.ndarray], dict[str, np.ndarray], Plan], list[np.ndarray]]
NUMPY_REFERENCES: dict[str, Reference] = {}


def mlp_reference(name: str, layers: list[Dense], input_name: str = "x") -> None:
    NUMPY_REFERENCES[name] = lambda inits, feed, plan: [dense_forward(feed[input_name], layers, inits, plan)]


def with_shapes(built: onnx.ModelProto) -> onnx.ModelProto:
    """Declare every intermediate shape in value_info (symbolic batch dims kept), as exporters do."""
    inferred = onnx.shape_inference.infer_shapes(built, strict_mode=True)
    onnx.checker.check_model(inferred, full_check=True)
    return inferred


def _mlp_inits(rng: np.random.Generator, d: int, n: int, k: int, out_in: bool, bias_shape=None) -> list[TensorProto]:
    w1, w2 = weights(rng, d, n), weights(rng, n, k)
    b1 = rng.standard_normal(n if bias_shape is None else bias_shape).astype(np.float32)
    return [
        init("W1", w1.T.copy() if out_in else w1),
        init("b1", b1),
        init("W2", w2.T.copy() if out_in else w2),
        init("b2", rng.standard_normal(k).astype(np.float32)),
    ]


def _feed(rng: np.random.Generator, *shape: int) -> dict[str, np.ndarray]:
    return {"x": rng.standard_normal(shape).astype(np.float32)}


mlp_reference("gemm_transB1_relu", [Dense("W1", "b1", True, activation=relu), Dense("W2", "b2", True)])
mlp_reference("matmul_add_relu", [Dense("W1", "b1", activation=relu), Dense("W2", "b2")])


@chain_form("mlp_gemm_transB0_relu")
def gemm_transb0(rng: np.random.Generator) -> Built:
    """Gemm(transB=0) -> Relu -> Gemm(transB=0): weights stored [in, out], as Keras/TF Dense."""
    d, n, k = 12, 16, 5
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=0),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        helper.make_node("Gemm", ["a", "W2", "b2"], ["y"], name="fc2"),
    ]
    built = model(nodes, [float_input("x", ["batch", d])], [float_input("y", ["batch", k])], _mlp_inits(rng, d, n, k, False))
    return Built(with_shapes(built), _feed(rng, 3, d), 1, ("relu",))


mlp_reference("mlp_gemm_transB0_relu", [Dense("W1", "b1", activation=relu), Dense("W2", "b2")])


@chain_form("mlp_gemm_alpha_beta")
def gemm_alpha_beta(rng: np.random.Generator) -> Built:
    """Gemm with alpha 0.7, beta 1.3 producing, Gemm with alpha 1.5, beta 0.5 consuming."""
    d, n, k = 12, 16, 5
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1, alpha=0.7, beta=1.3),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        helper.make_node("Gemm", ["a", "W2", "b2"], ["y"], name="fc2", transB=1, alpha=1.5, beta=0.5),
    ]
    built = model(nodes, [float_input("x", ["batch", d])], [float_input("y", ["batch", k])], _mlp_inits(rng, d, n, k, True))
    return Built(built, _feed(rng, 3, d), 1, ("relu",))


mlp_reference(
    "mlp_gemm_alpha_beta",
    [Dense("W1", "b1", True, 0.7, 1.3, relu), Dense("W2", "b2", True, 1.5, 0.5)],
)


@chain_form("mlp_gemm_bias_row")
def gemm_bias_row(rng: np.random.Generator) -> Built:
    """Gemm with its bias C stored as a [1, n] row (some converters write it so)."""
    d, n, k = 12, 16, 5
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        helper.make_node("Gemm", ["a", "W2", "b2"], ["y"], name="fc2", transB=1),
    ]
    inits = _mlp_inits(rng, d, n, k, True, bias_shape=(1, n))
    built = model(nodes, [float_input("x", ["batch", d])], [float_input("y", ["batch", k])], inits)
    return Built(with_shapes(built), _feed(rng, 3, d), 1, ("relu",))


mlp_reference("mlp_gemm_bias_row", [Dense("W1", "b1", True, activation=relu), Dense("W2", "b2", True)])


@chain_form("mlp_gemm_scalar_bias")
def gemm_scalar_bias(rng: np.random.Generator) -> Built:
    """Gemm whose bias C is one value [1] broadcast to every neuron: nothing to slice in it."""
    d, n, k = 12, 16, 5
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        helper.make_node("Gemm", ["a", "W2", "b2"], ["y"], name="fc2", transB=1),
    ]
    inits = _mlp_inits(rng, d, n, k, True, bias_shape=(1,))
    built = model(nodes, [float_input("x", ["batch", d])], [float_input("y", ["batch", k])], inits)
    return Built(built, _feed(rng, 3, d), 1, ("relu",))


mlp_reference("mlp_gemm_scalar_bias", [Dense("W1", "b1", True, activation=relu), Dense("W2", "b2", True)])


@chain_form("mlp_gemm_no_bias")
def gemm_no_bias(rng: np.random.Generator) -> Built:
    """Gemm without C on both sides (nn.Linear(bias=False))."""
    d, n, k = 12, 16, 5
    nodes = [
        helper.make_node("Gemm", ["x", "W1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        helper.make_node("Gemm", ["a", "W2"], ["y"], name="fc2", transB=1),
    ]
    inits = [i for i in _mlp_inits(rng, d, n, k, True) if i.name in ("W1", "W2")]
    built = model(nodes, [float_input("x", ["batch", d])], [float_input("y", ["batch", k])], inits)
    return Built(with_shapes(built), _feed(rng, 3, d), 1, ("relu",))


mlp_reference("mlp_gemm_no_bias", [Dense("W1", None, True, activation=relu), Dense("W2", None, True)])


@chain_form("mlp_matmul_add_bias_first")
def matmul_add_bias_first(rng: np.random.Generator) -> Built:
    """MatMul -> Add(bias, h), the bias as the Add's first operand."""
    d, n, k = 12, 16, 5
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["b1", "m1"], ["h"], name="add1"),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        helper.make_node("MatMul", ["a", "W2"], ["m2"], name="mm2"),
        helper.make_node("Add", ["b2", "m2"], ["y"], name="add2"),
    ]
    built = model(nodes, [float_input("x", ["batch", d])], [float_input("y", ["batch", k])], _mlp_inits(rng, d, n, k, False))
    return Built(with_shapes(built), _feed(rng, 3, d), 1, ("relu",))


mlp_reference("mlp_matmul_add_bias_first", [Dense("W1", "b1", activation=relu), Dense("W2", "b2")])


@chain_form("mlp_matmul_no_bias")
def matmul_no_bias(rng: np.random.Generator) -> Built:
    """MatMul -> Relu -> MatMul, no bias anywhere."""
    d, n, k = 12, 16, 5
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        helper.make_node("MatMul", ["a", "W2"], ["y"], name="mm2"),
    ]
    inits = [i for i in _mlp_inits(rng, d, n, k, False) if i.name in ("W1", "W2")]
    built = model(nodes, [float_input("x", ["batch", d])], [float_input("y", ["batch", k])], inits)
    return Built(with_shapes(built), _feed(rng, 3, d), 1, ("relu",))


mlp_reference("mlp_matmul_no_bias", [Dense("W1", activation=relu), Dense("W2")])


@chain_form("mlp_matmul_3d_input")
def matmul_3d_input(rng: np.random.Generator) -> Built:
    """x[batch, seq, d] -> MatMul -> Add -> Relu -> MatMul -> Add: a token-wise FFN on the last axis."""
    d, n, k = 12, 16, 5
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["h"], name="add1"),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        helper.make_node("MatMul", ["a", "W2"], ["m2"], name="mm2"),
        helper.make_node("Add", ["m2", "b2"], ["y"], name="add2"),
    ]
    inputs = [float_input("x", ["batch", "seq", d])]
    built = model(nodes, inputs, [float_input("y", ["batch", "seq", k])], _mlp_inits(rng, d, n, k, False))
    return Built(with_shapes(built), _feed(rng, 2, 3, d), 1, ("relu",))


mlp_reference("mlp_matmul_3d_input", [Dense("W1", "b1", activation=relu), Dense("W2", "b2")])


@chain_form("mlp_dropout_ratio_input")
def dropout_ratio_input(rng: np.random.Generator) -> Built:
    """Gemm -> Dropout(ratio as an input, opset 12+) -> Relu -> Gemm; Dropout is the identity at inference."""
    d, n, k = 12, 16, 5
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Dropout", ["h", "ratio"], ["h_drop"], name="drop1"),
        helper.make_node("Relu", ["h_drop"], ["a"], name="relu1"),
        helper.make_node("Gemm", ["a", "W2", "b2"], ["y"], name="fc2", transB=1),
    ]
    inits = _mlp_inits(rng, d, n, k, True) + [init("ratio", np.array(0.3, np.float32))]
    built = model(nodes, [float_input("x", ["batch", d])], [float_input("y", ["batch", k])], inits)
    return Built(with_shapes(built), _feed(rng, 3, d), 1, ("relu",))


mlp_reference("mlp_dropout_ratio_input", [Dense("W1", "b1", True, activation=relu), Dense("W2", "b2", True)])


@chain_form("mlp_dropout_mask_unused")
def dropout_mask_unused(rng: np.random.Generator) -> Built:
    """MatMul+Add -> Relu -> Dropout with its mask output declared but read by nothing -> MatMul+Add."""
    d, n, k = 12, 16, 5
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["h"], name="add1"),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        helper.make_node("Dropout", ["a"], ["a_drop", "mask"], name="drop1"),
        helper.make_node("MatMul", ["a_drop", "W2"], ["m2"], name="mm2"),
        helper.make_node("Add", ["m2", "b2"], ["y"], name="add2"),
    ]
    built = model(nodes, [float_input("x", ["batch", d])], [float_input("y", ["batch", k])], _mlp_inits(rng, d, n, k, False))
    return Built(with_shapes(built), _feed(rng, 3, d), 1, ("relu",))


mlp_reference("mlp_dropout_mask_unused", [Dense("W1", "b1", activation=relu), Dense("W2", "b2")])


@chain_form("mlp_identity_between")
def identity_between(rng: np.random.Generator) -> Built:
    """Gemm -> Identity -> Relu -> Identity -> MatMul (exporters leave Identity nodes around)."""
    d, n, k = 12, 16, 5
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Identity", ["h"], ["h_id"], name="id1"),
        helper.make_node("Relu", ["h_id"], ["a"], name="relu1"),
        helper.make_node("Identity", ["a"], ["a_id"], name="id2"),
        helper.make_node("MatMul", ["a_id", "W2"], ["y"], name="mm2"),
    ]
    inits = [i for i in _mlp_inits(rng, d, n, k, True) if i.name != "b2"]
    inits[2] = init("W2", numpy_helper.to_array(inits[2]).T.copy())  # MatMul reads [in, out]
    built = model(nodes, [float_input("x", ["batch", d])], [float_input("y", ["batch", k])], inits)
    return Built(with_shapes(built), _feed(rng, 3, d), 1, ("relu",))


mlp_reference("mlp_identity_between", [Dense("W1", "b1", True, activation=relu), Dense("W2")])


@chain_form("mlp_cast_float_around_activation")
def cast_float_around_activation(rng: np.random.Generator) -> Built:
    """Gemm -> Cast(float) -> Relu -> Cast(float) -> Gemm: the no-op Casts mixed-precision export leaves."""
    d, n, k = 12, 16, 5
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Cast", ["h"], ["h_cast"], name="cast1", to=TensorProto.FLOAT),
        helper.make_node("Relu", ["h_cast"], ["a"], name="relu1"),
        helper.make_node("Cast", ["a"], ["a_cast"], name="cast2", to=TensorProto.FLOAT),
        helper.make_node("Gemm", ["a_cast", "W2", "b2"], ["y"], name="fc2", transB=1),
    ]
    built = model(nodes, [float_input("x", ["batch", d])], [float_input("y", ["batch", k])], _mlp_inits(rng, d, n, k, True))
    return Built(with_shapes(built), _feed(rng, 3, d), 1, ("relu",))


mlp_reference("mlp_cast_float_around_activation", [Dense("W1", "b1", True, activation=relu), Dense("W2", "b2", True)])


@chain_form("mlp_leaky_relu")
def leaky_relu_mlp(rng: np.random.Generator) -> Built:
    """Gemm -> LeakyRelu(alpha=0.1) -> Gemm."""
    d, n, k = 12, 16, 5
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("LeakyRelu", ["h"], ["a"], name="act1", alpha=0.1),
        helper.make_node("Gemm", ["a", "W2", "b2"], ["y"], name="fc2", transB=1),
    ]
    built = model(nodes, [float_input("x", ["batch", d])], [float_input("y", ["batch", k])], _mlp_inits(rng, d, n, k, True))
    return Built(with_shapes(built), _feed(rng, 3, d), 1, ("leaky_relu",))


mlp_reference("mlp_leaky_relu", [Dense("W1", "b1", True, activation=leaky_relu(0.1)), Dense("W2", "b2", True)])


@chain_form("mlp_no_activation")
def no_activation(rng: np.random.Generator) -> Built:
    """Gemm -> Gemm with nothing between: a linear bottleneck is a hidden layer too (φ = identity)."""
    d, n, k = 12, 16, 5
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Gemm", ["h", "W2", "b2"], ["y"], name="fc2", transB=1),
    ]
    built = model(nodes, [float_input("x", ["batch", d])], [float_input("y", ["batch", k])], _mlp_inits(rng, d, n, k, True))
    return Built(with_shapes(built), _feed(rng, 3, d), 1, ("identity",))


mlp_reference("mlp_no_activation", [Dense("W1", "b1", True), Dense("W2", "b2", True)])

DEEP_SIZES = (20, 30, 24, 12, 5)  # LeNet-300-100 in miniature, one more hidden layer: 3 chains


@chain_form("mlp_deep_3_chains")
def deep_mlp(rng: np.random.Generator) -> Built:
    """x -> [Gemm(transB=1) -> Relu] x3 -> Gemm: each layer's consumer is the next one's producer."""
    nodes, inits, current = [], [], "x"
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(DEEP_SIZES)):
        last = index == len(DEEP_SIZES) - 2
        out = "y" if last else f"h{index}"
        nodes.append(helper.make_node("Gemm", [current, f"W{index}", f"b{index}"], [out], name=f"fc{index}", transB=1))
        inits += [
            init(f"W{index}", weights(rng, fan_in, fan_out).T.copy()),
            init(f"b{index}", (0.1 * rng.standard_normal(fan_out)).astype(np.float32)),
        ]
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"a{index}"], name=f"relu{index}"))
            current = f"a{index}"
    built = model(
        nodes, [float_input("x", ["batch", DEEP_SIZES[0]])], [float_input("y", ["batch", DEEP_SIZES[-1]])], inits
    )
    return Built(with_shapes(built), _feed(rng, 4, DEEP_SIZES[0]), 3, ("relu", "relu", "relu"))


mlp_reference(
    "mlp_deep_3_chains",
    [Dense(f"W{i}", f"b{i}", True, activation=relu if i < len(DEEP_SIZES) - 2 else None) for i in range(len(DEEP_SIZES) - 1)],
)


@chain_form("mlp_constant_node_weights")
def constant_node_weights(rng: np.random.Generator) -> Built:
    """MatMul+Add -> Relu -> MatMul+Add with every weight and bias a Constant node, not an initializer."""
    d, n, k = 12, 16, 5
    constants = [
        helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t) for t in _mlp_inits(rng, d, n, k, False)
    ]
    nodes = constants + [
        helper.make_node("MatMul", ["x", "W1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["h"], name="add1"),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        helper.make_node("MatMul", ["a", "W2"], ["m2"], name="mm2"),
        helper.make_node("Add", ["m2", "b2"], ["y"], name="add2"),
    ]
    built = model(nodes, [float_input("x", ["batch", d])], [float_input("y", ["batch", k])], [])
    return Built(with_shapes(built), _feed(rng, 3, d), 1, ("relu",))


def constants_of(built: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node tensors by name (the numpy references read both alike)."""
    values = {t.name: numpy_helper.to_array(t) for t in built.graph.initializer}
    for node in built.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


mlp_reference("mlp_constant_node_weights", [Dense("W1", "b1", activation=relu), Dense("W2", "b2")])


@chain_form("mlp_dynamo_transpose_matmul_add")
def dynamo_transpose_matmul_add(rng: np.random.Generator) -> Built:
    """torch.onnx dynamo's nn.Linear: Transpose(W[out, in]) -> MatMul -> Add(bias), opset 18."""
    d, n, k = 12, 16, 5
    nodes = [
        helper.make_node("Transpose", ["W1"], ["W1_t"], name="t1", perm=[1, 0]),
        helper.make_node("MatMul", ["x", "W1_t"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["h"], name="add1"),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        helper.make_node("Transpose", ["W2"], ["W2_t"], name="t2", perm=[1, 0]),
        helper.make_node("MatMul", ["a", "W2_t"], ["m2"], name="mm2"),
        helper.make_node("Add", ["m2", "b2"], ["y"], name="add2"),
    ]
    inputs, outputs = [float_input("x", [1, d])], [float_input("y", [1, k])]
    built = model(nodes, inputs, outputs, _mlp_inits(rng, d, n, k, True), opset=18)
    return Built(with_shapes(built), _feed(rng, 1, d), 1, ("relu",))


mlp_reference("mlp_dynamo_transpose_matmul_add", [Dense("W1", "b1", True, activation=relu), Dense("W2", "b2", True)])


@chain_form("mlp_fan_out_two_consumers")
def fan_out_two_consumers(rng: np.random.Generator) -> Built:
    """One hidden tensor read by two heads, a MatMul and a Gemm(transB=1): both are consumers."""
    d, n, k1, k2 = 12, 16, 5, 3
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        helper.make_node("MatMul", ["a", "U1"], ["y1"], name="head1"),
        helper.make_node("Gemm", ["a", "U2", "c2"], ["y2"], name="head2", transB=1),
    ]
    inits = [
        init("W1", weights(rng, d, n).T.copy()),
        init("b1", rng.standard_normal(n).astype(np.float32)),
        init("U1", weights(rng, n, k1)),
        init("U2", weights(rng, n, k2).T.copy()),
        init("c2", rng.standard_normal(k2).astype(np.float32)),
    ]
    outputs = [float_input("y1", ["batch", k1]), float_input("y2", ["batch", k2])]
    built = model(nodes, [float_input("x", ["batch", d])], outputs, inits)
    return Built(with_shapes(built), _feed(rng, 3, d), 1, ("relu",))


def _fan_out_reference(inits: dict[str, np.ndarray], feed: dict[str, np.ndarray], plan: Plan) -> list[np.ndarray]:
    hidden = [Dense("W1", "b1", True, activation=relu)]
    heads = [Dense("U1"), Dense("U2", "c2", True)]
    return [dense_forward(feed["x"], hidden + [head], inits, plan) for head in heads]


NUMPY_REFERENCES["mlp_fan_out_two_consumers"] = _fan_out_reference


@chain_form("mlp_ir8_opset13")
def ir8_opset13(rng: np.random.Generator) -> Built:
    """An IR 8 / opset 13 model (PyTorch 1.x era): its IR and opset must survive pruning."""
    d, n, k = 12, 16, 5
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        helper.make_node("Gemm", ["a", "W2", "b2"], ["y"], name="fc2", transB=1),
    ]
    inputs, outputs = [float_input("x", ["batch", d])], [float_input("y", ["batch", k])]
    built = model(nodes, inputs, outputs, _mlp_inits(rng, d, n, k, True), opset=13, ir_version=8)
    return Built(with_shapes(built), _feed(rng, 3, d), 1, ("relu",))


mlp_reference("mlp_ir8_opset13", [Dense("W1", "b1", True, activation=relu), Dense("W2", "b2", True)])


@chain_form("mlp_ir5_opset10")
def ir5_opset10(rng: np.random.Generator) -> Built:
    """An IR 5 / opset 10 model with an opset-10 Dropout (ratio attribute), like lenet5_mnist.onnx."""
    d, n, k = 12, 16, 5
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        helper.make_node("Dropout", ["a"], ["a_drop"], name="drop1", ratio=0.5),
        helper.make_node("Gemm", ["a_drop", "W2", "b2"], ["y"], name="fc2", transB=1),
    ]
    inputs, outputs = [float_input("x", ["batch", d])], [float_input("y", ["batch", k])]
    built = model(nodes, inputs, outputs, _mlp_inits(rng, d, n, k, True), opset=10, ir_version=5)
    return Built(with_shapes(built), _feed(rng, 3, d), 1, ("relu",))


mlp_reference("mlp_ir5_opset10", [Dense("W1", "b1", True, activation=relu), Dense("W2", "b2", True)])


# Activation, subgraph, neuron-wise, fan-out, gated-FFN and fp16/bf16 forms register themselves here.
import builders_ffn  # noqa: E402,F401
