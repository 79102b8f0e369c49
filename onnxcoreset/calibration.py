"""Each chain's hidden values on calibration data or on data-free probes, for the data-aware methods.

Where the inputs come from:

* **calibration data**: ``--calibration data.npz``, the model's inputs keyed by input name, samples
  on axis 0 (a few hundred are enough);
* **probes of the input ball**: where every model input is a float tensor of known sample shape,
  points uniform in the ball of radius β of one sample, run through the model;
* **probes of the chain's input set**: otherwise (token ids), points drawn at the chain's input
  itself: uniform on the exact output set of a LayerNormalization feeding it, else uniform in the
  ball of the chain's radius.

For every chain the pipeline gets :class:`Samples`: h, the original network's hidden values
(captured once, before anything is pruned), and h', the values the network *as pruned so far*
computes: onnxruntime runs that network up to the chain's input (validate.capture), and the
chain's own layer is evaluated in numpy. Rows are samples, or tokens: with an integer attention
mask input ``[batch, sequence]``, rows at padding positions are left out.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import compensate, io
from .chains import Chain, GraphView
from .errors import UsageError
from .neurons import HiddenLayer

log = logging.getLogger(__name__)

BATCH = 256  # samples per onnxruntime call where the batch axis is free
MAX_ROWS = 20_000  # rows kept per chain (a random subset beyond): bounds memory and time
PROBES_PER_NEURON = 4  # data-free probes: max(MIN_PROBES, 4·n) for a layer of n neurons
MIN_PROBES = 4096
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
_PASS = ("Identity", "Dropout", "Cast")

DATA, BALL, CHAIN_SET = "calibration data", "probes of the input ball", "probes of the chain's input set"


@dataclass(frozen=True, eq=False)
class Samples:
    """One chain's hidden values on a set of inputs: h' (what runs now) and h (the original network)."""

    current: np.ndarray  # [N, n]
    original: np.ndarray  # [N, n]
    group: np.ndarray  # [N], the sample each row comes from (tokens of one sentence share it)
    source: str  # DATA, BALL or CHAIN_SET, with details

    @property
    def rows(self) -> int:
        return int(self.current.shape[0])

    def moments(self, out_weights: np.ndarray) -> compensate.Moments:
        """The refit's moments for consumers with weights ``out_weights`` [k, n]."""
        same = self.current is self.original
        return compensate.Moments.of(self.current, None if same else self.original, out_weights)

    def split(self, holdout: float, rng: np.random.Generator) -> tuple[Samples, Samples]:
        """(fit, held-out) parts, whole samples to one side, about ``holdout`` of them held out."""
        groups = np.unique(self.group)
        if groups.size < 2:
            return self, self
        chosen = rng.permutation(groups)[: max(1, int(round(holdout * groups.size)))]
        mask = np.isin(self.group, chosen)
        return self._subset(~mask), self._subset(mask)

    def _subset(self, mask: np.ndarray) -> Samples:
        same = self.current is self.original
        current = self.current[mask]
        return Samples(current, current if same else self.original[mask], self.group[mask], self.source)


# ---------------------------------------------------------------------------------------------
# Reading a calibration file and turning samples into feeds


def load(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The arrays of an .npz file by name (no pickles), or UsageError saying why not."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            data = {k: np.asarray(archive[k]) for k in archive.files}
    except Exception as exc:
        raise UsageError(f"--calibration {path}: not a readable .npz file ({str(exc).splitlines()[0][:200]})") from None
    if not data:
        raise UsageError(f"--calibration {path}: the file holds no arrays")
    for name, array in data.items():
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise UsageError(f"--calibration {path}: array '{name}' holds NaN or Inf")
    return data


def _runtime_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in graph.initializer}
    return [i for i in graph.input if i.name not in initializers]


def _declared_batch(info: onnx.ValueInfoProto) -> int | None:
    dims = info.type.tensor_type.shape.dim if info.type.tensor_type.HasField("shape") else []
    return int(dims[0].dim_value) if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None


def feeds_of(graph: onnx.GraphProto, data: Mapping[str, np.ndarray], what: str = "--calibration") -> list[dict[str, np.ndarray]]:
    """Split samples (axis 0 of every input) into feeds of the batch size the model accepts."""
    inputs = _runtime_inputs(graph)
    missing = [i.name for i in inputs if i.name not in data]
    if missing:
        raise UsageError(f"{what}: the file lacks model input(s) {', '.join(missing)} (arrays are keyed by input name)")
    arrays = {i.name: _as_declared(np.asarray(data[i.name]), i, what) for i in inputs}
    counts = {name: (a.shape[0] if a.ndim else 0) for name, a in arrays.items()}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise UsageError(f"{what}: every input needs the same number of samples on axis 0, got {counts}")
    total = next(iter(counts.values()))
    fixed = {b for b in (_declared_batch(i) for i in inputs) if b is not None}
    batch = fixed.pop() if len(fixed) == 1 else BATCH
    if total % batch and fixed:
        total -= total % batch  # a fixed batch axis cannot take the remainder
        if total == 0:
            raise UsageError(f"{what}: the model's batch axis is fixed at {batch}; give at least {batch} samples")
    return [{name: a[start : start + batch] for name, a in arrays.items()} for start in range(0, total, batch)]


