"""compensate.py: the closed-form least-squares refit, the greedy selection, the data-free samplers.

Pure numpy: these tests build hidden activations directly, no graph involved.
"""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest

from onnxcoreset import compensate
from onnxcoreset.compensate import Moments


def test_compensate_module_imports_no_onnx():
    """Like coreset.py, the least-squares mathematics runs without onnx: importing it pulls in numpy only."""
    code = (
        "import sys, onnxcoreset.compensate\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime', 'click')]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def relu_layer(rng: np.random.Generator, d: int, n: int, k: int):
    weights = rng.standard_normal((n, d)) / np.sqrt(d)
    bias = 0.3 * rng.standard_normal(n)
    out = rng.standard_normal((k, n)) / np.sqrt(n)

    def hidden(x: np.ndarray) -> np.ndarray:
        return np.maximum(x @ weights.T + bias, 0.0)

    return hidden, out


def test_fit_is_least_squares_with_intercept(rng):
    """With no ridge the refit equals numpy's lstsq of U·h on [h_K, 1], to 1e-9."""
    h = np.maximum(rng.standard_normal((400, 6)) @ rng.standard_normal((6, 10)) + 0.2, 0.0)
    out = rng.standard_normal((3, 10))
    kept = np.array([0, 3, 4, 8])
    refit = compensate.fit(Moments.of(h, None, out), out, kept, ridge=0.0)
    design = np.hstack([h[:, kept], np.ones((h.shape[0], 1))])
    expected = np.linalg.lstsq(design, h @ out.T, rcond=None)[0]
    np.testing.assert_allclose(refit.weights, expected[:-1].T, atol=1e-9)
    np.testing.assert_allclose(refit.bias_shift, expected[-1], atol=1e-9)
    # and the closed-form error is the mean squared residual
    residual = h @ out.T - design @ expected
    assert compensate.mean_squared_error(Moments.of(h, None, out), kept, refit) == pytest.approx((residual**2).sum(axis=1).mean() / 3, rel=1e-9)


def test_fit_without_bias_is_uncentred_least_squares(rng):
    """Rows without a bias to edit get δ = 0 and the lstsq solution on h_K alone."""
    h = np.abs(rng.standard_normal((300, 7))) + 0.5
    out = rng.standard_normal((4, 7))
    kept = np.array([1, 2, 5])
    refit = compensate.fit(Moments.of(h, None, out), out, kept, bias=np.array([True, False, True, False]), ridge=0.0)
    plain = np.linalg.lstsq(h[:, kept], h @ out[[1, 3]].T, rcond=None)[0]
    np.testing.assert_allclose(refit.weights[[1, 3]], plain.T, atol=1e-9)
    assert np.all(refit.bias_shift[[1, 3]] == 0.0) and np.all(refit.bias_shift[[0, 2]] != 0.0)


def test_data_ls_exact_when_dropped_neurons_are_combinations_of_kept_ones(rng):
    """Dropped neurons = affine combinations of kept ones: the refit reproduces U·h exactly (1e-9 relative),
    at the default ridge, and its measured error is 0 up to rounding."""
    kept_values = rng.standard_normal((500, 5))
    mixing = rng.standard_normal((5, 4))
    dropped = kept_values @ mixing + rng.standard_normal(4)  # constant parts need the bias correction
    h = np.hstack([kept_values, dropped])[:, [0, 5, 1, 6, 2, 7, 3, 8, 4]]
    kept = np.array([0, 2, 4, 6, 8])
    out = rng.standard_normal((3, 9))
    moments = Moments.of(h, None, out)
    refit = compensate.fit(moments, out, kept)
    predicted = h[:, kept] @ refit.weights.T + refit.bias_shift
    np.testing.assert_allclose(predicted, h @ out.T, rtol=0, atol=1e-5 * np.abs(h @ out.T).max())
    assert compensate.mean_squared_error(moments, kept, refit) <= 1e-10 * compensate.output_energy(moments)


def test_ball_ls_reduces_expected_error_on_fresh_ball_probes():
    """A random ReLU layer (d=10, n=40, k=5), 12 neurons kept by sensitivity: refit on 4,000 probes of
    the ball, measured on 20,000 fresh ones, the mean squared error is at most 1/3 of keeping the
    weights as they are (seeded: 0.104 against 0.595 with these numbers)."""
    rng = np.random.default_rng(7)
    hidden, out = relu_layer(rng, 10, 40, 5)
    radius = 3.0
    fit_points = compensate.ball(4000, 10, radius, rng)
    test_points = compensate.ball(20000, 10, radius, rng)
    sup = np.max(hidden(fit_points), axis=0)
    kept = np.sort(np.argsort(-np.max(np.abs(out), axis=0) * sup)[:12])
    refit = compensate.fit(Moments.of(hidden(fit_points), None, out), out, kept)
    test = Moments.of(hidden(test_points), None, out)
    plain = compensate.mean_squared_error(test, kept, compensate.unchanged(out, kept, np.ones(kept.size)))
    fitted = compensate.mean_squared_error(test, kept, refit)
    assert fitted <= plain / 3


def test_refit_on_the_original_network_corrects_upstream_error(rng):
    """When h' (what runs) differs from h (the original), the fit targets U·h: keeping every neuron,
    the refit undoes a known linear distortion of h' exactly."""
    h = np.abs(rng.standard_normal((600, 6)))
    distortion = np.eye(6) + 0.2 * rng.standard_normal((6, 6))
    h_now = h @ distortion
    out = rng.standard_normal((2, 6))
    kept = np.arange(6)
    refit = compensate.fit(Moments.of(h_now, h, out), out, kept, ridge=0.0)
    np.testing.assert_allclose(h_now @ refit.weights.T + refit.bias_shift, h @ out.T, atol=1e-8)


def test_greedy_first_step_is_the_best_single_neuron_and_error_falls(rng):
    h = np.maximum(rng.standard_normal((800, 5)) @ rng.standard_normal((5, 9)), 0.0)
    out = rng.standard_normal((3, 9))
    moments = Moments.of(h, None, out)

    def error(kept) -> float:
        kept = np.array(sorted(kept))
        return compensate.mean_squared_error(moments, kept, compensate.fit(moments, out, kept, ridge=0.0))

    best = min(range(9), key=lambda j: error([j]))
    assert list(compensate.greedy_selection(moments, 1, ridge=0.0)) == [best]
    errors = [error(compensate.greedy_selection(moments, t, ridge=0.0)) for t in range(1, 10)]
    assert all(a >= b - 1e-9 for a, b in zip(errors, errors[1:]))
    assert errors[-1] <= 1e-9
    # within 25% of the best subset of 4 on this small problem (exhaustive: 126 subsets)
    exhaustive = min(error(s) for s in itertools.combinations(range(9), 4))
    assert errors[3] <= 1.25 * exhaustive + 1e-12


def test_mixed_moments_are_the_mixture_of_samples(rng):
    a, b = rng.standard_normal((100, 4)), rng.standard_normal((300, 4)) + 1.0
    out = rng.standard_normal((2, 4))
    mixed = Moments.of(a, None, out).mixed(Moments.of(b, None, out), 0.25)
    np.testing.assert_allclose(mixed.current, 0.75 * a.T @ a / 100 + 0.25 * b.T @ b / 300, atol=1e-12)
    np.testing.assert_allclose(mixed.cross, 0.75 * a.T @ (a @ out.T) / 100 + 0.25 * b.T @ (b @ out.T) / 300, atol=1e-12)
    np.testing.assert_allclose(mixed.mean_current, 0.75 * a.mean(0) + 0.25 * b.mean(0), atol=1e-12)
    assert mixed.energy == pytest.approx(0.75 * np.sum((a @ out.T) ** 2) / 100 + 0.25 * np.sum((b @ out.T) ** 2) / 300, rel=1e-12)


def test_samplers_stay_in_their_sets(rng):
    points = compensate.ball(5000, 6, 2.0, rng)
    norms = np.linalg.norm(points, axis=1)
    assert norms.max() <= 2.0 + 1e-12
    # uniform in the ball: P(‖x‖ ≤ r/2) = 2⁻⁶; 5,000 points, 4.5 standard deviations
    share = np.mean(norms <= 1.0)
    assert abs(share - 2.0**-6) <= 4.5 * np.sqrt(2.0**-6 * (1 - 2.0**-6) / 5000)
    gamma, shift = rng.uniform(0.5, 2.0, 8), rng.standard_normal(8)
    outputs = compensate.layernorm_outputs(1000, gamma, shift, rng)
    z = (outputs - shift) / gamma
    np.testing.assert_allclose(z.mean(axis=1), 0.0, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), np.sqrt(8), rtol=1e-12)
    spread = compensate.gaussian(20000, 6, 2.0, rng)
    assert np.mean(np.sum(spread**2, axis=1)) == pytest.approx(6 * 4.0 / 8, rel=0.03)  # E‖x‖² = d·r²/(d+2)


def test_data_sup_statistics(rng):
    h = rng.standard_normal((50, 3))
    np.testing.assert_allclose(compensate.data_sup(h, "rms"), np.sqrt((h**2).mean(0)))
    np.testing.assert_allclose(compensate.data_sup(h, "max"), np.abs(h).max(0))
    with pytest.raises(ValueError, match="rms or max"):
        compensate.data_sup(h, "mean")
