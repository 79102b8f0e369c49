"""Apply a selection to a chain: slice weights, rescale the consumers, shrink declared shapes.

No sampling and no decisions here: given the kept neuron indices and one scale per kept
neuron, the producer's output rows, every per-neuron constant between producer and consumers,
and the consumers' input columns are sliced; the consumers' columns are multiplied by the
scales. Only initializers and value_info entries change; nodes are never added or removed.

Before:  h = φ(W x + b)                     y = U h          (W: n×d, U: k×n)
After:   h' = φ(W[K] x + b[K])              y' = (U[:, K] · diag(scale)) h'
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from .chains import FLOAT_TYPES, Chain, GraphView
from .coreset import Selection
from .io import WeightStore


def _take(store: WeightStore, tensor: str, kept: np.ndarray, axis: int, scale: np.ndarray | None = None) -> None:
    array = np.asarray(store.read(tensor))
    # Rows by indexing: np.take along axis 0 buffers a copy of the whole source (400 MB more for a
    # VGG-16 fc6 weight), indexing reads only the kept rows. Other axes: np.take, which is direct.
    sliced = array[kept] if axis % max(array.ndim, 1) == 0 else np.take(array, kept, axis=axis)
    if scale is not None and not np.all(scale == 1.0):
        shape = [1] * sliced.ndim
        shape[axis] = -1
        if sliced.dtype in (np.float16, np.float32, np.float64):
            # the float64 product, rounded once to the stored type, in place: no float64 copy
            np.multiply(sliced, scale.reshape(shape), out=sliced, casting="unsafe")
        else:
            sliced = sliced.astype(np.float64) * scale.reshape(shape)
    store.write(tensor, sliced)


def apply(chain: Chain, selection: Selection, store: WeightStore) -> None:
    """Rewrite the chain's tensors in ``store`` so that only the selected neurons remain."""
    kept = selection.kept
    _take(store, chain.producer.weight.tensor, kept, chain.producer.weight.neuron_axis)
    if chain.producer.bias and _is_per_neuron(store, chain.producer.bias, chain.size):
        _take(store, chain.producer.bias, kept, -1)
    for tensor, axis in dict.fromkeys(pair for step in chain.steps for pair in step.sliced):  # once each: a node
        _take(store, tensor, kept, axis)  # may read one tensor twice (BatchNormalization(x, m, t, m, v))
    for consumer in chain.consumers:
        _take(store, consumer.weight.tensor, kept, consumer.weight.neuron_axis, selection.scale)


def touched(chain: Chain) -> list[str]:
    """Every tensor :func:`apply` may rewrite for this chain, once each (a superset: a shared bias is
    listed); the pipeline counts a chain's parameters over these."""
    names = [chain.producer.weight.tensor] + ([chain.producer.bias] if chain.producer.bias else [])
    names += [tensor for step in chain.steps for tensor, _ in step.sliced]
    return list(dict.fromkeys(names + [consumer.weight.tensor for consumer in chain.consumers]))


def _is_per_neuron(store: WeightStore, tensor: str, size: int) -> bool:
    shape = store.shape(tensor)
    return int(np.prod(shape, dtype=np.int64)) == size and size > 1


def resize_shapes(graph: onnx.GraphProto, chain: Chain, new_size: int, store: WeightStore) -> None:
    """Shrink the feature axis of the chain's tensors, and the declared shapes of rewritten weights."""
    declared = {info.name: info for info in list(graph.value_info) + list(graph.input)}
    for name in chain.resized:
        info = declared.get(name)
        if info is None or not info.type.tensor_type.HasField("shape"):
            continue
        dims = info.type.tensor_type.shape.dim
        if dims and dims[-1].HasField("dim_value") and dims[-1].dim_value == chain.size:
            dims[-1].dim_value = new_size
    weights = [chain.producer.weight] + [c.weight for c in chain.consumers]
    weights += [chain.multiplier.weight] if chain.multiplier is not None else []
    shapes = {name: store.shape(name) for name in store.replaced}
    shapes.update({w.via_transpose: store.shape(w.tensor)[::-1] for w in weights if w.via_transpose})
    # Cast/Identity/Transpose outputs between a stored weight and its user (bf16 weights cast to float).
    shapes.update({v: store.shape(w.tensor)[::-1] if flipped else store.shape(w.tensor) for w in weights for v, flipped in w.views})
    for name, shape in shapes.items():
        info = declared.get(name)
        if info is None or not info.type.tensor_type.HasField("shape"):
            continue
        dims = info.type.tensor_type.shape.dim
        if len(dims) == len(shape):
            for dim, value in zip(dims, shape):
                dim.Clear()
                dim.dim_value = value


# ---------------------------------------------------------------------------------------------
# Refit consumers (least-squares compensation): new weights on the kept neurons, shifted biases


@dataclass(frozen=True)
class ConsumerBias:
    """A consumer's bias tensor that may be edited, or the reason it may not (tensor None)."""

    tensor: str | None
    factor: float = 1.0  # the bias enters the output multiplied by this (Gemm's beta)
    reason: str = ""