def _as_declared(array: np.ndarray, info: onnx.ValueInfoProto, what: str) -> np.ndarray:
    """The array in the input's declared type when only the width differs (float64 for float32)."""
    declared = np.dtype(helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type))
    if array.dtype == declared:
        return array
    if (array.dtype.kind == "f") == (declared.kind == "f") and array.dtype.kind in "fiub" and declared.kind in "fiub":
        return array.astype(declared)
    raise UsageError(f"{what}: input '{info.name}' is {declared}, the file holds {array.dtype}")


def attention_mask(graph: onnx.GraphProto) -> str | None:
    """An integer or bool model input of rank 2 named like a mask (attention_mask): padding marker."""
    for info in _runtime_inputs(graph):
        tensor = info.type.tensor_type
        rank = len(tensor.shape.dim) if tensor.HasField("shape") else None
        if "mask" in info.name.lower() and tensor.elem_type not in _FLOAT_TYPES and rank == 2:
            return info.name
    return None


def ball_feeds(graph: onnx.GraphProto, beta: float, count: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]] | None:
    """``count`` samples uniform in the β ball of every model input, as feeds; None if an input is not a
    float tensor with a known sample shape (token ids, free sequence axes)."""
    inputs = _runtime_inputs(graph)
    shapes: dict[str, tuple[list[int], np.dtype]] = {}
    for info in inputs:
        tensor = info.type.tensor_type
        if tensor.elem_type not in _FLOAT_TYPES or not tensor.HasField("shape") or not tensor.shape.dim:
            return None
        dims = tensor.shape.dim
        rest = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims[1:]]
        if any(d is None for d in rest):
            return None
        shapes[info.name] = ([int(d) for d in rest], helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    if not shapes:
        return None
    samples = {
        name: compensate.ball(count, int(np.prod(rest, dtype=np.int64)), beta, rng).reshape([count, *rest]).astype(dtype)
        for name, (rest, dtype) in shapes.items()
    }
    return feeds_of(graph, samples, "probes")


# ---------------------------------------------------------------------------------------------
# The model as pruned so far, and the hidden values of every chain


def snapshot(loaded: io.LoadedModel) -> onnx.ModelProto:
    """A copy of the model with every replacement written so far and external data inline (runnable)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(loaded.model)
    store = loaded.store
    for tensor in copy.graph.initializer:
        if tensor.name in store.replaced or tensor.data_location == onnx.TensorProto.EXTERNAL:
            tensor.CopyFrom(numpy_helper.from_array(np.asarray(store.read(tensor.name)), tensor.name))
    for node in copy.graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] in store.replaced:
            for attr in node.attribute:
                if attr.name == "value":
                    attr.t.CopyFrom(numpy_helper.from_array(np.asarray(store.read(node.output[0])), node.output[0]))
    return copy


class Activations:
    """Inputs of one kind (calibration data or ball probes), and the original hidden values of every chain.

    Built before anything is pruned: the original model runs once on all inputs and the hidden
    tensor of every chain is kept (at most MAX_ROWS rows each).
    """

    def __init__(self, model: onnx.ModelProto, chains: Sequence[Chain], feeds: list[dict[str, np.ndarray]], source: str,
                 device: str = "auto") -> None:
        from .validate import capture

        self.feeds = feeds
        self.source = source
        self.device = device
        self.mask = attention_mask(model.graph)
        captured = capture(model, feeds, [c.hidden for c in chains], device)
        self.original = {name: self._rows(parts) for name, parts in captured.items()}

    def _rows(self, parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Stack per-feed tensors into rows [N, width] with the sample index of each; drop padding."""
        rows, groups, offset = [], [], 0
        for feed, value in zip(self.feeds, parts):
            value = np.asarray(value)
            width = value.shape[-1] if value.ndim else 1
            samples = value.shape[0] if value.ndim else 1
            flat = value.reshape(-1, width)
            group = np.repeat(offset + np.arange(samples), flat.shape[0] // max(samples, 1))
            mask = None if self.mask is None else np.asarray(feed.get(self.mask))
            if mask is not None and value.ndim >= 3 and tuple(value.shape[:2]) == tuple(mask.shape):
                keep = mask.reshape(-1) != 0
                flat, group = flat[keep], group[keep]
            rows.append(flat)
            groups.append(group)
            offset += samples
        data, group = np.concatenate(rows), np.concatenate(groups)
        if data.shape[0] > MAX_ROWS:
            chosen = np.sort(np.random.default_rng(data.shape[0]).choice(data.shape[0], MAX_ROWS, replace=False))
            data, group = data[chosen], group[chosen]
        return data, group

    def samples(self, chain: Chain, layer: HiddenLayer, current_model: onnx.ModelProto | None) -> Samples:
        """h' from ``current_model`` (the network pruned so far; None: nothing pruned yet) and h."""
        original, group = self.original[chain.hidden]
        if current_model is None:
            return Samples(original, original, group, self.source)
        from .validate import capture

        inputs, _ = self._rows(capture(current_model, self.feeds, [chain.producer.input], self.device)[chain.producer.input])
        current = _hidden(layer, inputs)
        return Samples(current, original, group, self.source)


def _hidden(layer: HiddenLayer, inputs: np.ndarray, chunk: int = 4096) -> np.ndarray:
    parts = [layer.hidden(np.asarray(inputs[s : s + chunk], dtype=np.float64)) for s in range(0, inputs.shape[0], chunk)]
    return np.concatenate(parts) if parts else np.zeros((0, layer.size))


def probe_count(n: int) -> int:
    return max(MIN_PROBES, PROBES_PER_NEURON * n)


def layernorm_before(view: GraphView, tensor: str) -> tuple[np.ndarray, np.ndarray, str] | None:
    """(γ, β, node label) of a LayerNormalization over the last axis that ``tensor`` is the output of,
    through Identity, Dropout and Cast; None otherwise."""
    for _ in range(16):
        index = view.producer.get(tensor)
        if index is None:
            return None
        node = view.graph.node[index]
        if node.op_type in _PASS and node.domain in ("", "ai.onnx"):
            tensor = node.input[0]
            continue
        if node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            return None
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), -1)
        rank = view.ranks.get(node.input[0])
        gamma = view.constant(node.input[1], max_size=1 << 22)
        shift = view.constant(node.input[2], max_size=1 << 22) if len(node.input) > 2 and node.input[2] else None
        if gamma is None or gamma.ndim > 1 or not (axis == -1 or (rank is not None and axis == rank - 1)):
            return None
        return gamma.reshape(-1), (np.zeros(gamma.size) if shift is None else shift.reshape(-1)), view.label(index)
    return None


