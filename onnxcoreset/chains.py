"""Find prunable hidden layers, read-only: producer -> neuron-wise ops -> consumer(s), or a reason.

A *chain* is a hidden layer whose neurons can be removed by slicing weights alone:

    X ─ Gemm/MatMul(+Add) ─ [Identity|Dropout|Cast|per-feature affine|BatchNorm]* ─ φ ─ [...]* ─┬─ Gemm/MatMul
                 producer                   neuron-wise steps                                 └─ Gemm/MatMul …
                                                                                                  consumers

Every tensor between producer and consumers must be read only inside the chain and must not be
a graph output; every weight must be a float initializer (or Constant, or Transpose of one) that
no other node reads. Anything else is reported as :class:`Skipped` with the reason, and the
graph is never modified here.
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
# Unary/binary elementwise ops an exporter uses to spell an activation out (evaluated in numpy).
_SCALAR_OPS = {
    "Add": lambda a, b: a + b,
    "Sub": lambda a, b: a - b,
    "Mul": lambda a, b: a * b,
    "Div": lambda a, b: a / b,
    "Pow": lambda a, b: np.power(a, b),
    "Max": np.maximum,
    "Min": np.minimum,
    "Erf": lambda a: activations._erf(a),
    "Tanh": np.tanh,
    "Sigmoid": lambda a: activations._sigmoid(a),
    "Exp": np.exp,
    "Log": np.log,
    "Neg": np.negative,
    "Sqrt": np.sqrt,
    "Abs": np.abs,
    "Relu": lambda a: np.maximum(a, 0.0),
    "Softplus": lambda a: activations._softplus(a),
    "Identity": lambda a: a,
}
_MAX_SUBGRAPH_NODES = 16
_PROBE = np.concatenate([np.linspace(-12.0, 12.0, 481), [-40.0, -25.0, 25.0, 40.0]])


@dataclass(frozen=True)
class WeightRef:
    """A matrix the chain reads: the stored tensor, and which of its axes indexes hidden neurons."""

    tensor: str
    neuron_axis: int
    via_transpose: str | None = None  # the Transpose output the user reads, if the weight goes through one


@dataclass(frozen=True)
class Step:
    """One neuron-wise node between producer and consumers.

    kind: ``pass`` (Identity, Dropout, Cast), ``scale``/``shift``/``rsub``/``rdiv`` (x·c, x+c,
    c−x, x/c with a per-neuron or scalar constant), ``batchnorm``, or ``activation``.
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
    """A prunable hidden layer. ``resized`` are the tensors whose feature axis shrinks."""

    name: str
    producer: Producer
    steps: tuple[Step, ...]
    consumers: tuple[Consumer, ...]
    hidden: str
    resized: tuple[str, ...]
    size: int

    @property
    def activation(self) -> Activation:
        for step in self.steps:
            if step.activation is not None:
                return step.activation
        return activations.IDENTITY

    @property
    def activation_label(self) -> str:
        return self.activation.name


@dataclass(frozen=True)
class Skipped:
    """A layer that looked prunable but is not, and why. It is left exactly as it was."""

    name: str
    reason: str


class Decline(Exception):
    """Raised inside matching to carry a reason; never escapes this module."""


@dataclass
class GraphView:
    """Read-only indexes over a graph: who produces and who reads each tensor."""

    graph: onnx.GraphProto
    store: WeightStore
    producer: dict[str, int] = field(default_factory=dict)
    readers: dict[str, list[int]] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)
    ranks: dict[str, int] = field(default_factory=dict)

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

    def label(self, index: int) -> str:
        node = self.graph.node[index]
        return node.name or f"{node.op_type}_{index}"

    def is_static(self, name: str) -> bool:
        """Stored in the model and not overridable at run time."""
        return name in self.store and name not in self.inputs

    def constant(self, name: str, max_size: int = 1 << 16) -> np.ndarray | None:
        if not name or not self.is_static(name):
            return None
        if int(np.prod(self.store.shape(name), dtype=np.int64)) > max_size:
            return None
        return np.asarray(self.store.read(name), dtype=np.float64)

    def sole_reader(self, name: str, index: int) -> bool:
        return self.readers.get(name, []) == [index] and name not in self.outputs


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


