"""The L2 radius of every chain's input rows, and the network-level bound where chains compose.

A chain's certificate holds on the ball ‖x‖ ≤ r of its input rows (the last axis, which its
producer multiplies). r is, in order of preference:

* **certified**: propagated from the model input's radius β through the graph by sound rules
  (:func:`tensor_radius`), on the pruned weights, since that is what runs;
* **measured**: the largest row norm of that tensor when the original model runs on a data file
  (validate.measure_row_norms), where the graph cannot be followed (attention, convolutions…);
* **assumed**: β itself, where neither applies. The certificate then holds only if it is right.

β is the L2 norm bound of one sample of the model input (all its non-batch axes), so it also
bounds every row of it: √784 = 28 for 28×28 images scaled to [0, 1], 255·√784 = 7140 for raw
0–255 pixels; ``--beta-from DATA.npz`` takes the largest sample norm in a data file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from . import activations, bounds
from .chains import Chain, GraphView

CERTIFIED, MEASURED, ASSUMED = "certified", "measured", "assumed"
_TRUST = {CERTIFIED: 0, MEASURED: 1, ASSUMED: 2}
_MAX_DEPTH = 64
_MAX_CONSTANT = 1 << 24  # elements read to propagate through a Gemm/MatMul (128 MiB as float64)
# Bounding ‖Wx + b‖ on the ball takes eigen-decompositions of the smaller Gram matrix of W, about
# min(n, d)²·max(n, d) operations: 1 s for a 1024×2048 weight, minutes for a deep stack of them,
# far more than reading the model. Past this many the radius is not propagated (β is assumed).
_MAX_PROPAGATION_COST = 1 << 28


@dataclass(frozen=True)
class Radius:
    """A radius, how much it can be trusted, and where it came from (one line for the report)."""

    value: float
    kind: str
    how: str


def _weakest(*kinds: str) -> str:
    return max(kinds, key=_TRUST.__getitem__)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _declared_dims(view: GraphView, name: str) -> list[int | None] | None:
    for info in list(view.graph.input) + list(view.graph.value_info) + list(view.graph.output):
        if info.name == name and info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            return [d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim]
    return None


def _row_length(view: GraphView, name: str) -> int | None:
    """The length of the tensor's last axis, from declared shapes or the weights that produce it."""
    dims = _declared_dims(view, name)
    if dims and dims[-1]:
        return int(dims[-1])
    index = view.producer.get(name)
    if index is None:
        return None
    node = view.graph.node[index]
    if node.op_type in ("Gemm", "MatMul") and len(node.input) > 1 and view.is_static(node.input[1]):
        shape = view.shape(node.input[1])
        if len(shape) == 2:
            trans = node.op_type == "Gemm" and _attrs(node).get("transB", 0)
            return int(shape[0] if trans else shape[1])
    if node.op_type in ("LayerNormalization",) and len(node.input) > 1 and view.is_static(node.input[1]):
        return int(np.prod(view.shape(node.input[1])))
    if node.op_type in ("Identity", "Dropout", "Cast", "Relu", "Add", "Sub", "Mul", "Div") or node.op_type in _UNARY:
        return _row_length(view, node.input[0]) if node.input else None
    return None


_UNARY = {op for (domain, op) in activations.SINGLE_OPS if domain == ""}


def _constant(view: GraphView, name: str) -> np.ndarray | None:
    return view.constant(name, max_size=_MAX_CONSTANT) if name else None


def _row_vector_norm(value: np.ndarray, n: int | None) -> float | None:
    """‖c‖ of a constant broadcast onto rows of length n: a scalar counts n times, a [.., n] row once."""
    if value.size == 1:
        return abs(float(value.reshape(-1)[0])) * math.sqrt(n) if n else None
    if value.ndim >= 1 and all(d == 1 for d in value.shape[:-1]) and (n is None or value.shape[-1] == n):
        return float(np.linalg.norm(value))
    return None


