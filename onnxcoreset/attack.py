"""The attained error: inputs in the ball where a pruned chain's error is actually large (numpy).

The certificate (bounds.certify) is an upper bound on max_i sup_{‖x‖≤r} |e_i(x)|; this module
looks for a lower bound on the same quantity, so that their ratio measures the certificate's
tightness. Projected gradient ascent on ±e_i for the consumer neurons most likely to be worst,
from many starts (random points on the sphere and inside, the points that drive single neurons
hardest, the gradient at the origin), plus random points inside and on the sphere. Every
candidate is finally evaluated with the exact activation, for all consumers, in float64.

The error is Σ_terms coefficients · ψ_term(x), so one term (layer, c) covers a pruned chain
planned here and two terms (original, W) and (pruned, −U) cover two models read back from files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

if TYPE_CHECKING:
    from .neurons import HiddenLayer

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@dataclass(frozen=True, eq=False)
class Term:
    """One summand of the error: ``coefficients`` [k, n] times the layer's hidden values ψ(x)."""

    layer: HiddenLayer
    coefficients: np.ndarray


@dataclass(frozen=True, eq=False)
class Attained:
    """The largest |e_i(x)| found, where, and the best points (for validation probes)."""

    value: float
    consumer: int
    points: np.ndarray  # [m, d], best first


def _erf_fast(x: np.ndarray) -> np.ndarray:
    """erf to 1.5e-7 (Abramowitz & Stegun 7.1.26): the search only needs directions, not digits."""
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


def _search_form(layer: HiddenLayer) -> tuple[Callable, Callable]:
    """(φ, φ') for the search: closed forms for ReLU and GELU (numpy has no vectorised erf; this
    one is good to 1.5e-7), central differences for the rest. Reported values never use these."""
    name = layer.activation.name
    if name == "relu":
        return (lambda t: np.maximum(t, 0.0)), (lambda t: (t > 0).astype(np.float64))
    if name == "gelu":
        def gelu(t):
            return 0.5 * t * (1.0 + _erf_fast(t * _SQRT_HALF))

        def slope(t):
            return 0.5 * (1.0 + _erf_fast(t * _SQRT_HALF)) + t * np.exp(-0.5 * t * t) * _INV_SQRT_2PI

        return gelu, slope
    phi = layer.activation

    def central(t):
        step = 1e-6 * (1.0 + np.abs(t))
        return (phi(t + step) - phi(t - step)) / (2.0 * step)

    return phi, central


def errors(terms: Sequence[Term], x: np.ndarray, exact: bool = True) -> np.ndarray:
    """e(x) for inputs [b, d]: shape [b, k]."""
    total = None
    for term in terms:
        layer = term.layer
        phi = layer.activation if exact else _search_form(layer)[0]
        value = phi(x @ layer.weights.T + layer.bias)
        if layer.multiplier_weights is not None:
            value = value * (x @ layer.multiplier_weights.T + layer.multiplier_bias)
        part = (layer.post_scale * value + layer.post_shift) @ term.coefficients.T
        total = part if total is None else total + part
    return total


def _gradient(terms: Sequence[Term], x: np.ndarray, rows: np.ndarray, signs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sign·e_row(x), its gradient) for each input row, with φ' by central differences."""
    value = np.zeros(x.shape[0])
    grad = np.zeros_like(x)
    for term in terms:
        layer = term.layer
        phi, derivative = _search_form(layer)
        coef = term.coefficients[rows] * (layer.post_scale * signs[:, None])
        t = x @ layer.weights.T + layer.bias
        activated, slope = phi(t), derivative(t)
        if layer.multiplier_weights is not None:
            gate = x @ layer.multiplier_weights.T + layer.multiplier_bias
            grad += (coef * slope * gate) @ layer.weights + (coef * activated) @ layer.multiplier_weights
            activated = activated * gate
        else:
            grad += (coef * slope) @ layer.weights
        value += np.sum(coef * activated, axis=1) + signs * (term.coefficients[rows] @ layer.post_shift)
    return value, grad


def ball_points(count: int, dim: int, radius: float, rng: np.random.Generator) -> np.ndarray:
    """``count`` points: even rows on the sphere of ``radius``, odd rows uniform inside the ball."""
    points = rng.standard_normal((count, dim))
    points /= np.maximum(np.linalg.norm(points, axis=1, keepdims=True), 1e-300)
    scale = np.where(np.arange(count) % 2 == 0, 1.0, rng.uniform(0.0, 1.0, count) ** (1.0 / max(dim, 1)))
    return points * (radius * scale)[:, None]