def resolve_weight(view: GraphView, name: str, user: int, neuron_axis_in_use: int) -> WeightRef:
    """The stored matrix behind a weight input, or Decline with the reason it cannot be sliced."""
    if name in view.inputs:
        raise Decline(f"weight '{name}' is a graph input, not an initializer")
    if name in view.producer and name not in view.store:
        producer = view.graph.node[view.producer[name]]
        if producer.op_type in QUANTIZED:
            raise Decline(f"weight '{name}' is quantized ({producer.op_type}); quantized weights are not pruned")
        if producer.op_type != "Transpose" or not view.is_static(producer.input[0]):
            raise Decline(f"weight '{name}' is computed by {producer.op_type}, not stored")
        stored = producer.input[0]
        perm = _attrs(producer).get("perm", [1, 0])
        if len(view.store.shape(stored)) != 2 or list(perm) != [1, 0]:
            raise Decline(f"weight '{name}' is a Transpose that is not a 2-D matrix transpose")
        if not view.sole_reader(name, user):
            raise Decline(f"weight '{name}' is also read by another node")
        if not view.sole_reader(stored, view.producer[name]):
            raise Decline(f"weight initializer '{stored}' is also read by another node")
        _check_dtype(view, stored)
        return WeightRef(stored, 1 - neuron_axis_in_use, name)
    if name not in view.store:
        raise Decline(f"weight '{name}' is not an initializer")
    if len(view.store.shape(name)) != 2:
        raise Decline(f"weight '{name}' has shape {list(view.store.shape(name))}, not a 2-D matrix")
    if not view.sole_reader(name, user):
        others = [view.label(i) for i in view.readers.get(name, []) if i != user]
        raise Decline(f"weight initializer '{name}' is also read by {', '.join(others) or 'a graph output'}")
    _check_dtype(view, name)
    return WeightRef(name, neuron_axis_in_use)


def _check_dtype(view: GraphView, name: str) -> None:
    dtype = view.store.dtype(name)
    if dtype not in FLOAT_TYPES:
        kind = helper.tensor_dtype_to_string(dtype).replace("TensorProto.", "")
        raise Decline(f"weight '{name}' has integer or quantized type {kind}; only float weights are pruned")


def _per_neuron(view: GraphView, name: str, size: int, user: int, what: str) -> tuple[str, int] | None:
    """(tensor, axis) if the constant holds one value per neuron, None if it broadcasts; else Decline."""
    if not view.is_static(name):
        raise Decline(f"{what} '{name}' is not a constant")
    shape = view.store.shape(name)
    if int(np.prod(shape, dtype=np.int64)) == 1:
        return None
    if shape[-1] != size or any(d != 1 for d in shape[:-1]):
        raise Decline(f"{what} '{name}' has shape {list(shape)}, not one value per neuron ({size})")
    if not view.sole_reader(name, user):
        raise Decline(f"{what} '{name}' is also read by another node")
    if view.store.dtype(name) not in FLOAT_TYPES:
        raise Decline(f"{what} '{name}' is not a float tensor")
    return (name, len(shape) - 1)


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
            if view.store.shape(bias) not in [(size,), (1, size), (1,), ()]:
                raise Decline(f"bias '{bias}' has shape {list(view.store.shape(bias))}, not 1-D")
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
        if add.op_type == "Add" and len(other) == 1 and view.is_static(other[0]):
            _per_neuron(view, other[0], size, readers[0], "bias")
            producer = Producer(index, label, node.input[0], weight, other[0], readers[0])
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
    name = form.name
    if node.op_type == "Gelu" and attrs.get("approximate", b"none") in (b"tanh", "tanh"):
        name = "gelu_tanh"
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
    act = activations.make(name, **form.params(attrs, inputs))
    bias = node.input[form.bias_input] if form.bias_input is not None and len(node.input) > form.bias_input else None
    return Step(index, view.label(index), "activation", tuple(node.input[1:]), tuple(sliced), act, bias=bias or None)