def _elementwise_scale(value: np.ndarray, n: int | None) -> float | None:
    """max|c| for a constant multiplying rows elementwise (scalar or one value per feature)."""
    if value.size == 1 or (value.ndim >= 1 and all(d == 1 for d in value.shape[:-1]) and (n is None or value.shape[-1] == n)):
        return float(np.max(np.abs(value)))
    return None


# Normalisations whose output row is γ ⊙ x̂ + β with ‖x̂‖ ≤ √n (x̂ = (x − mean)/√(var + ε), or x/√(mean x² + ε)
# for the RMS forms), whatever their input: op -> (index of γ, index of β or None).
_NORMS = {
    "LayerNormalization": (1, 2),
    "SkipLayerNormalization": (2, 3),
    "SimplifiedLayerNormalization": (1, None),
    "SkipSimplifiedLayerNormalization": (2, None),
    "RMSNormalization": (1, None),
}


def _via(how: str, step: str) -> str:
    """Where a radius came from, kept to one short line: its origin and the last step taken."""
    return f"{how.split(' → ', 1)[0]} → … → {step}" if " → " in how else f"{how} → {step}"


class _Stop(Exception):
    """Raised inside propagation with the reason the radius cannot be followed further."""


def tensor_radius(view: GraphView, tensor: str, beta: float, known: Mapping[str, Radius],
                  cache: dict[str, Radius | _Stop] | None = None) -> Radius:
    """A sound radius for every row of ``tensor``, or _Stop with the reason it cannot be found.

    Rules (r is the input's radius, n the row length):
    graph input: β; Identity/Dropout/Cast: r; Flatten(axis=1) or Reshape to [batch, -1] of a
    graph input or a 2-D tensor: r (rows stay samples); LayerNormalization (and its Skip/RMS
    forms) over the last axis: max|γ|·√n + ‖β_ln‖ whatever its input (‖x̂‖² = n·var/(var+ε) ≤ n,
    and n·ms/(ms+ε) ≤ n for RMS); Gemm/MatMul by a constant:
    sup‖Wx + b‖ (bounds.ball_affine_norm); Add/Sub of a constant c: r + ‖c‖; Mul/Div by a
    constant: max|c|·r, r/min|c|; Add of two tensors: r₁ + r₂; an activation op with φ(0) = 0
    and Lipschitz L: L·r, a bounded one: √n·sup|φ|, otherwise L·r + √n·|φ(0)|.
    """
    return _radius(view, tensor, beta, known, 0, {} if cache is None else cache)


def _radius(view: GraphView, tensor: str, beta: float, known: Mapping[str, Radius], depth: int,
            seen: dict[str, Radius | _Stop]) -> Radius:
    """_propagate, remembered per tensor: residual branches meet again, and must not be walked twice."""
    if tensor not in seen:
        try:
            seen[tensor] = _propagate(view, tensor, beta, known, depth, seen)
        except _Stop as stop:
            seen[tensor] = stop
    result = seen[tensor]
    if isinstance(result, _Stop):
        raise result
    return result


