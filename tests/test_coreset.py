"""The numpy core (onnxcoreset/coreset.py): sampling, reweighting, baselines, target counts.

Statistical tests use fixed seeds (so they are deterministic) and a tolerance of 4 standard errors
of the Monte-Carlo mean; the biased rule this module used to have (stopping at the draw that
brings the target-th neuron) puts some neuron 9 to 15 standard errors off on the same data.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxcoreset import coreset
from onnxcoreset.coreset import Selection, sample, select, sensitivities, target_count, top_k

SKEWED = np.array([10, 5, 3, 1, 1, 0.5, 0.5, 0.2, 0.2, 0.1])


def counts_of(selection: Selection, weights: np.ndarray) -> np.ndarray:
    """count(j) recovered from scale = count/(m·pr): must come out as whole numbers."""
    prob = weights[selection.kept] / weights.sum()
    return selection.scale * selection.draws * prob


def test_coreset_module_imports_no_onnx():
    """The mathematics runs where onnx is not installed: importing it pulls in numpy only."""
    code = (
        "import sys, onnxcoreset.coreset\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime', 'click')]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


@settings(max_examples=60, deadline=None)
@given(
    weights=st.lists(st.one_of(st.just(0.0), st.floats(1e-3, 1e3)), min_size=2, max_size=60),
    fraction=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_sample_keeps_exactly_the_target_and_scale_is_count_over_m_pr(weights, fraction, seed):
    weights = np.array(weights)
    target = max(1, int(fraction * weights.size))
    selection = sample(weights, target, np.random.default_rng(seed))
    positive = int(np.count_nonzero(weights))
    assert np.all(np.diff(selection.kept) > 0)
    if positive <= target:  # nothing to sample: every neuron that contributes is kept as it is
        expected = np.flatnonzero(weights) if positive else np.array([0])
        np.testing.assert_array_equal(selection.kept, expected)
        assert np.all(selection.scale == 1.0) and selection.draws is None
        return
    assert selection.size == target
    assert np.all(weights[selection.kept] > 0)
    counts = counts_of(selection, weights)
    np.testing.assert_allclose(counts, np.round(counts), rtol=1e-9)  # whole numbers
    assert np.all(np.round(counts) >= 1)
    assert int(np.round(counts).sum()) == selection.draws >= target  # m is the number of draws used


def per_neuron_scale_means(weights: np.ndarray, target: int, seeds: int) -> tuple[np.ndarray, np.ndarray]:
    """Monte-Carlo mean and standard error of each neuron's factor (0 when dropped)."""
    factors = np.zeros((seeds, weights.size))
    for seed in range(seeds):
        selection = sample(weights, target, np.random.default_rng(seed))
        factors[seed, selection.kept] = selection.scale
    return factors.mean(axis=0), factors.std(axis=0, ddof=1) / np.sqrt(seeds)


@pytest.mark.parametrize("target", [2, 5, 8])
def test_every_neuron_is_reweighted_without_bias(target):
    """E[count(j)/(m·pr(j))] = 1 for every neuron j, kept or not: each outgoing weight is estimated
    without bias (4 standard errors over 3,000 seeds)."""
    mean, error = per_neuron_scale_means(SKEWED, target, 3000)
    assert np.all(np.abs(mean - 1.0) <= 4 * error), (mean, (mean - 1) / error)


def test_layer_output_estimator_is_unbiased():
    """Σ_j u_i(j)·φ_j, with u the reweighted kept outgoing weights, averages to the full sum Σ_j w_i(j)·φ_j
    (signed terms, coreset and uniform, 4 standard errors over 3,000 seeds)."""
    rng = np.random.default_rng(5)
    n, target, seeds = 24, 6, 3000
    terms = rng.standard_normal(n) * rng.uniform(0.1, 3.0, n)  # w_i(j)·φ_j(x) for one query
    sensitivity = np.abs(terms) + rng.uniform(0, 1, n)  # an upper bound, as the real sensitivities are
    full = terms.sum()
    for method in ("coreset", "uniform"):
        estimates = np.empty(seeds)
        for seed in range(seeds):
            selection = select(
                method, sensitivity=sensitivity, point_norms=np.ones(n), target=target, rng=np.random.default_rng(seed)
            )
            assert selection.size == target
            estimates[seed] = terms[selection.kept] @ selection.scale
        error = estimates.std(ddof=1) / np.sqrt(seeds)
        assert abs(estimates.mean() - full) <= 4 * error, (method, estimates.mean(), full, error)


def test_sensitivity_sampling_beats_uniform_on_skewed_layers():
    """The point of the coreset: with sensitivities proportional to the terms' sizes, the estimator's
    variance is far below uniform sampling's (measured: ratio about 0.1 here; asserted below 0.5)."""
    rng = np.random.default_rng(9)
    n, target = 40, 8
    terms = np.abs(rng.standard_normal(n)) ** 4
    spread = {}
    for method in ("coreset", "uniform"):
        estimates = [
            terms[s.kept] @ s.scale
            for s in (
                select(method, sensitivity=terms, point_norms=terms, target=target, rng=np.random.default_rng(seed))
                for seed in range(400)
            )
        ]
        spread[method] = np.var(estimates)
    assert spread["coreset"] < 0.5 * spread["uniform"], spread


