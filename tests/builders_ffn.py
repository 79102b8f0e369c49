"""Chain forms for activations, neuron-wise ops, fan-out, gated FFNs and low-precision weights.

Imported at the end of builders.py, so every form here runs through the standard suite in
tests/test_forms.py. Each is ``x[b,12] -> MatMul(+Add) or Gemm -> middle -> MatMul -> Add -> y[b,5]``
with a different middle, and asserts the activation the matcher must recognise.
Forms whose ops onnx's ReferenceEvaluator cannot run (com.microsoft) or cannot match to 1e-5
(float16 accumulation order) set ``notes={"no_reference": True}``; tests/test_ffn_forms.py checks
those against their own numpy forward pass instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import ml_dtypes
import numpy as np
import onnx
from builders import Built, chain_form, model, weights
from onnx import TensorProto, helper, numpy_helper

D, N, K = 12, 16, 5
MS = "com.microsoft"
_ELEMENT = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}


class Graph:
    """Nodes and initializers being collected; outputs are named after their node."""

    def __init__(self, dtype=np.float32) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.dtype = dtype

    def node(self, op: str, inputs: list[str], domain: str | None = None, outputs: int = 1, **attrs) -> str:
        name = f"{op.lower()}_{len(self.nodes)}"
        names = [name] + [f"{name}_out{i}" for i in range(1, outputs)]
        self.nodes.append(helper.make_node(op, inputs, names, name=name, domain=domain, **attrs))
        return name

    def const(self, name: str, value, as_node: bool = False, dtype=None) -> str:
        """A constant as an initializer, or as a Constant node (as the dynamo exporter writes scalars)."""
        tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype or self.dtype), name)
        if as_node:
            self.nodes.append(helper.make_node("Constant", [], [name], name=f"const_{name}", value=tensor))
        else:
            self.inits.append(tensor)
        return name


Middle = Callable[[Graph, str], str]


def ffn(
    rng: np.random.Generator,
    middle: Middle,
    activation: str,
    *,
    producer: str = "matmul",
    opset: int = 17,
    extra_opsets: dict[str, int] | None = None,
    dtype=np.float32,
    notes: dict | None = None,
    feed_scale: float = 1.0,
) -> Built:
    """x -> producer -> middle(h) -> MatMul -> Add -> y; one chain with the given activation."""
    g = Graph(dtype)
    if producer == "gemm":
        g.const("W1", weights(rng, D, N).T.copy())
        g.const("b1", rng.standard_normal(N) * 0.5)
        hidden = g.node("Gemm", ["x", "W1", "b1"], transB=1)
    else:
        g.const("W1", weights(rng, D, N))
        g.const("b1", rng.standard_normal(N) * 0.5)
        hidden = g.node("Add", [g.node("MatMul", ["x", "W1"]), "b1"])
    out = middle(g, hidden)
    g.const("W2", weights(rng, N, K))
    g.const("b2", rng.standard_normal(K))
    g.nodes.append(helper.make_node("MatMul", [out, "W2"], ["fc2_out"], name="fc2"))
    g.nodes.append(helper.make_node("Add", ["fc2_out", "b2"], ["y"], name="fc2_bias"))
    element = _ELEMENT[dtype]
    inputs = [helper.make_tensor_value_info("x", element, ["batch", D])]
    outputs = [helper.make_tensor_value_info("y", element, ["batch", K])]
    built = model(g.nodes, inputs, outputs, g.inits, opset=opset, extra_opsets=extra_opsets)
    feed = {"x": (feed_scale * rng.standard_normal((4, D))).astype(dtype)}
    return Built(built, feed, 1, (activation,), notes or {})


def _register(name: str, middle: Middle, activation: str, **options) -> None:
    chain_form(name)(lambda rng: ffn(rng, middle, activation, **options))


# ---- single activation ops -------------------------------------------------------------------

_SINGLE: dict[str, tuple[Middle, str, dict]] = {
    "act_leaky_relu": (lambda g, h: g.node("LeakyRelu", [h], alpha=0.1), "leaky_relu", {}),
    "act_leaky_relu_default_gemm": (lambda g, h: g.node("LeakyRelu", [h]), "leaky_relu", {"producer": "gemm"}),
    "act_sigmoid": (lambda g, h: g.node("Sigmoid", [h]), "sigmoid", {}),
    "act_tanh_gemm": (lambda g, h: g.node("Tanh", [h]), "tanh", {"producer": "gemm"}),
    "act_softplus": (lambda g, h: g.node("Softplus", [h]), "softplus", {}),
    "act_softsign": (lambda g, h: g.node("Softsign", [h]), "softsign", {}),
    "act_elu": (lambda g, h: g.node("Elu", [h], alpha=0.7), "elu", {}),
    "act_selu": (lambda g, h: g.node("Selu", [h]), "selu", {}),
    "act_celu": (lambda g, h: g.node("Celu", [h], alpha=1.5), "celu", {}),
    "act_hard_sigmoid": (lambda g, h: g.node("HardSigmoid", [h], alpha=0.3, beta=0.4), "hard_sigmoid", {}),
    "act_hard_swish": (lambda g, h: g.node("HardSwish", [h]), "hard_swish", {"feed_scale": 4.0}),
    "act_thresholded_relu": (lambda g, h: g.node("ThresholdedRelu", [h], alpha=0.3), "thresholded_relu", {}),
    "act_mish": (lambda g, h: g.node("Mish", [h]), "mish", {"opset": 18}),
    "act_gelu_op20": (lambda g, h: g.node("Gelu", [h]), "gelu", {"opset": 20}),
    "act_gelu_op20_tanh": (lambda g, h: g.node("Gelu", [h], approximate="tanh"), "gelu_tanh", {"opset": 20}),
    "act_clip_relu6_inputs": (
        lambda g, h: g.node("Clip", [h, g.const("lo", 0.0), g.const("hi", 6.0)]), "clip", {"feed_scale": 8.0}),
    "act_clip_general_inputs": (
        lambda g, h: g.node("Clip", [h, g.const("lo", -0.5, as_node=True), g.const("hi", 0.75)]), "clip", {}),
    "act_clip_max_only": (lambda g, h: g.node("Clip", [h, "", g.const("hi", 0.5)]), "clip", {}),
    "act_clip_relu6_attributes_opset10": (
        lambda g, h: g.node("Clip", [h], min=0.0, max=6.0), "clip", {"opset": 10, "feed_scale": 8.0}),
    "act_clip_general_attributes_opset7": (
        lambda g, h: g.node("Clip", [h], min=-0.25, max=0.5), "clip", {"opset": 7}),
}
for _name, (_middle, _activation, _options) in _SINGLE.items():
    _register(_name, _middle, _activation, **_options)


@chain_form("act_prelu_per_neuron_slope")
def prelu_per_neuron(rng: np.random.Generator) -> Built:
    """PRelu with one slope per neuron, some negative (non-monotone): the slope is sliced with the neurons."""
    slope = np.linspace(-0.8, 1.5, N)
    return ffn(rng, lambda g, h: g.node("PRelu", [h, g.const("slope", rng.permutation(slope))]), "prelu")


@chain_form("act_prelu_scalar_slope")
def prelu_scalar(rng: np.random.Generator) -> Built:
    return ffn(rng, lambda g, h: g.node("PRelu", [h, g.const("slope", [0.25])]), "prelu", producer="gemm")


# onnxruntime's transformer optimizer writes these com.microsoft ops; onnx's reference evaluator has none of them.
_ORT_ONLY = {"extra_opsets": {MS: 1}, "notes": {"no_reference": True}}
_MS_FORMS: dict[str, tuple[Middle, str]] = {
    "ms_fast_gelu": (lambda g, h: g.node("FastGelu", [h], domain=MS), "gelu_tanh"),
    "ms_gelu": (lambda g, h: g.node("Gelu", [h], domain=MS), "gelu"),
    "ms_quick_gelu": (lambda g, h: g.node("QuickGelu", [h], domain=MS, alpha=1.5), "quick_gelu"),
}
for _name, (_middle, _activation) in _MS_FORMS.items():
    _register(_name, _middle, _activation, **_ORT_ONLY)


@chain_form("ms_fast_gelu_with_bias")
def ms_fast_gelu_bias(rng: np.random.Generator) -> Built:
    """FastGelu(h, bias): the bias input is added before φ and sliced with the neurons."""
    bias = rng.standard_normal(N)
    return ffn(rng, lambda g, h: g.node("FastGelu", [h, g.const("gelu_bias", bias)], domain=MS), "gelu_tanh", **_ORT_ONLY)


@chain_form("ms_bias_gelu")
def ms_bias_gelu(rng: np.random.Generator) -> Built:
    """The optimizer's fusion of MatMul's bias into GELU: MatMul -> BiasGelu(h, b) with no Add."""
    bias = rng.standard_normal(N)

    def middle(g: Graph, h: str) -> str:
        return g.node("BiasGelu", [h, g.const("gelu_bias", bias)], domain=MS)

    return ffn(rng, middle, "gelu", **_ORT_ONLY)


# ---- activations spelled out as subgraphs ----------------------------------------------------


def _erf_gelu(order: str, as_node: bool = False, mul_inverse: bool = False) -> Middle:
    """GELU as exporters spell it; ``order`` names operand orders, ``as_node`` makes constants Constant nodes."""

    def middle(g: Graph, h: str) -> str:
        c = lambda name, v: g.const(name, v, as_node=as_node)
        if mul_inverse:
            scaled = g.node("Mul", [h, c("inv_sqrt2", 1 / math.sqrt(2))])
        else:
            scaled = g.node("Div", [h, c("sqrt2", math.sqrt(2))])
        erf = g.node("Erf", [scaled])
        if order == "legacy":  # Div(√2) -> Erf -> Add(1) -> Mul(x) -> Mul(0.5)
            return g.node("Mul", [g.node("Mul", [h, g.node("Add", [erf, c("one", 1.0)])]), c("half", 0.5)])
        if order == "legacy_swapped":  # the same with every commutative operand order reversed
            return g.node("Mul", [c("half", 0.5), g.node("Mul", [g.node("Add", [c("one", 1.0), erf]), h])])
        if order == "dynamo":  # ... -> Add(1) -> Mul(0.5) -> Mul(x)
            return g.node("Mul", [h, g.node("Mul", [c("half", 0.5), g.node("Add", [erf, c("one", 1.0)])])])
        assert order == "dynamo_swapped"
        return g.node("Mul", [g.node("Mul", [g.node("Add", [c("one", 1.0), erf]), c("half", 0.5)]), h])

    return middle


for _order in ("legacy", "legacy_swapped", "dynamo", "dynamo_swapped"):
    _register(f"sub_erf_gelu_{_order}_initializers", _erf_gelu(_order), "gelu")
    _register(f"sub_erf_gelu_{_order}_constant_nodes", _erf_gelu(_order, as_node=True), "gelu")
_register("sub_erf_gelu_mul_inverse_sqrt2", _erf_gelu("legacy", mul_inverse=True), "gelu", producer="gemm")


def _tanh_gelu(g: Graph, h: str) -> str:
    """0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) as Pow/Mul/Add/Tanh (PyTorch's approximate='tanh', TF's gelu)."""
    cubed = g.node("Pow", [h, g.const("three", 3.0)])
    inner = g.node("Add", [h, g.node("Mul", [cubed, g.const("c", 0.044715)])])
    tanh = g.node("Tanh", [g.node("Mul", [inner, g.const("k", math.sqrt(2 / math.pi))])])
    return g.node("Mul", [g.node("Mul", [h, g.const("half", 0.5)]), g.node("Add", [tanh, g.const("one", 1.0)])])


def _tanh_gelu_products(g: Graph, h: str) -> str:
    """The same with x³ as x·x·x and the constants as Constant nodes."""
    cubed = g.node("Mul", [g.node("Mul", [h, h]), h])
    inner = g.node("Add", [g.node("Mul", [g.const("c", 0.044715, as_node=True), cubed]), h])
    tanh = g.node("Tanh", [g.node("Mul", [g.const("k", math.sqrt(2 / math.pi), as_node=True), inner])])
    return g.node("Mul", [g.node("Mul", [g.node("Add", [g.const("one", 1.0, as_node=True), tanh]), h]),
                          g.const("half", 0.5, as_node=True)])


_register("sub_tanh_gelu_pow", _tanh_gelu, "gelu_tanh")
_register("sub_tanh_gelu_products", _tanh_gelu_products, "gelu_tanh")
_register("sub_silu", lambda g, h: g.node("Mul", [h, g.node("Sigmoid", [h])]), "silu")
_register("sub_silu_swapped", lambda g, h: g.node("Mul", [g.node("Sigmoid", [h]), h]), "silu", producer="gemm")
_register("sub_silu_reciprocal", lambda g, h: g.node("Div", [h, g.node("Add", [g.const("one", 1.0), g.node("Exp", [g.node("Neg", [h])])])]), "silu")
_register("sub_quick_gelu", lambda g, h: g.node("Mul", [h, g.node("Sigmoid", [g.node("Mul", [h, g.const("a", 1.702)])])]), "quick_gelu")
_register("sub_hard_swish_hard_sigmoid", lambda g, h: g.node("Mul", [h, g.node("HardSigmoid", [h], alpha=1 / 6, beta=0.5)]),
          "hard_swish", feed_scale=4.0)
_register(
    "sub_hard_swish_relu6",  # x·Relu6(x+3)/6, PyTorch's decomposition
    lambda g, h: g.node("Div", [g.node("Mul", [h, g.node("Clip", [g.node("Add", [h, g.const("three", 3.0)]), g.const("lo", 0.0), g.const("hi", 6.0)])]), g.const("six", 6.0)]),
    "hard_swish", feed_scale=4.0,
)
_register("sub_mish", lambda g, h: g.node("Mul", [h, g.node("Tanh", [g.node("Softplus", [h])])]), "mish")
_register("sub_binary_step", lambda g, h: g.node("Cast", [g.node("Greater", [h, g.const("zero", 0.0)])], to=TensorProto.FLOAT), "step")
_register("sub_binary_step_less", lambda g, h: g.node("Cast", [g.node("Less", [g.const("zero", 0.0), h])], to=TensorProto.FLOAT), "step")
_register("sub_gaussian", lambda g, h: g.node("Exp", [g.node("Neg", [g.node("Mul", [h, h])])]), "gaussian")
_register("sub_gaussian_pow", lambda g, h: g.node("Exp", [g.node("Neg", [g.node("Pow", [h, g.const("two", 2.0)])])]), "gaussian")
_register("sub_scaled_tanh", lambda g, h: g.node("Mul", [g.node("Tanh", [h]), g.const("a", 1.7159)]), "tanh")


# ---- neuron-wise ops between producer and consumer -------------------------------------------


def _per_feature(rng: np.random.Generator, low: float = 0.5, high: float = 1.5) -> np.ndarray:
    return rng.uniform(low, high, N) * rng.choice([-1.0, 1.0], N)


@chain_form("affine_batchnorm_before_relu")
def batchnorm_before(rng: np.random.Generator) -> Built:
    """Gemm -> BatchNormalization (inference, 2-D) -> Relu -> MatMul: BN folds into the points."""
    scale, shift, mean, var = _per_feature(rng), rng.standard_normal(N), rng.standard_normal(N), rng.uniform(0.5, 2, N)

    def middle(g: Graph, h: str) -> str:
        bn = g.node("BatchNormalization", [h, g.const("s", scale), g.const("t", shift), g.const("mu", mean), g.const("var", var)], epsilon=1e-3)
        return g.node("Relu", [bn])

    return ffn(rng, middle, "relu", producer="gemm")


@chain_form("affine_batchnorm_after_tanh")
def batchnorm_after(rng: np.random.Generator) -> Built:
    scale, shift, mean, var = _per_feature(rng), rng.standard_normal(N), rng.standard_normal(N), rng.uniform(0.5, 2, N)

    def middle(g: Graph, h: str) -> str:
        return g.node("BatchNormalization", [g.node("Tanh", [h]), g.const("s", scale), g.const("t", shift), g.const("mu", mean), g.const("var", var)])

    return ffn(rng, middle, "tanh", producer="gemm")


@chain_form("affine_constants_before_and_after")
def affine_constants(rng: np.random.Generator) -> Built:
    """Mul, Add, Sub, Div (and c − x) by per-feature constants on both sides of GELU, in both operand orders."""
    c = {name: _per_feature(rng) for name in ("m1", "a1", "s1", "d1", "m2", "a2", "r2", "d2")}

    def middle(g: Graph, h: str) -> str:
        t = g.node("Mul", [g.const("m1", c["m1"]), h])
        t = g.node("Add", [t, g.const("a1", c["a1"])])
        t = g.node("Sub", [t, g.const("s1", c["s1"].reshape(1, N))])
        t = g.node("Div", [t, g.const("d1", c["d1"])])
        t = g.node("Gelu", [t])
        t = g.node("Mul", [t, g.const("m2", c["m2"])])
        t = g.node("Add", [g.const("a2", c["a2"]), t])
        t = g.node("Sub", [g.const("r2", c["r2"]), t])
        return g.node("Div", [t, g.const("d2", c["d2"])])

    return ffn(rng, middle, "gelu", opset=20)


@chain_form("affine_scalar_constants")
def affine_scalars(rng: np.random.Generator) -> Built:
    """Scalar constants broadcast to every neuron: nothing to slice, still folded."""

    def middle(g: Graph, h: str) -> str:
        t = g.node("Sigmoid", [g.node("Mul", [h, g.const("two", [2.0])])])
        return g.node("Sub", [t, g.const("half", 0.5)])

    return ffn(rng, middle, "sigmoid")


@chain_form("pass_dropout_identity_cast")
def pass_through(rng: np.random.Generator) -> Built:
    def middle(g: Graph, h: str) -> str:
        t = g.node("Dropout", [h], outputs=2)
        t = g.node("Relu", [g.node("Identity", [t])])
        return g.node("Cast", [t], to=TensorProto.FLOAT)

    return ffn(rng, middle, "relu")


# ---- fan-out: one hidden tensor, several consumers -------------------------------------------


@chain_form("fanout_two_consumers")
def fanout(rng: np.random.Generator) -> Built:
    """relu(h) read by a MatMul and by a Gemm(transB=1): both consumers' columns are sliced alike."""
    g = Graph()
    g.const("W1", weights(rng, D, N))
    g.const("b1", rng.standard_normal(N))
    a = g.node("Relu", [g.node("Add", [g.node("MatMul", ["x", "W1"]), "b1"])])
    g.const("W2", weights(rng, N, K))
    g.const("W3", weights(rng, N, 3).T.copy())
    g.const("b3", rng.standard_normal(3))
    g.nodes.append(helper.make_node("MatMul", [a, "W2"], ["y"], name="head_a"))
    g.nodes.append(helper.make_node("Gemm", [a, "W3", "b3"], ["z"], name="head_b", transB=1))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", K]),
               helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 3])]
    built = model(g.nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", D])], outputs, g.inits)
    return Built(built, {"x": rng.standard_normal((4, D)).astype(np.float32)}, 1, ("relu",))


# ---- gated FFNs: act(x·Wg) ⊙ (x·Wu) -> Wd -------------------------------------------------------


def gated(
    rng: np.random.Generator,
    activation: str = "silu",
    *,
    up_first: bool = False,
    swap_product: bool = False,
    biases: bool = False,
    transposed: bool = False,
) -> Built:
    """LLaMA/Mistral's SwiGLU (SiLU as Sigmoid·x) or GeGLU (Gelu op); options vary node and operand order."""
    g = Graph()

    def projection(name: str) -> str:
        if transposed:  # nn.Linear weights stored [out, in] and transposed in the graph
            g.const(name, weights(rng, D, N).T.copy())
            product = g.node("MatMul", ["x", g.node("Transpose", [name], perm=[1, 0])])
        else:
            g.const(name, weights(rng, D, N))
            product = g.node("MatMul", ["x", name])
        return g.node("Add", [product, g.const(f"{name}_bias", rng.standard_normal(N))]) if biases else product

    up = projection("W_up") if up_first else None
    gate = projection("W_gate")
    act = g.node("Mul", [gate, g.node("Sigmoid", [gate])]) if activation == "silu" else g.node("Gelu", [gate])
    up = up or projection("W_up")
    product = g.node("Mul", [up, act] if swap_product else [act, up])
    g.const("W_down", weights(rng, N, K))
    g.nodes.append(helper.make_node("MatMul", [product, "W_down"], ["y"], name="down"))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", D])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", K])]
    built = model(g.nodes, inputs, outputs, g.inits, opset=20 if activation == "gelu" else 17)
    return Built(built, {"x": rng.standard_normal((4, D)).astype(np.float32)}, 1, (f"{activation}*up",))


