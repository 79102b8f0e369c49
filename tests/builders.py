"""Tiny ONNX graphs for the tests, one builder per graph form, all in one parametrized list.

Each builder takes a seeded ``numpy.random.Generator`` and returns a :class:`Built`: the model,
its input feed for onnxruntime, and how many prunable chains it must contain. Registering a
builder with ``@chain_form("name")`` puts it through the whole standard set of tests
(tests/test_forms.py): found by inspect, keep-all exact, pruned equals a numpy forward of the
sliced weights, checker, onnxruntime, IR/opset kept.
"""

from __future__ import annotations

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