def test_zero_sensitivity_neurons_are_never_kept():
    weights = np.array([0.0, 3.0, 0.0, 1.0, 0.5, 0.0, 2.0, 0.25])
    zeros = np.flatnonzero(weights == 0)
    for seed in range(200):
        selection = sample(weights, 3, np.random.default_rng(seed))
        assert selection.size == 3
        assert not np.intersect1d(selection.kept, zeros).size


def test_few_positive_neurons_are_kept_exactly():
    """Only 2 neurons can move the output on the ball: asking for 3 keeps those 2, unscaled."""
    selection = sample(np.array([0.0, 2.0, 0.0, 0.0, 1.0]), 3, np.random.default_rng(0))
    np.testing.assert_array_equal(selection.kept, [1, 4])
    np.testing.assert_array_equal(selection.scale, [1.0, 1.0])
    assert selection.draws is None


def test_uniform_is_the_same_reweighting_with_equal_probabilities():
    sensitivity = np.array([100.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1e-3])
    selection = select("uniform", sensitivity=sensitivity, point_norms=sensitivity, target=4, rng=np.random.default_rng(3))
    counts = selection.scale * selection.draws / sensitivity.size  # scale = count/(m·(1/n))
    np.testing.assert_allclose(counts, np.round(counts), rtol=1e-12)
    assert selection.size == 4 and np.round(counts).sum() == selection.draws


def test_percentile_keeps_the_largest_points_unscaled():
    norms = np.array([0.5, 3.0, 1.0, 3.0, 0.1, 2.0])
    selection = select("percentile", sensitivity=np.ones(6), point_norms=norms, target=3, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(selection.kept, [1, 3, 5])
    np.testing.assert_array_equal(selection.scale, np.ones(3))
    assert selection.draws is None
    # ties go to the lower index
    np.testing.assert_array_equal(top_k(np.array([1.0, 2.0, 2.0, 2.0]), 2).kept, [1, 2])


def test_sensitivity_baseline_keeps_the_largest_sensitivities():
    sensitivity = np.array([0.2, 0.9, 0.1, 0.5, 0.7])
    selection = select("sensitivity", sensitivity=sensitivity, point_norms=np.ones(5), target=2, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(selection.kept, [1, 4])
    np.testing.assert_array_equal(selection.scale, [1.0, 1.0])


@pytest.mark.parametrize("method", coreset.METHODS)
def test_keeping_everything_is_the_identity(method):
    selection = select(method, sensitivity=SKEWED, point_norms=SKEWED, target=SKEWED.size, rng=np.random.default_rng(0))
    assert selection.is_identity(SKEWED.size)
    np.testing.assert_array_equal(selection.kept, np.arange(SKEWED.size))


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown method 'random'"):
        select("random", sensitivity=SKEWED, point_norms=SKEWED, target=3, rng=np.random.default_rng(0))


def test_negative_or_nan_weights_are_refused():
    for bad in (np.array([1.0, -1.0, 2.0]), np.array([1.0, np.nan, 2.0])):
        with pytest.raises(ValueError, match="finite and non-negative"):
            sample(bad, 1, np.random.default_rng(0))


@pytest.mark.parametrize(
    ("n", "keep", "neurons", "expected"),
    [
        (10, 0.5, None, 5),
        (5, 0.5, None, 3),  # 2.5 rounds half up
        (300, 0.1, None, 30),
        (100, 0.3, None, 30),  # 0.3·100 = 30.000000000000004 in floating point
        (7, 0.01, None, 1),  # never below one neuron
        (10, 1.0, None, 10),
        (120, 0.5, None, 60),
        (84, 0.5, None, 42),
        (10, None, 3, 3),
        (10, None, 50, 10),  # clamped to the layer
        (10, None, 0, 1),
    ],
)
def test_target_count(n, keep, neurons, expected):
    assert target_count(n, keep, neurons) == expected


def test_sensitivities_are_max_abs_outgoing_weight_times_sup():
    out_weights = np.array([[1.0, -4.0, 0.0], [-2.0, 3.0, 0.5]])  # [k=2, n=3]
    sup = np.array([0.5, 2.0, 10.0])
    np.testing.assert_array_equal(sensitivities(out_weights, sup), [1.0, 8.0, 5.0])


def test_same_seed_same_selection_other_seed_other_selection():
    weights = np.random.default_rng(0).uniform(0, 1, 200)
    first = sample(weights, 50, np.random.default_rng(42))
    again = sample(weights, 50, np.random.default_rng(42))
    other = sample(weights, 50, np.random.default_rng(43))
    np.testing.assert_array_equal(first.kept, again.kept)
    np.testing.assert_array_equal(first.scale, again.scale)
    assert first.draws == again.draws
    assert not np.array_equal(first.kept, other.kept)