def chain_probes(view: GraphView, chain: Chain, layer: HiddenLayer, radius: float, rng: np.random.Generator) -> Samples:
    """Data-free samples drawn at the chain's input: the LayerNormalization output set, else the ball."""
    count = probe_count(layer.size)
    dim = layer.weights.shape[1]
    norm = layernorm_before(view, chain.producer.input)
    if norm is not None and norm[0].size == dim:
        inputs = compensate.layernorm_outputs(count, norm[0], norm[1], rng)
        source = f"{CHAIN_SET}: the output set of {norm[2]}"
    else:
        inputs = compensate.ball(count, dim, radius, rng)
        source = f"{CHAIN_SET}: the ball of radius {radius:.4g}"
    hidden = _hidden(layer, inputs)
    return Samples(hidden, hidden, np.arange(count), source)


class Sources:
    """Where a model's chains get their samples: calibration data and/or data-free probes.

    Built before anything is pruned (the original hidden values are captured then); asked once
    per chain, in pruning order, with the chain's current layer.
    """

    def __init__(self, loaded: io.LoadedModel, chains: Sequence[Chain], *, beta: float,
                 data: Mapping[str, np.ndarray] | None, probes: bool, seed: int = 0, device: str = "auto") -> None:
        self.loaded = loaded
        self.view = GraphView(loaded.model.graph, loaded.store)
        self.want_probes = probes
        original = snapshot(loaded)
        self.data = Activations(original, chains, feeds_of(original.graph, data), DATA, device) if data else None
        self.ball: Activations | None = None
        if probes and chains:
            count = probe_count(max(c.size for c in chains))
            feeds = ball_feeds(original.graph, beta, count, np.random.default_rng([seed, 7]))
            if feeds is not None:
                self.ball = Activations(original, chains, feeds, f"{BALL} (radius {beta:g})", device)

    def samples(self, chain: Chain, layer: HiddenLayer, radius: float, rng: np.random.Generator,
                original: bool = False) -> tuple[Samples | None, Samples | None]:
        """(calibration samples, probe samples) of the chain; ``original``: on the unpruned network."""
        current = None
        if not original and self.loaded.store.replaced and (self.data is not None or self.ball is not None):
            current = snapshot(self.loaded)
        data = self.data.samples(chain, layer, current) if self.data is not None else None
        probes = None
        if self.want_probes:
            probes = self.ball.samples(chain, layer, current) if self.ball is not None else chain_probes(self.view, chain, layer, radius, rng)
        return data, probes