chain_form("gated_swiglu")(lambda rng: gated(rng))
chain_form("gated_swiglu_up_first_swapped_transposed")(
    lambda rng: gated(rng, up_first=True, swap_product=True, transposed=True))
chain_form("gated_geglu_biases")(lambda rng: gated(rng, "gelu", biases=True))


# ---- low-precision weights -------------------------------------------------------------------

# float16 sums differ from the reference evaluator's by float16 rounding; tests/test_ffn_forms.py
# checks these forms with a float16 tolerance.
_FP16 = {"dtype": np.float16, "notes": {"no_reference": True, "dtype": "float16"}}
_register("fp16_relu", lambda g, h: g.node("Relu", [h]), "relu", **_FP16)
_register("fp16_gemm_tanh", lambda g, h: g.node("Tanh", [h]), "tanh", producer="gemm", **_FP16)
_register("fp16_erf_gelu_legacy", _erf_gelu("legacy"), "gelu", **_FP16)
_register("fp16_tanh_gelu", _tanh_gelu, "gelu_tanh", **_FP16)


def _bf16(rng: np.random.Generator, activation: str, transposed: bool = False) -> Built:
    """bfloat16 initializers, each Cast to float before use (onnxruntime has no bf16 MatMul on CPU)."""
    g = Graph()

    def stored(name: str, value: np.ndarray) -> str:
        g.inits.append(numpy_helper.from_array(value.astype(ml_dtypes.bfloat16), name))
        return g.node("Cast", [name], to=TensorProto.FLOAT)

    w1 = weights(rng, D, N)
    if transposed:  # stored [out, in]: Cast then Transpose
        first = g.node("Transpose", [stored("W1", w1.T.copy())], perm=[1, 0])
    else:
        first = stored("W1", w1)
    h = g.node("Add", [g.node("MatMul", ["x", first]), stored("b1", rng.standard_normal(N))])
    if activation == "gelu":
        a = _erf_gelu("legacy")(g, h)
    else:
        a = g.node("Relu", [g.node("Mul", [h, stored("scale", _per_feature(rng))])])
    g.nodes.append(helper.make_node("MatMul", [a, stored("W2", weights(rng, N, K))], ["y"], name="fc2"))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", D])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", K])]
    built = model(g.nodes, inputs, outputs, g.inits)
    return Built(built, {"x": rng.standard_normal((4, D)).astype(np.float32)}, 1, (activation,), {"dtype": "bfloat16"})


chain_form("bf16_cast_weights_relu")(lambda rng: _bf16(rng, "relu"))
chain_form("bf16_cast_transposed_weights_gelu")(lambda rng: _bf16(rng, "gelu", transposed=True))