def _project(x: np.ndarray, radius: float) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x * np.minimum(1.0, radius / np.maximum(norms, 1e-300))


def _starts(terms: Sequence[Term], consumer: int, sign: float, radius: float, count: int, rng: np.random.Generator) -> np.ndarray:
    """Starting points for ascent on sign·e_consumer: the neurons it leans on hardest, the gradient at 0, random."""
    dim = terms[0].layer.weights.shape[1]
    chosen = []
    for term in terms:
        layer = term.layer
        lean = term.coefficients[consumer] * layer.post_scale * np.linalg.norm(layer.weights, axis=1)
        for j in np.argsort(-np.abs(lean))[:2]:
            direction = layer.weights[j] / max(np.linalg.norm(layer.weights[j]), 1e-300)
            chosen.append(sign * np.sign(lean[j]) * radius * direction)
    _, grad = _gradient(terms, np.zeros((1, dim)), np.array([consumer]), np.array([sign]))
    norm = np.linalg.norm(grad)
    if norm > 0:
        chosen.append(radius * grad[0] / norm)
    fixed = np.array(chosen[: max(count // 2, 1)]).reshape(-1, dim)
    return np.vstack([fixed, ball_points(max(count - len(fixed), 1), dim, radius, rng)])


def search(
    terms: Sequence[Term],
    radius: float,
    rng: np.random.Generator,
    *,
    consumers: Sequence[int] = (),
    worst: int = 4,
    starts: int = 16,
    steps: int = 100,
    random_points: int = 2048,
    keep_points: int = 64,
) -> Attained:
    """The largest |e_i(x)| found over ‖x‖ ≤ radius (see the module docstring).

    Ascent runs on ``consumers`` plus the ``worst`` consumers at the random points, both signs,
    with normalised steps from radius/2 shrinking geometrically to radius/200.
    """
    dim = terms[0].layer.weights.shape[1]
    if radius <= 0 or dim == 0:
        x = np.zeros((1, dim))
        e = np.abs(errors(terms, x))
        return Attained(float(e.max(initial=0.0)), int(np.argmax(e)) if e.size else 0, x)
    sample = ball_points(random_points, dim, radius, rng)
    sampled = np.abs(errors(terms, sample, exact=False))
    ranked = [int(i) for i in np.argsort(-sampled.max(axis=0))[:worst]]
    targets = list(dict.fromkeys([int(i) for i in consumers] + ranked))
    pairs = [(i, s) for i in targets for s in (1.0, -1.0)]
    blocks = [_starts(terms, i, s, radius, starts, rng) for i, s in pairs]
    x = np.vstack(blocks)
    rows = np.concatenate([np.full(len(b), i) for b, (i, _) in zip(blocks, pairs)])
    signs = np.concatenate([np.full(len(b), s) for b, (_, s) in zip(blocks, pairs)])
    best_value, _ = _gradient(terms, x, rows, signs)
    best = x.copy()
    for step in range(steps):
        size = radius * 0.5 * 0.01 ** (step / max(steps - 1, 1))
        value, grad = _gradient(terms, x, rows, signs)
        better = value > best_value
        best[better], best_value[better] = x[better], value[better]
        norms = np.linalg.norm(grad, axis=1, keepdims=True)
        flat = norms[:, 0] == 0
        if np.any(flat):  # a dead start: push it somewhere random
            grad[flat] = rng.standard_normal((int(flat.sum()), dim))
            norms[flat] = np.linalg.norm(grad[flat], axis=1, keepdims=True)
        x = _project(x + size * grad / norms, radius)
    value, _ = _gradient(terms, x, rows, signs)
    better = value > best_value
    best[better] = x[better]
    promising = sample[np.argsort(-sampled.max(axis=1))[:keep_points]]
    candidates = np.vstack([best, x, promising])
    exact = np.abs(errors(terms, candidates))
    worst_of_point = exact.max(axis=1)
    order = np.argsort(-worst_of_point)
    top = int(order[0])
    return Attained(float(worst_of_point[top]), int(np.argmax(exact[top])), candidates[order[:keep_points]])