def _propagate(view: GraphView, tensor: str, beta: float, known: Mapping[str, Radius], depth: int,
               seen: dict[str, Radius | _Stop]) -> Radius:
    if depth > _MAX_DEPTH:
        raise _Stop("the path back to the model input is too long")
    if tensor in known:
        return known[tensor]
    if tensor in view.inputs and not view.is_static(tensor):
        return Radius(beta, CERTIFIED, "model input (β)")
    index = view.producer.get(tensor)
    if index is None:
        raise _Stop(f"'{tensor}' has no producer")
    node = view.graph.node[index]
    op, label = node.op_type, view.label(index)
    domain = node.domain if node.domain not in ("", "ai.onnx") else ""

    def upstream(name: str) -> Radius:
        return _radius(view, name, beta, known, depth + 1, seen)

    def derived(value: float, source: Radius) -> Radius:
        return Radius(value, source.kind, _via(source.how, f"{label} ({op})"))

    n = _row_length(view, tensor)
    if domain == "" and op in ("Identity", "Dropout"):
        return upstream(node.input[0])
    if domain == "" and op == "Cast" and _attrs(node).get("to") in (1, 10, 11, 16):
        return upstream(node.input[0])
    if domain == "" and op in ("Flatten", "Reshape"):
        source = node.input[0]
        per_sample = (source in view.inputs and not view.is_static(source)) or view.ranks.get(source) == 2
        if op == "Flatten":
            ok = _attrs(node).get("axis", 1) == 1
        else:
            shape = _constant(view, node.input[1]) if len(node.input) > 1 else None
            ok = shape is not None and shape.dtype.kind in "iu" and shape.size == 2 and shape[0] == 0 and shape[1] == -1
        if ok and per_sample:
            return upstream(source)
        raise _Stop(f"{label} ({op}) may mix samples into rows")
    if op in _NORMS and tensor == node.output[0]:
        gamma_at, shift_at = _NORMS[op]
        attrs = _attrs(node)
        rank = view.ranks.get(node.input[0])
        last_axis = op.startswith("Skip") or attrs.get("axis", -1) == -1 or (rank is not None and attrs.get("axis") == rank - 1)
        gamma = _constant(view, node.input[gamma_at]) if len(node.input) > gamma_at else None
        shift = np.zeros(1)
        if shift_at is not None and len(node.input) > shift_at and node.input[shift_at]:
            shift = _constant(view, node.input[shift_at])
        size = None if gamma is None else (gamma.size if gamma.size > 1 else n)
        if last_axis and gamma is not None and shift is not None and size:
            shift_norm = float(np.linalg.norm(shift)) if shift.size > 1 else abs(float(shift.reshape(-1)[0])) * math.sqrt(size)
            value = float(np.max(np.abs(gamma))) * math.sqrt(size) + shift_norm
            return Radius(value, CERTIFIED, f"{op} {label} (γ, β)")
        raise _Stop(f"{label} ({op}) normalises other axes or has non-constant γ, β")
    if domain == "" and op in ("Gemm", "MatMul") and len(node.input) > 1 and view.is_static(node.input[1]):
        shape = view.store.shape(node.input[1])
        if len(shape) == 2 and min(shape) ** 2 * max(shape) > _MAX_PROPAGATION_COST:
            raise _Stop(f"{label} ({op}): its {shape[0]}×{shape[1]} weight is too large to bound its norm quickly")
        weight = _constant(view, node.input[1])
        attrs = _attrs(node)
        if weight is not None and weight.ndim == 2 and not attrs.get("transA", 0):
            matrix = weight if (op == "Gemm" and attrs.get("transB", 0)) else weight.T  # [out, in]
            matrix = matrix * (attrs.get("alpha", 1.0) if op == "Gemm" else 1.0)
            bias = np.zeros(matrix.shape[0])
            if op == "Gemm" and len(node.input) > 2 and node.input[2]:
                c = _constant(view, node.input[2])
                if c is None or c.size not in (1, matrix.shape[0]):
                    raise _Stop(f"{label} (Gemm) has a bias that is not one value per output")
                bias = np.broadcast_to(c.reshape(-1), (matrix.shape[0],)) * attrs.get("beta", 1.0)
            source = upstream(node.input[0])
            return derived(bounds.ball_affine_norm(matrix, np.asarray(bias, np.float64), source.value), source)
    if domain == "" and op in ("Add", "Sub", "Mul", "Div") and len(node.input) == 2:
        constants = [_constant(view, name) for name in node.input]
        if constants[0] is None and constants[1] is None:
            if op != "Add" and op != "Sub":
                raise _Stop(f"{label} ({op}) multiplies two tensors")
            first, second = upstream(node.input[0]), upstream(node.input[1])
            return Radius(first.value + second.value, _weakest(first.kind, second.kind), _via(first.how, f"{label} (Add of two paths)"))
        if constants[0] is not None and constants[1] is not None:
            raise _Stop(f"{label} ({op}) is constant")
        position = 0 if constants[0] is None else 1
        value = constants[1 - position]
        source = upstream(node.input[position])
        if op in ("Add", "Sub"):
            norm = _row_vector_norm(value, n)
            if norm is not None:
                return derived(source.value + norm, source)
        elif op == "Mul":
            scale = _elementwise_scale(value, n)
            if scale is not None:
                return derived(scale * source.value, source)
        elif position == 0 and np.all(value != 0):
            scale = _elementwise_scale(1.0 / value, n)
            if scale is not None:
                return derived(scale * source.value, source)
        raise _Stop(f"{label} ({op}) by a constant that is not per feature")
    form = activations.SINGLE_OPS.get((domain, op))
    if form is not None and all(not name or view.is_static(name) for name in node.input[1:]) and form.bias_input is None:
        inputs = [None] + [_constant(view, name) if name else None for name in node.input[1:]]
        try:
            act = activations.make(form.name, **form.params(_attrs(node), inputs))
        except Exception:  # parameters this module cannot read: say so rather than guess
            raise _Stop(f"{label} ({op}) has parameters that cannot be read") from None
        source = upstream(node.input[0])
        candidates = []
        at_zero = float(np.max(np.abs(act(np.zeros(1)))))
        if math.isfinite(act.lipschitz):
            if act.zero_at_zero:
                candidates.append(act.lipschitz * source.value)
            elif n:
                candidates.append(act.lipschitz * source.value + math.sqrt(n) * at_zero)
        if act.bounded_by is not None and n:
            candidates.append(math.sqrt(n) * act.bounded_by)
        if candidates:
            return derived(min(candidates), source)
        raise _Stop(f"{label} ({op}) is neither Lipschitz nor bounded with a known row length")
    raise _Stop(f"{label} ({op}) is not propagated")


