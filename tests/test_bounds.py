"""The certificate (bounds.certify) against everything that can attack it, on weights alone.

The soundness test is the one that must never be weakened: on random small chains, for every
activation in the registry and every selection method, no probe point and no adversarial search
may find an error above the certified bound, consumer by consumer. Both sides are float64 on the
same weights; the certificate carries its own documented slack (1e-9 of the triangle bound), so
the comparison here has none.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxcoreset import activations, attack, bounds, coreset
from onnxcoreset.neurons import HiddenLayer

# Parameters for registry entries that need them (the ONNX defaults where there are some).
PARAMS = {
    "leaky_relu": {"alpha": 0.1},
    "prelu": {"slope": -0.25},
    "thresholded_relu": {"alpha": 1.0},
    "elu": {"alpha": 1.0},
    "selu": {"alpha": 1.6732632, "gamma": 1.0507010},
    "celu": {"alpha": 1.0},
    "hard_sigmoid": {"alpha": 0.2, "beta": 0.5},
    "clip": {"min": -1.0, "max": 6.0},
    "quick_gelu": {"alpha": 1.702},
    "step": {"at_zero": 0.0},
}
ACTIVATIONS = sorted(activations.REGISTRY)


def activation(name: str) -> activations.Activation:
    return activations.make(name, **PARAMS.get(name, {}))


def random_layer(rng, name, d, n, k, gated=False, scale=1.0) -> HiddenLayer:
    act = activation(name)
    if name == "prelu":  # one slope per neuron, some negative
        act = act.with_params(slope=rng.uniform(-0.5, 0.5, n))
    return HiddenLayer(
        scale * rng.standard_normal((n, d)),
        rng.standard_normal(n),
        act,
        rng.choice([-1.5, -0.5, 0.7, 1.0, 2.0], n),
        0.3 * rng.standard_normal(n),
        rng.standard_normal((k, n)),
        rng.standard_normal((n, d)) / math.sqrt(d) if gated else None,
        rng.standard_normal(n) if gated else None,
    )


def selection_coefficients(layer, method, fraction, radius, rng):
    sensitivity = coreset.sensitivities(layer.out_weights, bounds.activation_sup(layer, radius))
    target = coreset.target_count(layer.size, fraction)
    norms = np.linalg.norm(layer.points, axis=1)
    chosen = coreset.select(method, sensitivity=sensitivity, point_norms=norms, target=target, rng=rng)
    return bounds.coefficients(layer.out_weights, chosen.kept, layer.out_weights[:, chosen.kept] * chosen.scale)


@pytest.mark.parametrize("name", ACTIVATIONS)
@settings(max_examples=8, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**32 - 1),
    d=st.integers(1, 5),
    n=st.integers(1, 10),
    k=st.integers(1, 4),
    method=st.sampled_from(coreset.METHODS),
    fraction=st.floats(0.05, 1.0),
    radius=st.sampled_from([0.05, 0.5, 2.0, 7.0, 40.0]),
    gated=st.booleans(),
)
def test_no_probe_or_search_exceeds_the_certificate(name, seed, d, n, k, method, fraction, radius, gated):
    rng = np.random.default_rng(seed)
    layer = random_layer(rng, name, d, n, k, gated)
    coef = selection_coefficients(layer, method, fraction, radius, rng)
    certificate = bounds.certify(layer, coef, radius)
    terms = [attack.Term(layer, coef)]
    found = attack.search(terms, radius, rng, steps=30, starts=6, random_points=256)
    probes = np.vstack([attack.ball_points(1024, d, radius, rng), found.points, np.zeros((1, d))])
    errors = np.abs(attack.errors(terms, probes))
    assert np.all(errors <= certificate.per_consumer), (errors.max(axis=0), certificate.per_consumer)
    assert found.value <= certificate.bound
    # the improvements never lose to the bounds they start from
    assert certificate.bound <= certificate.interval <= certificate.triangle * (1 + 1e-12)
    # the early-stopping form decides "≤ target" exactly as the full computation
    for target in (0.5 * certificate.bound, certificate.bound, 2.0 * certificate.bound):
        assert (bounds.certify(layer, coef, radius, target=target).bound <= target) == (certificate.bound <= target)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_keeping_every_neuron_certifies_zero(name, rng):
    layer = random_layer(rng, name, 4, 9, 3)
    everything = np.arange(layer.size)
    assert bounds.certified_bound(layer, everything, np.ones(layer.size), 3.0) == 0.0
    coef = bounds.coefficients(layer.out_weights, everything, layer.out_weights)
    assert bounds.certify(layer, coef, 3.0).bound == 0.0


def test_linear_layer_certificate_is_exact(rng):
    """For φ(t) = t the error is v·x + c: its sup |v_b + c| + r‖v_x‖ is attained, and certified to 1e-9."""
    layer = random_layer(rng, "identity", 6, 12, 4)
    coef = rng.standard_normal((4, 12))
    radius = 2.5
    certificate = bounds.certify(layer, coef, radius)
    effective = coef * layer.post_scale
    v = effective @ layer.points
    exact = np.abs(v[:, -1] + coef @ layer.post_shift) + radius * np.linalg.norm(v[:, :-1], axis=1)
    assert certificate.bound >= exact.max()
    assert certificate.bound == pytest.approx(exact.max(), rel=1e-8)
    found = attack.search([attack.Term(layer, coef)], radius, rng)
    assert found.value == pytest.approx(exact.max(), rel=1e-6)


def test_relu_certificate_beats_intervals_on_a_wide_layer(rng):
    """Cauchy–Schwarz with the eigenvalue bound: ≥ 2× tighter than intervals for 200 ReLUs in 30-D."""
    layer = random_layer(rng, "relu", 30, 200, 8, scale=1 / math.sqrt(30))
    coef = selection_coefficients(layer, "coreset", 0.5, 5.0, rng)
    certificate = bounds.certify(layer, coef, 5.0)
    assert certificate.bound * 2 < certificate.interval
    assert certificate.exact_consumers >= 1


@pytest.mark.parametrize("name", [n for n in ACTIVATIONS if bounds.relu_form(activation(n), 3) is not None])
def test_relu_forms_reproduce_the_activation(name, rng):
    """φ = linear + ReLUs + g, with g's computed range on random intervals containing a dense grid's (within 1e-9)."""
    act = activation(name)
    form = bounds.relu_form(act, 3)
    grid = np.linspace(-30.0, 30.0, 120001)[:, None] * np.ones(3)
    residual = act(grid) - form.evaluate(grid)
    if form.residual_critical is None:
        assert np.max(np.abs(residual)) <= 1e-12 * 30
        return
    for _ in range(20):
        lo, hi = np.sort(rng.uniform(-8, 8, (2, 3)), axis=0)
        low, high = bounds.residual_range(act, form, lo, hi)
        inside = (grid >= lo) & (grid <= hi)
        ends = np.stack([lo, hi])
        values = np.vstack([np.where(inside, residual, np.nan), act(ends) - form.evaluate(ends)])
        assert np.all(np.nanmin(values, axis=0) >= low) and np.all(np.nanmax(values, axis=0) <= high)
        # extremes are at ends or critical points, so a 5e-4 grid sees them to (5e-4)²·max|g''|
        assert np.all(np.nanmin(values, axis=0) - low <= 1e-6) and np.all(high - np.nanmax(values, axis=0) <= 1e-6)


def test_weighted_cauchy_schwarz_is_sound_and_exact_for_one_point(rng):
    points = rng.standard_normal((7, 4))  # q_j = [w_j; b_j], z = [x; 1] with ‖x‖ ≤ 3
    weights = rng.uniform(0, 2, 7)
    top = bounds._weighted_top(weights, points, 3.0)
    x = attack.ball_points(4000, 3, 3.0, rng)
    z = np.hstack([x, np.ones((4000, 1))])
    assert np.max(np.maximum(z @ points.T, 0) @ weights) <= top
    assert top <= math.sqrt(weights.sum() * np.linalg.eigvalsh((points * weights[:, None]).T @ points)[-1] * 10.0)
    # one point: 2·relu(w·x + b) peaks at x = 3w/‖w‖, exactly where the bound (bias exact) says
    one = bounds._weighted_top(np.array([2.0]), points[:1], 3.0)
    w, b = points[0, :-1], points[0, -1]
    assert one == pytest.approx(2.0 * abs(3.0 * np.linalg.norm(w) + abs(b)), rel=1e-8)


def test_ball_quadratic_sup_is_the_exact_supremum(rng):
    """The S-lemma bound equals the trust-region maximum, found here by a fine search on the sphere."""
    weights, bias, share = rng.standard_normal((5, 2)), rng.standard_normal(5), rng.uniform(0.1, 1, 5)
    bound = bounds.ball_quadratic_sup(weights, bias, share, 1.5)
    angles = np.linspace(0, 2 * np.pi, 200001)
    x = 1.5 * np.stack([np.cos(angles), np.sin(angles)], axis=1)  # the sum is convex: its max is on the sphere
    best = np.max(((x @ weights.T + bias) ** 2) @ share)
    assert best <= bound <= best * (1 + 1e-6)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_output_radius_is_sound(name, rng):
    layer = random_layer(rng, name, 5, 40, 2)
    radius = 3.0
    bound = bounds.output_radius(layer, radius)
    x = attack.ball_points(4000, 5, radius, rng)
    directions = layer.weights / np.linalg.norm(layer.weights, axis=1, keepdims=True)
    x = np.vstack([x, radius * directions, -radius * directions])
    assert np.max(np.linalg.norm(layer.hidden(x), axis=1)) <= bound


def test_lipschitz_radius_beats_the_norm_of_sups(rng):
    """‖relu(Wx+b)‖ ≤ ‖W‖₂r + ‖b‖ is far below √(Σ sup_j²) for 300 neurons in 20-D."""
    layer = random_layer(rng, "relu", 20, 300, 1, scale=1 / math.sqrt(20))
    layer = HiddenLayer(layer.weights, 0.1 * layer.bias, layer.activation, np.ones(300), np.zeros(300), layer.out_weights)
    sups = float(np.linalg.norm(bounds.activation_sup(layer, 5.0)))
    assert bounds.output_radius(layer, 5.0) * 2 < sups


def test_ball_affine_norm_is_sound_and_close(rng):
    weights, bias, radius = rng.standard_normal((9, 6)), rng.standard_normal(9), 2.0
    bound = bounds.ball_affine_norm(weights, bias, radius)
    _, _, vt = np.linalg.svd(weights)
    x = np.vstack([attack.ball_points(2000, 6, radius, rng), radius * vt[:1], -radius * vt[:1]])
    best = np.max(np.linalg.norm(x @ weights.T + bias, axis=1))
    assert best <= bound <= np.linalg.norm(weights, 2) * radius + np.linalg.norm(bias) + 1e-9


def test_fewest_neurons_finds_the_threshold_of_a_monotone_bound():
    curve = np.array([np.inf, 9.0, 7.0, 7.0, 4.0, 2.0, 1.0, 0.5, 0.0])  # index = neurons kept, n = 8
    for epsilon in (0.0, 0.5, 0.7, 2.0, 6.9, 7.0, 100.0):
        expected = min(k for k in range(1, 9) if curve[k] <= epsilon)
        assert bounds.fewest_neurons(lambda k: curve[k] <= epsilon, 8) == expected


@settings(max_examples=60, deadline=None, derandomize=True)
@given(curve=st.lists(st.floats(0.0, 10.0), min_size=1, max_size=40), eps=st.lists(st.floats(0.0, 10.0), min_size=2, max_size=6))
def test_fewest_neurons_is_monotone_in_epsilon_for_any_bound(curve, eps):
    n = len(curve)
    values = np.array([np.inf] + curve[:-1] + [0.0])  # keeping all n certifies 0
    counts = [bounds.fewest_neurons(lambda k, e=e: values[k] <= e, n) for e in sorted(eps)]
    assert counts == sorted(counts, reverse=True)
    for e, count in zip(sorted(eps), counts):
        assert values[count] <= e and (count == 1 or values[count - 1] > e)


def test_theorem7_sample_size_formula():
    # (t/ε²)(d·log t + log(1/δ)) with t = 10, ε = 1, d = 3, δ = 0.1: 10·(3 ln 10 + ln 10) = 92.10 → 93
    assert bounds.theorem7_sample_size(10.0, 1.0, 3, 0.1) == 93
    assert bounds.theorem7_sample_size(0.0, 1.0, 3) is None
    assert bounds.theorem7_sample_size(10.0, 0.0, 3) is None