def subgraph_activation(view: GraphView, start: str) -> tuple[Step, list[int], str] | None:
    """Recognise an activation an exporter spelled out as scalar ops, by evaluating it.

    The region is every node reachable from ``start`` through elementwise ops whose other
    operands are scalar constants; it must have a single exit. Its numpy value on a probe grid is
    compared with ``activations.SUBGRAPH_FUNCTIONS`` up to a post-affine a·φ(x)+b.
    """
    region: list[int] = []
    known = {start}
    changed = True
    while changed and len(region) <= _MAX_SUBGRAPH_NODES:
        changed = False
        for tensor in list(known):
            for index in view.readers.get(tensor, []):
                node = view.graph.node[index]
                if index in region or _domain(node) or node.op_type not in _SCALAR_OPS:
                    continue
                dynamic = [n for n in node.input if n in known]
                consts = [n for n in node.input if n not in known]
                if not dynamic or any(view.constant(n, max_size=1) is None for n in consts):
                    continue
                region.append(index)
                known.update(node.output)
                changed = True
    if len(region) < 2 or len(region) > _MAX_SUBGRAPH_NODES:
        return None
    inside = set(region)
    exits = [t for t in known - {start} if t in view.outputs or any(r not in inside for r in view.readers.get(t, []))]
    if len(exits) != 1 or any(r not in inside for r in view.readers.get(start, [])):
        return None
    values = {start: _PROBE}
    for index in sorted(region, key=view.order.index):
        node = view.graph.node[index]
        args = [values[n] if n in values else view.constant(n, max_size=1).reshape(()) for n in node.input]
        with np.errstate(all="ignore"):
            values[node.output[0]] = np.broadcast_to(_SCALAR_OPS[node.op_type](*args), _PROBE.shape)
    result = values[exits[0]]
    for name, params in activations.SUBGRAPH_FUNCTIONS:
        act = activations.make(name, **params)
        basis = np.stack([act(_PROBE), np.ones_like(_PROBE)], axis=1)
        (scale, shift), *_ = np.linalg.lstsq(basis, result, rcond=None)
        if np.all(np.isfinite(result)) and np.max(np.abs(basis @ [scale, shift] - result)) <= 1e-6 * (1 + np.max(np.abs(result))):
            scale, shift = float(np.round(scale, 9)), float(np.round(shift, 9))
            label = "+".join(view.label(i) for i in sorted(region, key=view.order.index))
            step = Step(min(region, key=view.order.index), label, "activation", activation=act, post_scale=scale, post_shift=shift)
            return step, sorted(region, key=view.order.index), exits[0]
    return None


def _affine_step(view: GraphView, index: int, current: str, size: int, rank: int | None) -> Step | None:
    node = view.graph.node[index]
    label = view.label(index)
    if node.op_type == "BatchNormalization" and not _domain(node):
        if rank != 2:
            raise Decline(f"{label}: BatchNormalization normalises axis 1, which is the feature axis only for 2-D tensors")
        if len([o for o in node.output if o]) > 1:
            raise Decline(f"{label}: BatchNormalization in training mode")
        sliced = tuple(s for s in (_per_neuron(view, t, size, index, "BatchNormalization parameter") for t in node.input[1:5]) if s)
        return Step(index, label, "batchnorm", tuple(node.input[1:5]), sliced, attrs=(("epsilon", _attrs(node).get("epsilon", 1e-5)),))
    if node.op_type not in AFFINE_BINARY or _domain(node) or len(node.input) != 2:
        return None
    other = node.input[1] if node.input[0] == current else node.input[0]
    if other == current:
        raise Decline(f"{label} ({node.op_type}) combines the hidden tensor with itself")
    if not view.is_static(other):
        raise Decline(
            f"{label} ({node.op_type}) combines the hidden tensor with the non-constant '{other}' "
            "(a gated FFN or residual); this is not supported yet"
        )
    if rank is not None and len(view.store.shape(other)) > rank:
        raise Decline(f"{label}: constant '{other}' has more dimensions than the hidden tensor")
    sliced = _per_neuron(view, other, size, index, f"{node.op_type} constant")
    first = node.input[0] == current
    kind = {"Add": "shift", "Mul": "scale", "Sub": "shift_neg" if first else "rsub", "Div": "div" if first else None}[node.op_type]
    if kind is None:
        raise Decline(f"{label} divides a constant by the hidden tensor, which is not neuron-wise affine")
    return Step(index, label, kind, (other,), (sliced,) if sliced else ())