def chain_radius(
    view: GraphView,
    tensor: str,
    beta: float,
    known: Mapping[str, Radius],
    measured: Mapping[str, float] | None = None,
    measured_from: str = "data",
    cache: dict[str, Radius | _Stop] | None = None,
) -> Radius:
    """The radius a chain reading ``tensor`` is certified on: certified, else measured, else assumed.

    ``cache`` (one dict for all chains of a model, pruned in topological order) keeps the radii
    already propagated: they are radii of ancestors of earlier chains' inputs, which no later
    pruning changes (a later chain's weights are never upstream of an earlier chain's input), so a
    deep residual stack costs one spectral norm per weight instead of one per weight per chain.
    """
    try:
        return tensor_radius(view, tensor, beta, known, cache)
    except _Stop as stop:
        if measured and tensor in measured:
            return Radius(float(measured[tensor]), MEASURED, f"measured on {measured_from}; {stop}")
        return Radius(beta, ASSUMED, f"assumed β; {stop}")


def input_radius(view: GraphView, tensor: str, beta: float, known: Mapping[str, float]) -> tuple[float, bool]:
    """(radius, certified) with ``known`` hidden radii as plain numbers (the older interface)."""
    radius = chain_radius(view, tensor, beta, {k: Radius(v, CERTIFIED, "known") for k, v in known.items()})
    return radius.value, radius.kind == CERTIFIED


# ---------------------------------------------------------------------------------------------
# Network-level bound


@dataclass(frozen=True)
class ChainLink:
    """What composing a chain's error with the others needs."""

    name: str
    producer_node: int
    producer_input: str
    consumer_nodes: tuple[int, ...]
    error: float  # certified bound on every consumer output coordinate (L∞)
    gain: float  # max_i Σ_j |U_ij·a_j|·L: how an error δ on the producer's output reaches the consumers
    composable: str | None  # None, or why an upstream error cannot be pushed through this chain


