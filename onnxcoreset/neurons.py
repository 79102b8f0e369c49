"""Read a chain's weights into the plain numpy form the coreset and the bounds work on.

Every neuron-wise affine step before the activation (BatchNorm, Mul/Add/Sub/Div by constants,
a BiasGelu bias) is folded into the neuron's point p_j = [w_j; b_j], so the neuron computes
    ψ_j(x) = post_scale_j · φ_j(w_j·x + b_j) + post_shift_j
and the consumers add Σ_j out_weights[i, j] · ψ_j(x). Nothing here writes to the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .activations import Activation
from .chains import Chain, Step, WeightRef
from .io import WeightStore


@dataclass(frozen=True, eq=False)
class HiddenLayer:
    """One hidden layer in float64: incoming points, activation, and outgoing weights of all consumers."""

    weights: np.ndarray  # [n, d]
    bias: np.ndarray  # [n]
    activation: Activation
    post_scale: np.ndarray  # [n]
    post_shift: np.ndarray  # [n]
    out_weights: np.ndarray  # [k, n], every consumer's rows stacked

    @property
    def size(self) -> int:
        return int(self.bias.size)

    @property
    def points(self) -> np.ndarray:
        return np.hstack([self.weights, self.bias[:, None]])

    def hidden(self, x: np.ndarray) -> np.ndarray:
        """ψ(x) for inputs of shape [b, d]: the values the consumers read."""
        return self.post_scale * self.activation(x @ self.weights.T + self.bias) + self.post_shift

    def output(self, x: np.ndarray) -> np.ndarray:
        """The consumers' contribution Σ_j w_i(j) ψ_j(x), shape [b, k]."""
        return self.hidden(x) @ self.out_weights.T


def read_matrix(store: WeightStore, ref: WeightRef) -> np.ndarray:
    """The weight as float64 with hidden neurons on axis 0."""
    array = np.asarray(store.read(ref.tensor), dtype=np.float64)
    return array if ref.neuron_axis == 0 else array.T


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
    weights = producer.alpha * read_matrix(store, producer.weight)
    bias = producer.beta * _per_neuron(store, producer.bias, n) if producer.bias else np.zeros(n)
    post_scale, post_shift = np.ones(n), np.zeros(n)
    activation: Activation | None = None
    for step in chain.steps:
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
    outgoing = [consumer.alpha * read_matrix(store, consumer.weight).T for consumer in chain.consumers]
    return HiddenLayer(
        weights, bias, activation or chain.activation, post_scale, post_shift, np.vstack(outgoing)
    )