def _walk(view: GraphView, producer: Producer, start: str, resized: list[str], size: int, rank: int | None) -> Chain:
    """Follow neuron-wise steps from the producer's output to the consumers."""
    steps: list[Step] = []
    current = start
    while True:
        if current in view.outputs:
            raise Decline(f"tensor '{current}' is a graph output")
        readers = view.readers.get(current, [])
        if not readers:
            raise Decline(f"tensor '{current}' is not read by any node")
        nodes = [view.graph.node[i] for i in readers]
        if all(n.op_type in ("Gemm", "MatMul") and not _domain(n) for n in nodes):
            consumers = tuple(_consumer(view, i, current, size) for i in readers)
            return Chain(producer.label, producer, tuple(steps), consumers, current, tuple(resized), size)
        step: Step | None = None
        next_tensor: str | None = None
        if len(readers) == 1:
            index = readers[0]
            node = nodes[0]
            if node.op_type in PASS_THROUGH and not _domain(node):
                if node.op_type == "Dropout" and len([o for o in node.output if o]) > 1 and view.readers.get(node.output[1]):
                    raise Decline(f"{view.label(index)}: the Dropout mask is read")
                if node.op_type == "Cast" and _attrs(node).get("to") not in FLOAT_TYPES:
                    raise Decline(f"{view.label(index)} casts the hidden tensor to a non-float type")
                step, next_tensor = Step(index, view.label(index), "pass"), node.output[0]
            else:
                step = _affine_step(view, index, current, size, rank) or single_op_activation(view, index, size)
                next_tensor = node.output[0] if step else None
        if step is None:
            found = subgraph_activation(view, current)
            if found is not None:
                step, _, next_tensor = found
        if step is None:
            outside = [i for i in readers if view.graph.node[i].op_type not in ("Gemm", "MatMul")] or readers
            labels = ", ".join(f"{view.label(i)} ({view.graph.node[i].op_type})" for i in outside)
            raise Decline(f"tensor '{current}' is read by {labels}, which is not a neuron-wise op between layers")
        if step.kind == "activation" and any(s.kind == "activation" for s in steps):
            raise Decline(f"two activations between producer and consumer ({steps[0].label}, {step.label})")
        steps.append(step)
        assert next_tensor is not None
        resized.append(next_tensor)
        current = next_tensor


def _match_chain(view: GraphView, index: int) -> Chain:
    producer, out, resized = _match_producer(view, index)
    size = view.store.shape(producer.weight.tensor)[producer.weight.neuron_axis]
    rank = 2 if view.graph.node[index].op_type == "Gemm" else view.ranks.get(producer.input)
    return _walk(view, producer, out, resized, size, rank)


def _is_candidate(view: GraphView, index: int) -> bool:
    """Gemm/MatMul nodes whose right operand is a weight (stored, transposed, quantized or an input)."""
    node = view.graph.node[index]
    if _domain(node) or node.op_type not in ("Gemm", "MatMul") or len(node.input) < 2:
        return False
    weight = node.input[1]
    if weight in view.store or weight in view.inputs:
        return True
    if weight in view.producer:
        source = view.graph.node[view.producer[weight]]
        return source.op_type in QUANTIZED or (source.op_type == "Transpose" and source.input[0] in view.store)
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
