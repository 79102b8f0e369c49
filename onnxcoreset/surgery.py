"""Apply a selection to a chain: slice weights, rescale the consumers, shrink declared shapes.

No sampling and no decisions here: given the kept neuron indices and one scale per kept
neuron, the producer's output rows, every per-neuron constant between producer and consumers,
and the consumers' input columns are sliced; the consumers' columns are multiplied by the
scales. Only initializers and value_info entries change; nodes are never added or removed.

Before:  h = φ(W x + b)                     y = U h          (W: n×d, U: k×n)
After:   h' = φ(W[K] x + b[K])              y' = (U[:, K] · diag(scale)) h'
"""

from __future__ import annotations

import numpy as np
import onnx

from .chains import Chain
from .coreset import Selection
from .io import WeightStore


def _take(store: WeightStore, tensor: str, kept: np.ndarray, axis: int, scale: np.ndarray | None = None) -> None:
    array = np.asarray(store.read(tensor))
    sliced = np.take(array, kept, axis=axis)
    if scale is not None and not np.all(scale == 1.0):
        shape = [1] * sliced.ndim
        shape[axis] = -1
        sliced = sliced.astype(np.float64) * scale.reshape(shape)
    store.write(tensor, sliced)


def apply(chain: Chain, selection: Selection, store: WeightStore) -> None:
    """Rewrite the chain's tensors in ``store`` so that only the selected neurons remain."""
    kept = selection.kept
    _take(store, chain.producer.weight.tensor, kept, chain.producer.weight.neuron_axis)
    if chain.producer.bias and _is_per_neuron(store, chain.producer.bias, chain.size):
        _take(store, chain.producer.bias, kept, -1)
    for step in chain.steps:
        for tensor, axis in step.sliced:
            _take(store, tensor, kept, axis)
    for consumer in chain.consumers:
        _take(store, consumer.weight.tensor, kept, consumer.weight.neuron_axis, selection.scale)


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
    shapes = {name: store.shape(name) for name in store.replaced}
    shapes.update({w.via_transpose: store.shape(w.tensor)[::-1] for w in weights if w.via_transpose})
    for name, shape in shapes.items():
        info = declared.get(name)
        if info is None or not info.type.tensor_type.HasField("shape"):
            continue
        dims = info.type.tensor_type.shape.dim
        if len(dims) == len(shape):
            for dim, value in zip(dims, shape):
                dim.Clear()
                dim.dim_value = value