def error_gain(out_weights: np.ndarray, post_scale: np.ndarray, lipschitz: float) -> float:
    """max_i Σ_j |U_ij a_j|·L: |Σ_j U_ij a_j (φ(t_j) − φ(t'_j))| ≤ that · max_j |t_j − t'_j|."""
    if not math.isfinite(lipschitz):  # a jump (binary step): no finite gain, and 0·inf would give NaN
        return math.inf
    return float(np.max(np.abs(out_weights * post_scale) @ np.full(out_weights.shape[1], lipschitz), initial=0.0))


def composable(chain: Chain) -> str | None:
    """None if an error on the producer's output enters φ unchanged, else the reason it does not."""
    if chain.multiplier is not None:
        return "a gated chain"
    for step in chain.steps:
        if step.kind == "activation":
            return None
        if step.kind != "pass":
            return f"{step.label} scales the pre-activation"
    return None


def _passes_to_output(view: GraphView, tensor: str) -> str | None:
    """The graph output a tensor reaches through Identity nodes or constant Adds only, if any."""
    for _ in range(_MAX_DEPTH):
        if tensor in view.outputs:
            return tensor
        readers = view.readers.get(tensor, [])
        if len(readers) != 1:
            return None
        node = view.graph.node[readers[0]]
        others = [name for name in node.input if name != tensor]
        if node.op_type == "Identity" or (node.op_type == "Add" and len(others) == 1 and view.is_static(others[0])):
            tensor = node.output[0]
            continue
        return None
    return None


def network_bound(view: GraphView, links: Sequence[ChainLink]) -> tuple[dict[str, float] | None, str]:
    """Per graph output, a certified L∞ bound on its change, when the chains form one sequence.

    Chain k+1's producer is chain k's consumer, so chain k's error δ_k on that output is an error
    on chain k+1's pre-activations; through Lipschitz φ it moves the consumers by ≤ gain·δ_k,
    while chain k+1's own certificate covers the rest (its ball is propagated through the pruned
    chain k). So δ_{k+1} ≤ ε_{k+1} + gain_{k+1}·δ_k, starting from a chain that reads the model
    input, and the last consumer must reach a graph output through Identity or constant Adds.
    Returns (bounds, "") or (None, the reason no bound can be given).
    """
    if not links:
        return None, "no chain was pruned"
    first = links[0]
    if not (first.producer_input in view.inputs and not view.is_static(first.producer_input)):
        return None, f"the first chain {first.name} does not read the model input directly"
    error = first.error
    for previous, link in zip(links, links[1:]):
        if previous.consumer_nodes != (link.producer_node,):
            return None, f"chain {link.name} is not fed by chain {previous.name} alone"
        if link.composable is not None:
            return None, f"chain {link.name}: {link.composable}"
        error = link.error + link.gain * error
    last = links[-1]
    if len(last.consumer_nodes) != 1:
        return None, f"chain {last.name} has several consumers"
    output = _passes_to_output(view, view.graph.node[last.consumer_nodes[0]].output[0])
    if output is None:
        return None, f"the output of chain {last.name}'s consumer goes through further layers"
    return {output: error}, ""


# ---------------------------------------------------------------------------------------------
# β from data


def largest_sample_norm(graph: onnx.GraphProto, data: Mapping[str, np.ndarray]) -> float:
    """The largest L2 norm of one sample (all non-batch axes) over the float model inputs in ``data``.

    With several float inputs a sample's norm is taken over all of them together. Raises
    ValueError when ``data`` holds none of the model's float inputs.
    """
    initializers = {t.name for t in graph.initializer}
    floats = [
        i.name for i in graph.input
        if i.name not in initializers and i.type.tensor_type.elem_type in (1, 10, 11, 16) and i.name in data
    ]
    if not floats:
        raise ValueError("it holds none of the model's float inputs")
    squares = None
    for name in floats:
        array = np.asarray(data[name], dtype=np.float64)
        rows = array.reshape(array.shape[0], -1) if array.ndim > 1 else array.reshape(-1, 1)
        part = np.einsum("ij,ij->i", rows, rows)
        squares = part if squares is None else squares + part
    return float(np.sqrt(np.max(squares, initial=0.0)))
