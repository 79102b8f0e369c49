"""Find prunable hidden layers, read-only: producer -> neuron-wise ops -> consumer(s), or a reason.

A *chain* is a hidden layer whose neurons can be removed by slicing weights alone:

    X ─ Gemm/MatMul(+Add) ─ [Identity|Dropout|Cast|per-feature affine|BatchNorm]* ─ φ ─ [...]* ─┬─ Gemm/MatMul
                 producer                   neuron-wise steps                                 └─ Gemm/MatMul …
                                                                                                  consumers

A *gated* chain (LLaMA, Mistral, GeGLU) has two producers reading the same input, multiplied
neuron by neuron before the consumers; neuron j is column j of the gate, of the up projection
and row j of the down projection, so all three are sliced together:

    X ─┬─ MatMul(Wg)(+Add) ─ [...]* ─ φ ─ [scale]* ─┐
       └─ MatMul(Wu)(+Add) ─ [affine]* ─────────────┴─ Mul ─ [...]* ─ MatMul(Wd)

Every tensor between producer and consumers must be read only inside the chain and must not be
a graph output; every weight must be a float initializer (or Constant, or a Cast and/or
Transpose of one, as bf16 models keep their weights) that no other node reads. Anything else is
reported as :class:`Skipped` with the reason, and the graph is never modified here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from . import activations
from .activations import Activation
from .errors import ModelError
from .io import WeightStore

log = logging.getLogger(__name__)

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
PASS_THROUGH = {"Identity", "Dropout", "Cast"}
AFFINE_BINARY = {"Add", "Sub", "Mul", "Div"}
QUANTIZED = {"DequantizeLinear", "QLinearMatMul", "MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear"}
# Ops that move features around rather than act on each one: a hidden tensor they read cannot lose
# single neurons (attention's Q/K/V projections are reshaped into heads this way).
LAYOUT_OPS = {"Reshape", "Transpose", "Split", "Slice", "Gather", "Flatten", "Squeeze", "Unsqueeze", "Concat"}
# Unit roundoff of the low-precision float types: a subgraph whose constants are stored in them
# can only match a registry function to that precision.
_ROUNDOFF = {TensorProto.FLOAT16: 2.0**-11, TensorProto.BFLOAT16: 2.0**-8}
# Elementwise ops an exporter uses to spell an activation out (evaluated in float64 numpy).
# Activation ops of SINGLE_OPS with scalar parameters are evaluated through the registry too.
_SCALAR_OPS = {
    "Add": lambda a, b: a + b,
    "Sub": lambda a, b: a - b,
    "Mul": lambda a, b: a * b,
    "Div": lambda a, b: a / b,
    "Pow": lambda a, b: np.power(a, b),
    "Max": np.maximum,
    "Min": np.minimum,
    "Erf": lambda a: activations._erf(a),
    "Exp": np.exp,
    "Log": np.log,
    "Neg": np.negative,
    "Sqrt": np.sqrt,
    "Abs": np.abs,
    "Reciprocal": lambda a: 1.0 / a,
    "Greater": lambda a, b: (a > b).astype(np.float64),
    "Less": lambda a, b: (a < b).astype(np.float64),
    "GreaterOrEqual": lambda a, b: (a >= b).astype(np.float64),
    "LessOrEqual": lambda a, b: (a <= b).astype(np.float64),
    "Where": lambda c, a, b: np.where(c != 0, a, b),
    "Identity": lambda a: a,
}
_MAX_SUBGRAPH_NODES = 16
_PROBE = np.concatenate([np.linspace(-12.0, 12.0, 481), [-40.0, -25.0, 25.0, 40.0]])
_SUBGRAPH_TOLERANCE = 1e-6  # max |fit − subgraph| relative to 1 + max|subgraph| on the probe, for float32 constants


@dataclass(frozen=True)
class WeightRef:
    """A matrix the chain reads: the stored tensor, and which of its axes indexes hidden neurons."""

    tensor: str
    neuron_axis: int
    via_transpose: str | None = None  # the Transpose output the user reads, if the weight goes through one
    # Every tensor between the stored weight and its user (Cast and Transpose outputs), with whether
    # it is the transpose of the stored matrix: their declared shapes shrink with it.
    views: tuple[tuple[str, bool], ...] = ()


@dataclass(frozen=True)
class Step:
    """One neuron-wise node between producer and consumers.

    kind: ``pass`` (Identity, Dropout, Cast), ``scale``/``shift``/``shift_neg``/``rsub``/``div``
    (x·c, x+c, x−c, c−x, x/c with a per-neuron or scalar constant), ``batchnorm``,
    ``activation``, or ``gate`` (the product with a gated FFN's up projection).
    ``sliced`` lists (tensor, axis) pairs holding one value per neuron; surgery slices them.
    """

    node: int
    label: str
    kind: str
    tensors: tuple[str, ...] = ()
    sliced: tuple[tuple[str, int], ...] = ()
    activation: Activation | None = None
    post_scale: float = 1.0  # for a subgraph activation recognised as a·φ(x)+b
    post_shift: float = 0.0
    bias: str | None = None  # an input added before φ (BiasGelu, FastGelu)
    attrs: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Producer:
    node: int
    label: str
    input: str
    weight: WeightRef  # neuron axis = output axis
    bias: str | None  # per-neuron (or broadcast) bias tensor, Gemm C or the following Add
    bias_node: int | None  # the Add node carrying a MatMul's bias
    alpha: float = 1.0
    beta: float = 1.0


@dataclass(frozen=True)
class Consumer:
    node: int
    label: str
    weight: WeightRef  # neuron axis = reduction axis
    alpha: float = 1.0


@dataclass(frozen=True)
class Chain:
    """A prunable hidden layer. ``resized`` are the tensors whose feature axis shrinks.

    A gated chain also has ``multiplier``, the up projection whose output multiplies the
    activation, and ``multiplier_steps``, the affine steps on that branch; the ``gate`` step in
    ``steps`` slices the up projection's tensors.
    """

    name: str
    producer: Producer
    steps: tuple[Step, ...]
    consumers: tuple[Consumer, ...]
    hidden: str
    resized: tuple[str, ...]
    size: int
    multiplier: Producer | None = None
    multiplier_steps: tuple[Step, ...] = ()

    @property
    def activation(self) -> Activation:
        for step in self.steps:
            if step.activation is not None:
                return step.activation
        return activations.IDENTITY

    @property
    def activation_label(self) -> str:
        return f"{self.activation.name}*up" if self.multiplier is not None else self.activation.name


@dataclass(frozen=True)
class Skipped:
    """A layer that looked prunable but is not, and why. It is left exactly as it was."""

    name: str
    reason: str


class Decline(Exception):
    """Raised inside matching to carry a reason; never escapes this module."""


_BROADCASTING = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "PRelu"})
_RANK_KEEPING = frozenset({  # output rank = first input's rank
    "Identity", "Dropout", "Cast", "BatchNormalization", "Relu", "LeakyRelu", "ThresholdedRelu", "Sigmoid",
    "Tanh", "Softplus", "Softsign", "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish", "Clip", "Mish", "Gelu",
    "Erf", "Abs", "Neg", "Exp", "Sqrt", "Reciprocal",
})


@dataclass
class GraphView:
    """Read-only indexes over a graph: who produces and who reads each tensor.

    A ``Cast`` to a float type of a stored constant counts as that constant (``casts`` maps the
    Cast output to the initializer): bf16 models keep their weights so where a runtime lacks
    bf16 kernels.
    """

    graph: onnx.GraphProto
    store: WeightStore
    producer: dict[str, int] = field(default_factory=dict)
    readers: dict[str, list[int]] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)
    ranks: dict[str, int] = field(default_factory=dict)
    casts: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        nodes = self.graph.node
        for index, node in enumerate(nodes):
            for name in node.output:
                if name:
                    self.producer[name] = index
            for name in list(node.input) + sorted(_outer_names(node)):
                if name:
                    self.readers.setdefault(name, [])
                    if index not in self.readers[name]:
                        self.readers[name].append(index)
        self.outputs = {o.name for o in self.graph.output}
        self.inputs = {i.name for i in self.graph.input}
        self.order = _toposort(self.graph, self.producer)
        for info in list(self.graph.input) + list(self.graph.value_info) + list(self.graph.output):
            if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
                self.ranks[info.name] = len(info.type.tensor_type.shape.dim)
        for node in nodes:
            if (
                node.op_type == "Cast"
                and not _domain(node)
                and _attrs(node).get("to") in FLOAT_TYPES
                and self._stored(node.input[0])
                and node.output[0] not in self.store
            ):
                self.casts[node.output[0]] = node.input[0]
        self._infer_ranks()

    def _infer_ranks(self) -> None:
        """Ranks the file does not declare, by exact rules for the ops chains are made of.

        Exporters often write no value_info; full shape inference would copy the model (weights
        included). BatchNormalization and per-feature constants need only the rank.
        """

        def rank_of(name: str) -> int | None:
            if name in self.ranks:
                return self.ranks[name]
            return len(self.shape(name)) if self.is_static(name) else None

        for index in self.order:
            node = self.graph.node[index]
            if _domain(node) or not node.output or not node.output[0] or node.output[0] in self.ranks:
                continue
            known = [rank_of(name) for name in node.input if name]
            rank = None
            if node.op_type == "Gemm":
                rank = 2
            elif node.op_type == "MatMul" and len(known) == 2 and None not in known and min(known) >= 2:
                rank = max(known)
            elif node.op_type in _BROADCASTING and known and None not in known:
                rank = max(known)
            elif node.op_type in _RANK_KEEPING and known and known[0] is not None:
                rank = known[0]
            if rank is not None:
                self.ranks[node.output[0]] = rank

    def label(self, index: int) -> str:
        node = self.graph.node[index]
        return node.name or f"{node.op_type}_{index}"

    def _stored(self, name: str) -> bool:
        return name in self.store and name not in self.inputs

    def source(self, name: str) -> str:
        """The initializer holding a constant's value (itself, or what a Cast reads)."""
        return self.casts.get(name, name)

    def is_static(self, name: str) -> bool:
        """Stored in the model (directly or through a Cast) and not overridable at run time."""
        return self._stored(name) or name in self.casts

    def shape(self, name: str) -> tuple[int, ...]:
        return self.store.shape(self.source(name))

    def dtype(self, name: str) -> int:
        """The element type the graph sees (a Cast's target type, for a cast constant)."""
        if name in self.casts:
            return _attrs(self.graph.node[self.producer[name]])["to"]
        return self.store.dtype(name)

    def constant(self, name: str, max_size: int = 1 << 16) -> np.ndarray | None:
        if not name or not self.is_static(name):
            return None
        if int(np.prod(self.shape(name), dtype=np.int64)) > max_size:
            return None
        value = np.asarray(self.store.read(self.source(name)))
        if name in self.casts:  # the value the graph sees, rounded to the Cast's type
            value = value.astype(helper.tensor_dtype_to_np_dtype(self.dtype(name)))
        return value.astype(np.float64)

    def sole_reader(self, name: str, index: int) -> bool:
        """``index`` is the only node reading ``name`` (and, for a cast constant, the Cast the only reader of its source)."""
        if self.readers.get(name, []) != [index] or name in self.outputs:
            return False
        if name in self.casts:
            return self.readers.get(self.casts[name], []) == [self.producer[name]] and self.casts[name] not in self.outputs
        return True


def _outer_names(node: onnx.NodeProto) -> set[str]:
    """Names a control-flow node's subgraphs read from the enclosing scope (they count as reads)."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for sub in graphs:
            local = {i.name for i in sub.input} | {t.name for t in sub.initializer}
            for inner in sub.node:
                local.update(inner.output)
            for inner in sub.node:
                names.update(n for n in inner.input if n and n not in local)
                names.update(n for n in _outer_names(inner) if n not in local)
            names.update(o.name for o in sub.output if o.name not in local)
    return names


def _toposort(graph: onnx.GraphProto, producer: dict[str, int]) -> list[int]:
    """A topological order of the nodes (the file's own order need not be one)."""
    nodes = graph.node
    pending = []
    dependents: dict[int, list[int]] = {}
    for index, node in enumerate(nodes):
        deps = {producer[n] for n in list(node.input) + sorted(_outer_names(node)) if n in producer}
        deps.discard(index)
        pending.append(len(deps))
        for dep in deps:
            dependents.setdefault(dep, []).append(index)
    ready = [i for i, count in enumerate(pending) if count == 0]
    order: list[int] = []
    while ready:
        index = ready.pop(0)
        order.append(index)
        for dependent in dependents.get(index, []):
            pending[dependent] -= 1
            if pending[dependent] == 0:
                ready.append(dependent)
    if len(order) != len(nodes):
        raise ModelError("the graph has a cycle: its nodes cannot be ordered")
    return order


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _domain(node: onnx.NodeProto) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


def _weight_views(view: GraphView, name: str, user: int) -> tuple[str, int, list[tuple[str, bool]]]:
    """Follow at most one Cast and one Transpose from a weight input back to its initializer.

    Returns (initializer, the node reading it, [(view tensor, transposed relative to the initializer)]).
    """
    chain: list[tuple[str, str]] = []  # (tensor, op that produced it), user side first
    current, reader = name, user
    while current in view.producer and current not in view.store:
        index = view.producer[current]
        node = view.graph.node[index]
        if node.op_type in QUANTIZED:
            raise Decline(f"weight '{name}' is quantized ({node.op_type}); quantized weights are not pruned")
        ops = [op for _, op in chain]
        if _domain(node) or node.op_type not in ("Transpose", "Cast", "Identity") or node.op_type in ops:
            raise Decline(f"weight '{name}' is computed by {node.op_type}, not stored")
        if node.op_type == "Cast" and _attrs(node).get("to") not in FLOAT_TYPES:
            raise Decline(f"weight '{name}' is a Cast to a non-float type")
        if not view.readers.get(current, []) == [reader] or current in view.outputs:
            raise Decline(f"weight '{current}' is also read by another node")
        chain.append((current, node.op_type))
        current, reader = node.input[0], index
    flips = sum(op == "Transpose" for _, op in chain)
    views, seen = [], 0
    for tensor, op in chain:  # a view is transposed if an odd number of Transposes lie between it and the initializer
        views.append((tensor, (flips - seen) % 2 == 1))
        seen += op == "Transpose"
    return current, reader, views


def resolve_weight(view: GraphView, name: str, user: int, neuron_axis_in_use: int) -> WeightRef:
    """The stored matrix behind a weight input, or Decline with the reason it cannot be sliced."""
    if name in view.inputs:
        raise Decline(f"weight '{name}' is a graph input, not an initializer")
    stored, reader, views = _weight_views(view, name, user)
    if stored in view.inputs:
        raise Decline(f"weight '{stored}' is a graph input, not an initializer")
    if stored not in view.store:
        raise Decline(f"weight '{stored}' is not an initializer")
    transposes = [t for t, _ in views if view.graph.node[view.producer[t]].op_type == "Transpose"]
    if len(view.store.shape(stored)) != 2:
        if transposes:
            raise Decline(f"weight '{name}' is a Transpose that is not a 2-D matrix transpose")
        raise Decline(f"weight '{name}' has shape {list(view.store.shape(stored))}, not a 2-D matrix")
    for tensor, _ in views:
        node = view.graph.node[view.producer[tensor]]
        if node.op_type == "Transpose" and list(_attrs(node).get("perm", [1, 0])) != [1, 0]:
            raise Decline(f"weight '{name}' is a Transpose that is not a 2-D matrix transpose")
    if view.readers.get(stored, []) != [reader] or stored in view.outputs:
        others = [view.label(i) for i in view.readers.get(stored, []) if i != reader]
        raise Decline(f"weight initializer '{stored}' is also read by {', '.join(others) or 'a graph output'}")
    if list(view.graph.node[reader].input).count(stored) > 1:  # e.g. Gemm(W, W): slicing W would change the input too
        raise Decline(f"weight initializer '{stored}' is read more than once by {view.label(reader)}")
    _check_dtype(view, stored)
    axis = 1 - neuron_axis_in_use if transposes else neuron_axis_in_use
    return WeightRef(stored, axis, transposes[0] if transposes else None, tuple(views))


def _check_dtype(view: GraphView, name: str) -> None:
    dtype = view.store.dtype(name)
    if dtype not in FLOAT_TYPES:
        kind = helper.tensor_dtype_to_string(dtype).replace("TensorProto.", "")
        raise Decline(f"weight '{name}' has integer or quantized type {kind}; only float weights are pruned")


def _per_neuron(view: GraphView, name: str, size: int, user: int, what: str) -> tuple[str, int] | None:
    """(initializer, axis) if the constant holds one value per neuron, None if it broadcasts; else Decline."""
    if not view.is_static(name):
        raise Decline(f"{what} '{name}' is not a constant")
    shape = view.shape(name)
    if int(np.prod(shape, dtype=np.int64)) == 1:
        return None
    if shape[-1] != size or any(d != 1 for d in shape[:-1]):
        raise Decline(f"{what} '{name}' has shape {list(shape)}, not one value per neuron ({size})")
    if not view.sole_reader(name, user):
        raise Decline(f"{what} '{name}' is also read by another node")
    if view.dtype(name) not in FLOAT_TYPES:
        raise Decline(f"{what} '{name}' is not a float tensor")
    return (view.source(name), len(shape) - 1)


def _match_producer(view: GraphView, index: int) -> tuple[Producer, str, list[str]]:
    """The producer node's weights and the tensor its neurons come out on (after any bias Add)."""
    node = view.graph.node[index]
    label = view.label(index)
    if node.op_type == "Gemm":
        attrs = _attrs(node)
        if attrs.get("transA", 0):
            raise Decline("Gemm with transA=1 is not supported as a producer")
        trans_b = attrs.get("transB", 0)
        weight = resolve_weight(view, node.input[1], index, 0 if trans_b else 1)
        size = view.store.shape(weight.tensor)[weight.neuron_axis]
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias is not None:
            sliced = _per_neuron(view, bias, size, index, "bias")
            if sliced is None and not view.is_static(bias):
                raise Decline(f"bias '{bias}' is not a constant")
            if view.shape(bias) not in [(size,), (1, size), (1,), ()]:
                raise Decline(f"bias '{bias}' has shape {list(view.shape(bias))}, not 1-D")
            bias = view.source(bias)
        producer = Producer(index, label, node.input[0], weight, bias, None, attrs.get("alpha", 1.0), attrs.get("beta", 1.0))
        return producer, node.output[0], [node.output[0]]
    # MatMul with a stored right operand; an Add of a constant right after carries the bias.
    if node.input[1] not in view.store and node.input[1] not in view.producer and node.input[1] not in view.inputs:
        raise Decline(f"MatMul weight '{node.input[1]}' is not defined")
    weight = resolve_weight(view, node.input[1], index, 1)
    size = view.store.shape(weight.tensor)[weight.neuron_axis]
    out = node.output[0]
    readers = view.readers.get(out, [])
    if len(readers) == 1 and out not in view.outputs:
        add = view.graph.node[readers[0]]
        other = [n for n in add.input if n != out]
        if add.op_type == "Add" and not _domain(add) and len(other) == 1 and view.is_static(other[0]):
            _per_neuron(view, other[0], size, readers[0], "bias")
            producer = Producer(index, label, node.input[0], weight, view.source(other[0]), readers[0])
            return producer, add.output[0], [out, add.output[0]]
    return Producer(index, label, node.input[0], weight, None, None), out, [out]


def _consumer(view: GraphView, index: int, hidden: str, size: int) -> Consumer:
    node = view.graph.node[index]
    label = view.label(index)
    if _domain(node) or node.op_type not in ("Gemm", "MatMul"):
        raise Decline(f"hidden tensor '{hidden}' is read by {label} ({node.op_type}), which is not neuron-wise")
    if node.input[0] != hidden or hidden in node.input[1:]:
        raise Decline(f"{label} reads hidden tensor '{hidden}' as its weight operand, not on its reduction axis")
    attrs = _attrs(node)
    if node.op_type == "Gemm" and attrs.get("transA", 0):
        raise Decline(f"{label} is a Gemm with transA=1")
    trans_b = node.op_type == "Gemm" and attrs.get("transB", 0)
    weight = resolve_weight(view, node.input[1], index, 1 if trans_b else 0)
    if view.store.shape(weight.tensor)[weight.neuron_axis] != size:
        raise Decline(f"{label}'s weight does not match the hidden size {size}")
    return Consumer(index, label, weight, attrs.get("alpha", 1.0) if node.op_type == "Gemm" else 1.0)


def single_op_activation(view: GraphView, index: int, size: int) -> Step | None:
    node = view.graph.node[index]
    form = activations.SINGLE_OPS.get((_domain(node), node.op_type))
    if form is None:
        return None
    attrs = _attrs(node)
    name = form.variant(attrs) if form.variant else form.name
    inputs: list[np.ndarray | None] = [None]
    sliced: list[tuple[str, int]] = []
    for position, tensor in enumerate(node.input[1:], start=1):
        if not tensor:
            inputs.append(None)
            continue
        if position in form.per_neuron_inputs:
            axis = _per_neuron(view, tensor, size, index, f"{node.op_type} input")
            if axis is not None:
                sliced.append(axis)
        elif not view.is_static(tensor):
            raise Decline(f"{view.label(index)} ({node.op_type}) has a non-constant input '{tensor}'")
        inputs.append(view.constant(tensor, max_size=1 << 24))
    params = form.params(attrs, inputs)
    reason = form.check(params)
    if reason:
        raise Decline(f"{view.label(index)}: {reason} is not supported")
    act = activations.make(name, **params)
    bias = node.input[form.bias_input] if form.bias_input is not None and len(node.input) > form.bias_input else None
    bias = view.source(bias) if bias else None
    return Step(index, view.label(index), "activation", tuple(view.source(t) for t in node.input[1:] if t), tuple(sliced), act, bias=bias)


def _evaluable(view: GraphView, node: onnx.NodeProto) -> bool:
    """Whether a node is an elementwise op the subgraph evaluator understands."""
    if node.op_type == "Cast" and not _domain(node):
        return _attrs(node).get("to") in FLOAT_TYPES | {TensorProto.BOOL}
    if (_domain(node), node.op_type) in activations.SINGLE_OPS:
        return not activations.SINGLE_OPS[(_domain(node), node.op_type)].per_neuron_inputs
    return not _domain(node) and node.op_type in _SCALAR_OPS


def _evaluate(node: onnx.NodeProto, args: list[np.ndarray | None]) -> np.ndarray:
    if node.op_type == "Cast":
        return (args[0] != 0).astype(np.float64) if _attrs(node)["to"] == TensorProto.BOOL else args[0]
    form = activations.SINGLE_OPS.get((_domain(node), node.op_type))
    if form is not None:
        attrs = _attrs(node)
        name = form.variant(attrs) if form.variant else form.name
        return activations.make(name, **form.params(attrs, args))(args[0])
    return _SCALAR_OPS[node.op_type](*args)


def subgraph_activation(view: GraphView, start: str) -> tuple[Step, list[int], str] | None:
    """Recognise an activation an exporter spelled out as scalar ops, by evaluating it.

    The region is every node reachable from ``start`` through elementwise ops whose other
    operands are scalar constants; it must have a single exit. Its numpy value on a probe grid is
    compared with every ``activations.SUBGRAPH_FUNCTIONS`` entry up to a post-affine a·φ(x)+b,
    and the best fit is kept if it is within tolerance (looser for fp16/bf16 constants, which
    only hold the exporter's constants to their own precision).
    """
    region: list[int] = []
    known = {start}
    roundoff = 0.0
    changed = True
    while changed and len(region) <= _MAX_SUBGRAPH_NODES:
        changed = False
        for tensor in list(known):  # a copy: the loop body adds to `known`
            for index in view.readers.get(tensor, []):
                node = view.graph.node[index]
                if index in region or not _evaluable(view, node):
                    continue
                dynamic = [n for n in node.input if n in known]
                consts = [n for n in node.input if n and n not in known]
                if not dynamic or any(view.constant(n, max_size=1) is None for n in consts):
                    continue
                region.append(index)
                known.update(o for o in node.output if o)
                roundoff = max([roundoff] + [_ROUNDOFF.get(view.dtype(n), 0.0) for n in consts])
                changed = True
    if len(region) < 2 or len(region) > _MAX_SUBGRAPH_NODES:
        return None
    inside = set(region)
    exits = [t for t in known - {start} if t in view.outputs or any(r not in inside for r in view.readers.get(t, []))]
    if len(exits) != 1 or any(r not in inside for r in view.readers.get(start, [])):
        return None
    values = {start: _PROBE}
    ordered = sorted(region, key=view.order.index)
    for index in ordered:
        node = view.graph.node[index]
        args = [None if not n else values[n] if n in values else view.constant(n, max_size=1).reshape(()) for n in node.input]
        with np.errstate(all="ignore"):
            values[node.output[0]] = np.broadcast_to(_evaluate(node, args), _PROBE.shape)
    result = values[exits[0]]
    if not np.all(np.isfinite(result)):
        return None
    tolerance = max(_SUBGRAPH_TOLERANCE, 4.0 * roundoff) * (1.0 + np.max(np.abs(result)))
    best: tuple[float, Activation, float, float] | None = None
    for name, params in activations.SUBGRAPH_FUNCTIONS:
        act = activations.make(name, **params)
        basis = np.stack([act(_PROBE), np.ones_like(_PROBE)], axis=1)
        (scale, shift), *_ = np.linalg.lstsq(basis, result, rcond=None)
        error = float(np.max(np.abs(basis @ [scale, shift] - result)))
        if abs(scale) > 1e-9 and error <= tolerance and (best is None or error < best[0]):
            best = (error, act, float(np.round(scale, 9)), float(np.round(shift, 9)))
    if best is None:
        return None
    _, act, scale, shift = best
    label = "+".join(view.label(i) for i in ordered)
    step = Step(ordered[0], label, "activation", activation=act, post_scale=scale, post_shift=shift)
    return step, ordered, exits[0]


def _affine_step(view: GraphView, index: int, current: str, size: int, rank: int | None) -> Step | None:
    node = view.graph.node[index]
    label = view.label(index)
    if node.op_type == "BatchNormalization" and not _domain(node):
        if rank != 2:
            raise Decline(f"{label}: BatchNormalization normalises axis 1, which is the feature axis only for 2-D tensors")
        if len([o for o in node.output if o]) > 1:
            raise Decline(f"{label}: BatchNormalization in training mode")
        sliced = tuple(s for s in (_per_neuron(view, t, size, index, "BatchNormalization parameter") for t in node.input[1:5]) if s)
        tensors = tuple(view.source(t) for t in node.input[1:5])
        return Step(index, label, "batchnorm", tensors, sliced, attrs=(("epsilon", _attrs(node).get("epsilon", 1e-5)),))
    if node.op_type not in AFFINE_BINARY or _domain(node) or len(node.input) != 2:
        return None
    other = node.input[1] if node.input[0] == current else node.input[0]
    if other == current:
        return None  # x·x and the like: only a subgraph activation (the Gaussian) can use it
    if not view.is_static(other):
        return None  # a run-time operand: a residual, a gated FFN's product or something else (see _walk_steps)
    if rank is not None and len(view.shape(other)) > rank:
        raise Decline(f"{label}: constant '{other}' has more dimensions than the hidden tensor")
    sliced = _per_neuron(view, other, size, index, f"{node.op_type} constant")
    first = node.input[0] == current
    kind = {"Add": "shift", "Mul": "scale", "Sub": "shift_neg" if first else "rsub", "Div": "div" if first else None}[node.op_type]
    if kind is None:
        raise Decline(f"{label} divides a constant by the hidden tensor, which is not neuron-wise affine")
    return Step(index, label, kind, (view.source(other),), (sliced,) if sliced else ())


def _runtime_operand(view: GraphView, index: int, current: str) -> str | None:
    """The other operand of a binary arithmetic node if it is computed at run time, else None."""
    node = view.graph.node[index]
    if _domain(node) or node.op_type not in AFFINE_BINARY or len(node.input) != 2 or current not in node.input:
        return None
    other = node.input[1] if node.input[0] == current else node.input[0]
    return None if other == current or view.is_static(other) else other


@dataclass(frozen=True)
class _Walk:
    """Where a walk of neuron-wise steps stopped: at consumers, or at a product with a run-time tensor."""

    steps: list[Step]
    tensor: str  # the last tensor reached
    resized: list[str]
    gate: int | None = None  # the Mul node, when the walk stopped at one


def _walk_steps(view: GraphView, start: str, size: int, rank: int | None) -> _Walk:
    """Follow neuron-wise steps from a producer's output to its consumers, or to a gating Mul."""
    steps: list[Step] = []
    resized: list[str] = []
    current = start
    while True:
        if current in view.outputs:
            raise Decline(f"tensor '{current}' is a graph output")
        readers = view.readers.get(current, [])
        if not readers:
            raise Decline(f"tensor '{current}' is not read by any node")
        nodes = [view.graph.node[i] for i in readers]
        if all(n.op_type in ("Gemm", "MatMul") and not _domain(n) for n in nodes):
            return _Walk(steps, current, resized)
        step: Step | None = None
        next_tensor: str | None = None
        if len(readers) == 1:
            index = readers[0]
            node = nodes[0]
            if node.op_type in PASS_THROUGH and not _domain(node):
                mask = node.output[1] if node.op_type == "Dropout" and len(node.output) > 1 else ""
                if mask and (view.readers.get(mask) or mask in view.outputs):
                    raise Decline(f"{view.label(index)}: the Dropout mask is read")
                if mask:  # unread, but its declared shape has the feature axis too
                    resized.append(mask)
                if node.op_type == "Cast" and _attrs(node).get("to") not in FLOAT_TYPES:
                    raise Decline(f"{view.label(index)} casts the hidden tensor to a non-float type")
                step, next_tensor = Step(index, view.label(index), "pass"), node.output[0]
            else:
                other = _runtime_operand(view, index, current)
                if other is not None:
                    if node.op_type == "Mul":
                        return _Walk(steps, current, resized, gate=index)
                    if node.op_type == "Add":
                        raise Decline(
                            f"{view.label(index)} (Add) adds the run-time tensor '{other}' to the hidden tensor "
                            "(a residual connection): the sum's features are shared with that other path, "
                            "so they cannot be removed from this layer alone"
                        )
                    raise Decline(
                        f"{view.label(index)} ({node.op_type}) combines the hidden tensor with the run-time "
                        f"tensor '{other}', which is not a neuron-wise constant"
                    )
                step = _affine_step(view, index, current, size, rank) or single_op_activation(view, index, size)
                next_tensor = node.output[0] if step else None
        region: list[int] = []
        if step is None:
            found = subgraph_activation(view, current)
            if found is not None:
                step, region, next_tensor = found
        if step is None:
            outside = [i for i in readers if view.graph.node[i].op_type not in ("Gemm", "MatMul")] or readers
            layout = [i for i in outside if view.graph.node[i].op_type in LAYOUT_OPS and not _domain(view.graph.node[i])]
            if layout:
                first = view.graph.node[layout[0]]
                raise Decline(
                    f"tensor '{current}' is rearranged by {view.label(layout[0])} ({first.op_type}) before any "
                    "consumer: its features are regrouped (split into attention heads or into fused gate/up halves, "
                    "for example), so single "
                    "neurons cannot be removed"
                )
            labels = ", ".join(f"{view.label(i)} ({view.graph.node[i].op_type})" for i in outside)
            raise Decline(f"tensor '{current}' is read by {labels}, which is not a neuron-wise op between layers")
        if step.kind == "activation" and any(s.kind == "activation" for s in steps):
            raise Decline(f"two activations between producer and consumer ({steps[0].label}, {step.label})")
        steps.append(step)
        assert next_tensor is not None
        # A subgraph activation's intermediate tensors have the feature axis too.
        resized.extend(o for i in region for o in view.graph.node[i].output if o and o != next_tensor)
        resized.append(next_tensor)
        current = next_tensor


def _consumers(view: GraphView, walk: _Walk, size: int) -> tuple[Consumer, ...]:
    return tuple(_consumer(view, i, walk.tensor, size) for i in view.readers[walk.tensor])


def _match_chain(view: GraphView, index: int) -> Chain:
    producer, out, resized = _match_producer(view, index)
    size = view.store.shape(producer.weight.tensor)[producer.weight.neuron_axis]
    rank = 2 if view.graph.node[index].op_type == "Gemm" else view.ranks.get(producer.input)
    walk = _walk_steps(view, out, size, rank)
    if walk.gate is not None:
        return _match_gated(view, producer, walk, resized, size, rank)
    resized = resized + walk.resized
    resized += _cast_views(view, producer, walk.steps)
    return Chain(producer.label, producer, tuple(walk.steps), _consumers(view, walk, size), walk.tensor, tuple(resized), size)


def _cast_views(view: GraphView, producer: Producer, steps) -> list[str]:
    """Cast outputs of sliced per-neuron constants: their declared feature axis shrinks too."""
    sliced = {t for step in steps for t, _ in step.sliced}
    sliced |= {producer.bias} if producer.bias else set()
    return [alias for alias, source in view.casts.items() if source in sliced]


def _match_gated(view: GraphView, producer: Producer, walk: _Walk, resized: list[str], size: int, rank: int | None) -> Chain:
    """act(x·Wg) ⊙ (x·Wu) → Wd: the walk from the gate projection stopped at the product ``walk.gate``."""
    mul_index = walk.gate
    assert mul_index is not None
    mul = view.graph.node[mul_index]
    mul_label = view.label(mul_index)
    other = mul.input[1] if mul.input[0] == walk.tensor else mul.input[0]
    if not any(s.kind == "activation" for s in walk.steps):
        gate = _other_branch(view, producer, mul_index, other, size, rank)
        if gate is not None and any(s.kind == "activation" for s in gate[1].steps):
            raise Decline(
                f"the up projection of a gated FFN: it is pruned together with its gate projection "
                f"{gate[0].label}, never alone"
            )
        raise Decline(
            f"{mul_label} (Mul) multiplies the hidden tensor by the run-time tensor '{other}', and neither "
            "factor has an activation: not the gated-FFN form act(x·Wg) ⊙ (x·Wu)"
        )
    active = next(i for i, s in enumerate(walk.steps) if s.kind == "activation")
    for step in walk.steps[active + 1 :]:
        if step.kind not in ("pass", "scale", "div"):
            raise Decline(f"{step.label}: a {step.kind} step between the activation and the gating product {mul_label} is not supported")
    found = _other_branch(view, producer, mul_index, other, size, rank)
    if found is None:
        raise Decline(
            f"{mul_label} (Mul) multiplies the hidden tensor by the run-time tensor '{other}', which is not a "
            f"projection of the same input '{producer.input}' with {size} neurons: not the gated-FFN form "
            "act(x·Wg) ⊙ (x·Wu)"
        )
    up, up_walk, up_resized = found
    if any(s.kind == "activation" for s in up_walk.steps):
        raise Decline(f"{mul_label} (Mul) multiplies two activations ({walk.steps[active].label}, {up_walk.steps[0].label}); not supported")
    after = _walk_steps(view, mul.output[0], size, rank)
    if after.gate is not None:
        raise Decline(f"{view.label(after.gate)}: a second product with a run-time tensor after the gated FFN's {mul_label}")
    if any(s.kind == "activation" for s in after.steps):
        raise Decline(f"an activation after the gating product {mul_label} is not supported")
    sliced: list[tuple[str, int]] = [(up.weight.tensor, up.weight.neuron_axis)]
    if up.bias and int(np.prod(view.store.shape(up.bias), dtype=np.int64)) == size and size > 1:
        sliced.append((up.bias, len(view.store.shape(up.bias)) - 1))
    sliced += [s for step in up_walk.steps for s in step.sliced]
    gate_step = Step(mul_index, mul_label, "gate", (), tuple(sliced))
    steps = tuple(walk.steps) + (gate_step,) + tuple(after.steps)
    resized = resized + walk.resized + up_resized + up_walk.resized + [mul.output[0]] + after.resized
    resized += _cast_views(view, producer, steps) + _cast_views(view, up, up_walk.steps)
    return Chain(
        producer.label, producer, steps, _consumers(view, after, size), after.tensor, tuple(resized), size,
        multiplier=up, multiplier_steps=tuple(up_walk.steps),
    )


def _other_branch(
    view: GraphView, producer: Producer, mul_index: int, other: str, size: int, rank: int | None
) -> tuple[Producer, _Walk, list[str]] | None:
    """The projection of the same input whose neuron-wise walk ends at ``other``, the Mul's other factor."""
    for index in view.readers.get(producer.input, []):
        if index == producer.node or not _is_candidate(view, index):
            continue
        try:
            candidate, out, resized = _match_producer(view, index)
            if view.store.shape(candidate.weight.tensor)[candidate.weight.neuron_axis] != size:
                continue
            walk = _walk_steps(view, out, size, rank)
        except Decline:
            continue
        if walk.gate == mul_index and walk.tensor == other:
            return candidate, walk, resized
    return None


def _is_candidate(view: GraphView, index: int) -> bool:
    """Gemm/MatMul nodes whose right operand is a weight (stored, cast, transposed, quantized or an input)."""
    node = view.graph.node[index]
    if _domain(node) or node.op_type not in ("Gemm", "MatMul") or len(node.input) < 2:
        return False
    weight = node.input[1]
    for _ in range(3):
        if weight in view.store or weight in view.inputs:
            return True
        if weight not in view.producer:
            return False
        source = view.graph.node[view.producer[weight]]
        if source.op_type in QUANTIZED:
            return True
        if source.op_type not in ("Transpose", "Cast") or _domain(source):
            return False
        weight = source.input[0]
    return False


def find_chains(graph: onnx.GraphProto, store: WeightStore) -> tuple[list[Chain], list[Skipped]]:
    """Every prunable chain in topological order, and every near-miss with its reason."""
    view = GraphView(graph, store)
    chains: list[Chain] = []
    skipped: list[Skipped] = []
    for index in view.order:
        if not _is_candidate(view, index):
            if graph.node[index].op_type in QUANTIZED - {"DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear"}:
                skipped.append(Skipped(view.label(index), f"{graph.node[index].op_type} is quantized; not pruned"))
            continue
        try:
            chain = _match_chain(view, index)
        except Decline as reason:
            skipped.append(Skipped(view.label(index), str(reason)))
            continue
        chains.append(chain)
    # An up projection is reported only if its gated chain was not found (then its reason matters).
    covered = {c.multiplier.label for c in chains if c.multiplier is not None}
    skipped = [s for s in skipped if s.name not in covered]
    _check_subgraphs(graph, skipped)
    return chains, skipped


def _check_subgraphs(graph: onnx.GraphProto, skipped: list[Skipped]) -> None:
    """Layers inside If/Loop/Scan bodies are reported, never pruned."""
    for node in graph.node:
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                for inner in sub.node:
                    if inner.op_type in ("Gemm", "MatMul"):
                        skipped.append(
                            Skipped(inner.name or inner.op_type, f"inside the '{attr.name}' subgraph of {node.op_type} '{node.name}'; control-flow bodies are not pruned")
                        )