def consumer_biases(view: GraphView, chain: Chain) -> list[ConsumerBias]:
    """For each consumer, the bias its output adds: Gemm's C, or the constant of the one Add reading a
    MatMul's output. It must be a float initializer of one value per output that nothing else reads.

    Before:  y = U h + c                  After:  y = U' h_K + (c + δ)
    Conditions: c is per output ([k] or [1, k]) and read only here; otherwise δ cannot be written
    without adding nodes, and the least-squares fit of that consumer goes without it.
    """
    found = []
    for consumer in chain.consumers:
        node = view.graph.node[consumer.node]
        outputs = view.store.shape(consumer.weight.tensor)[1 - consumer.weight.neuron_axis]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            candidate, user, factor = node.input[2], consumer.node, float(attrs.get("beta", 1.0))
        else:
            readers = view.readers.get(node.output[0], [])
            add = view.graph.node[readers[0]] if len(readers) == 1 and node.output[0] not in view.outputs else None
            others = [] if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx") else [i for i in add.input if i != node.output[0]]
            if len(others) != 1:
                found.append(ConsumerBias(None, reason=f"{consumer.label} has no bias (no Gemm C, no Add of a constant after it)"))
                continue
            candidate, user, factor = others[0], readers[0], 1.0
        shape = view.store.shape(candidate) if view.is_static(candidate) else None
        if shape is None or int(np.prod(shape, dtype=np.int64)) != outputs or (len(shape) > 1 and any(d != 1 for d in shape[:-1])):
            found.append(ConsumerBias(None, reason=f"{consumer.label}'s bias '{candidate}' is not a constant with one value per output"))
        elif not view.sole_reader(candidate, user):
            found.append(ConsumerBias(None, reason=f"{consumer.label}'s bias '{candidate}' is also read elsewhere"))
        elif view.store.dtype(candidate) not in FLOAT_TYPES or factor == 0:
            found.append(ConsumerBias(None, reason=f"{consumer.label}'s bias '{candidate}' is not an editable float tensor"))
        else:
            found.append(ConsumerBias(candidate, factor))
    return found


def consumer_weights(chain: Chain, store: WeightStore, weights: np.ndarray) -> list[np.ndarray]:
    """The stored form of new consumer weights [k, |K|] (all consumers stacked, Gemm alpha included):
    one array per consumer, in its tensor's layout and dtype."""
    stored, start = [], 0
    for consumer in chain.consumers:
        rows = store.shape(consumer.weight.tensor)[1 - consumer.weight.neuron_axis]
        block = np.asarray(weights[start : start + rows], dtype=np.float64) / consumer.alpha  # [rows, |K|]
        start += rows
        layout = block.T if consumer.weight.neuron_axis == 0 else block
        dtype = np.asarray(store.read(consumer.weight.tensor)).dtype
        stored.append(np.ascontiguousarray(layout).astype(dtype))
    return stored


def rewrite_consumers(chain: Chain, store: WeightStore, weights: np.ndarray, bias_shift: np.ndarray,
                      biases: list[ConsumerBias]) -> None:
    """Write refit consumer weights (after :func:`apply` sliced them) and add δ to the editable biases.

    Before:  y = (U[:, K]·diag(scale)) h_K + c      After:  y = U' h_K + c + δ
    Formula: the stored weight is U'/alpha in the tensor's layout; the bias becomes c + δ/beta.
    """
    start = 0
    for consumer, stored, bias in zip(chain.consumers, consumer_weights(chain, store, weights), biases):
        rows = stored.shape[1 - consumer.weight.neuron_axis]
        store.write(consumer.weight.tensor, stored)
        shift = np.asarray(bias_shift[start : start + rows], dtype=np.float64)
        start += rows
        if bias.tensor is None or not np.any(shift):
            continue
        current = np.asarray(store.read(bias.tensor), dtype=np.float64)
        store.write(bias.tensor, current + (shift / bias.factor).reshape(current.shape))


def stored_refit(chain: Chain, store: WeightStore, weights: np.ndarray, bias_shift: np.ndarray,
                 biases: list[ConsumerBias]) -> tuple[np.ndarray, np.ndarray]:
    """(u, δ) as :func:`rewrite_consumers` will store them, rounded to the tensors' types, in float64:
    what the certificate must be computed on. δ is 0 for consumers without an editable bias."""
    rows, shifts, start = [], [], 0
    for consumer, stored, bias in zip(chain.consumers, consumer_weights(chain, store, weights), biases):
        matrix = stored.astype(np.float64)
        matrix = matrix.T if consumer.weight.neuron_axis == 0 else matrix
        rows.append(consumer.alpha * matrix)
        count = matrix.shape[0]
        shift = np.asarray(bias_shift[start : start + count], dtype=np.float64)
        start += count
        if bias.tensor is None or not np.any(shift):
            shifts.append(np.zeros(count))
            continue
        raw = np.asarray(store.read(bias.tensor))
        before = raw.astype(np.float64).reshape(-1)
        after = (before + shift / bias.factor).astype(raw.dtype).astype(np.float64)
        shifts.append(bias.factor * (after - before))
    return np.vstack(rows), np.concatenate(shifts)
