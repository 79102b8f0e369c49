"""Read a chain's weights into the plain numpy form the coreset and the bounds work on.

Every neuron-wise affine step before the activation (BatchNorm, Mul/Add/Sub/Div by constants,
a BiasGelu bias) is folded into the neuron's point p_j = [w_j; b_j], so the neuron computes
    ψ_j(x) = post_scale_j · φ_j(w_j·x + b_j) + post_shift_j
and the consumers add Σ_j out_weights[i, j] · ψ_j(x). Nothing here writes to the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .activations import Activation
from .blockwise import column_abs_max, row_norms
from .chains import Chain, Step, WeightRef
from .io import WeightStore


@dataclass(frozen=True, eq=False)
class HiddenLayer:
    """One hidden layer: incoming points, activation, and outgoing weights of all consumers.

    Vectors are float64. ``weights`` and ``out_weights`` may be read-only views of the stored
    float32/float64 matrices (memory-mapped for external data) rather than float64 copies: a
    4096×16384 layer would otherwise cost 1 GiB of copies. Reductions over them go through
    :mod:`onnxcoreset.blockwise`, which converts a few MiB at a time: the math stays float64.
    """

    weights: np.ndarray  # [n, d]
    bias: np.ndarray  # [n]
    activation: Activation
    post_scale: np.ndarray  # [n]
    post_shift: np.ndarray  # [n]
    out_weights: np.ndarray  # [k, n], every consumer's rows stacked
    # A gated FFN's up projection [n, d] and bias [n]: ψ_j = post_scale_j·φ_j(w_j·x+b_j)·(v_j·x+c_j) + post_shift_j
    multiplier_weights: np.ndarray | None = None
    multiplier_bias: np.ndarray | None = None

    @property
    def size(self) -> int:
        return int(self.bias.size)

    @property
    def points(self) -> np.ndarray:
        point = [self.weights, self.bias[:, None]]
        if self.multiplier_weights is not None:
            point += [self.multiplier_weights, self.multiplier_bias[:, None]]
        return np.hstack(point)

    def hidden(self, x: np.ndarray) -> np.ndarray:
        """ψ(x) for inputs of shape [b, d]: the values the consumers read."""
        value = self.activation(x @ self.weights.T + self.bias)
        if self.multiplier_weights is not None:
            value = value * (x @ self.multiplier_weights.T + self.multiplier_bias)
        return self.post_scale * value + self.post_shift

    def output(self, x: np.ndarray) -> np.ndarray:
        """The consumers' contribution Σ_j w_i(j) ψ_j(x), shape [b, k]."""
        return self.hidden(x) @ self.out_weights.T

    @cached_property
    def weight_norms(self) -> np.ndarray:
        """‖w_j‖₂ per neuron in float64, computed once (the bounds need it several times)."""
        return row_norms(self.weights)

    @cached_property
    def out_weight_max(self) -> np.ndarray:
        """max_i |out_weights[i, j]| per neuron in float64, computed once (the sensitivities' first factor)."""
        return column_abs_max(self.out_weights)


def read_matrix(store: WeightStore, ref: WeightRef) -> np.ndarray:
    """The weight as float64 with hidden neurons on axis 0."""
    array = np.asarray(store.read(ref.tensor), dtype=np.float64)
    return array if ref.neuron_axis == 0 else array.T


def read_matrix_view(store: WeightStore, ref: WeightRef) -> np.ndarray:
    """The weight with hidden neurons on axis 0, without a copy when stored as float32/float64."""
    array = store.read(ref.tensor)
    if array.dtype not in (np.float32, np.float64):  # fp16/bf16: float64 copy, as read_matrix
        array = np.asarray(array, dtype=np.float64)
    return array if ref.neuron_axis == 0 else array.T


def _scaled(alpha: float, matrix: np.ndarray) -> np.ndarray:
    """alpha·matrix in float64; the matrix itself (no copy) when alpha is 1."""
    return matrix if alpha == 1.0 else alpha * np.asarray(matrix, dtype=np.float64)


def _per_neuron(store: WeightStore, tensor: str, n: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(store.read(tensor), dtype=np.float64).reshape(-1), (n,)).copy()


def _affine(step: Step, store: WeightStore, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, c) with step(t) = a·t + c, per neuron."""
    ones, zeros = np.ones(n), np.zeros(n)
    if step.kind == "pass":
        return ones, zeros
    if step.kind == "batchnorm":
        scale, shift, mean, var = (_per_neuron(store, t, n) for t in step.tensors)
        a = scale / np.sqrt(var + dict(step.attrs)["epsilon"])
        return a, shift - a * mean
    value = _per_neuron(store, step.tensors[0], n)
    return {
        "scale": (value, zeros),
        "shift": (ones, value),
        "shift_neg": (ones, -value),
        "rsub": (-ones, value),
        "div": (1.0 / value, zeros),
    }[step.kind]


def read_layer(chain: Chain, store: WeightStore) -> HiddenLayer:
    """The chain's current weights (as already rewritten by earlier chains) in HiddenLayer form."""
    producer = chain.producer
    n = chain.size
    weights = _scaled(producer.alpha, read_matrix_view(store, producer.weight))
    bias = producer.beta * _per_neuron(store, producer.bias, n) if producer.bias else np.zeros(n)
    post_scale, post_shift = np.ones(n), np.zeros(n)
    activation: Activation | None = None
    for step in chain.steps:
        if step.kind == "gate":  # the product with the up projection; only scales precede it (chains.py)
            continue
        if step.kind == "activation":
            activation = step.activation
            if step.bias:
                bias = bias + _per_neuron(store, step.bias, n)
            post_scale, post_shift = np.full(n, step.post_scale), np.full(n, step.post_shift)
            continue
        a, c = _affine(step, store, n)
        if activation is None:
            weights, bias = a[:, None] * weights, a * bias + c
        else:
            post_scale, post_shift = a * post_scale, a * post_shift + c
    outgoing = [_scaled(consumer.alpha, read_matrix_view(store, consumer.weight)).T for consumer in chain.consumers]
    out_weights = outgoing[0] if len(outgoing) == 1 else np.vstack(outgoing)  # vstack copies even one matrix
    up_weights, up_bias = _multiplier(chain, store)
    return HiddenLayer(
        weights, bias, activation or chain.activation, post_scale, post_shift, out_weights, up_weights, up_bias
    )


def _multiplier(chain: Chain, store: WeightStore) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A gated chain's up projection with its branch's affine steps folded in, as (v, c)."""
    up = chain.multiplier
    if up is None:
        return None, None
    n = chain.size
    weights = up.alpha * read_matrix(store, up.weight)
    bias = up.beta * _per_neuron(store, up.bias, n) if up.bias else np.zeros(n)
    for step in chain.multiplier_steps:
        a, c = _affine(step, store, n)
        weights, bias = a[:, None] * weights, a * bias + c
    return weights, bias
