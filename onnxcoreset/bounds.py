"""Sound ranges on the input ball: pre-activation intervals, activation sups, radii, error bounds.

For an input x with ‖x‖ ≤ r, neuron j's pre-activation w_j·x + b_j ranges over exactly
[b_j − r‖w_j‖, b_j + r‖w_j‖], so the activation's exact range there (activations.range_on)
gives sup |ψ_j| over the ball: that is the paper's sup_{‖x‖≤β} |φ(p_j·x)|, computed exactly.
"""

from __future__ import annotations

import numpy as np

from .neurons import HiddenLayer


def preactivation_interval(layer: HiddenLayer, radius: float) -> tuple[np.ndarray, np.ndarray]:
    half = radius * np.linalg.norm(layer.weights, axis=1)
    return layer.bias - half, layer.bias + half


def neuron_range(layer: HiddenLayer, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-neuron (min, max) of ψ_j over ‖x‖ ≤ radius."""
    lo, hi = layer.activation.range_on(*preactivation_interval(layer, radius))
    low = np.where(layer.post_scale >= 0, layer.post_scale * lo, layer.post_scale * hi) + layer.post_shift
    high = np.where(layer.post_scale >= 0, layer.post_scale * hi, layer.post_scale * lo) + layer.post_shift
    return low, high


def activation_sup(layer: HiddenLayer, radius: float) -> np.ndarray:
    """sup over the ball of |ψ_j|, per neuron."""
    low, high = neuron_range(layer, radius)
    return np.maximum(np.abs(low), np.abs(high))


def output_radius(layer: HiddenLayer, radius: float) -> float:
    """A sound bound on ‖ψ(x)‖₂ over the ball: the norm of the per-neuron sups.

    The layer passed in should be the pruned one, since that is what runs.
    """
    return float(np.linalg.norm(activation_sup(layer, radius)))


def interval_error_bound(coefficients: np.ndarray, low: np.ndarray, high: np.ndarray) -> float:
    """max_i sup |Σ_j c_ij ψ_j| given ψ_j ∈ [low_j, high_j]: interval arithmetic, term by term.

    Splitting positive and negative coefficients makes this never worse than the triangle
    inequality Σ_j |c_ij| sup|ψ_j|, and much tighter for one-signed activations such as ReLU.
    """
    positive = np.clip(coefficients, 0.0, None)
    negative = np.clip(coefficients, None, 0.0)
    upper = positive @ high + negative @ low
    lower = positive @ low + negative @ high
    return float(np.max(np.maximum(np.abs(upper), np.abs(lower)), initial=0.0))


def certified_bound(layer: HiddenLayer, kept: np.ndarray, scale: np.ndarray, radius: float) -> float:
    """A bound, valid for every ‖x‖ ≤ radius, on the change of every consumer pre-activation.

    The error of consumer neuron i is Σ_j c_ij ψ_j(x) with c_ij = w_i(j) − u_i(j), u the
    rescaled kept weights and u = 0 for dropped neurons.
    """
    new = np.zeros_like(layer.out_weights)
    new[:, kept] = layer.out_weights[:, kept] * scale
    low, high = neuron_range(layer, radius)
    return interval_error_bound(layer.out_weights - new, low, high)
