"""The activation registry, in numpy only (onnx is never imported here).

Tolerances: numpy forms against scalar ``math`` references within 1e-12 relative + 1e-14 absolute
(one or two roundings apart); ``range_on`` never narrower than a refined dense-grid reference and
at most 1e-9 wider; Lipschitz constants at least the largest finite difference on a 1e-4 grid and,
for the smooth functions, at most 2% above it.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from onnxcoreset import activations
from onnxcoreset.activations import REGISTRY, make

SELU_ALPHA, SELU_GAMMA = 1.6732632423543772, 1.0507009873554805


def _sigmoid(t: float) -> float:
    return 1.0 / (1.0 + math.exp(-t)) if t >= 0 else math.exp(t) / (1.0 + math.exp(t))


def _softplus(t: float) -> float:
    return max(t, 0.0) + math.log1p(math.exp(-abs(t)))


# (registry name, parameters, scalar reference written from the ONNX operator definitions)
CASES: list[tuple[str, dict, object]] = [
    ("identity", {}, lambda t: t),
    ("relu", {}, lambda t: max(t, 0.0)),
    ("leaky_relu", {"alpha": 0.01}, lambda t: t if t >= 0 else 0.01 * t),
    ("leaky_relu", {"alpha": -0.5}, lambda t: t if t >= 0 else -0.5 * t),
    ("prelu", {"slope": -0.7}, lambda t: t if t >= 0 else -0.7 * t),
    ("prelu", {"slope": 1.8}, lambda t: t if t >= 0 else 1.8 * t),
    ("thresholded_relu", {"alpha": 0.3}, lambda t: t if t > 0.3 else 0.0),
    ("sigmoid", {}, _sigmoid),
    ("tanh", {}, math.tanh),
    ("softsign", {}, lambda t: t / (1 + abs(t))),
    ("softplus", {}, _softplus),
    ("elu", {"alpha": 0.7}, lambda t: t if t > 0 else 0.7 * (math.exp(t) - 1)),
    ("selu", {"alpha": SELU_ALPHA, "gamma": SELU_GAMMA}, lambda t: SELU_GAMMA * (t if t > 0 else SELU_ALPHA * (math.exp(t) - 1))),
    ("celu", {"alpha": 1.5}, lambda t: max(0.0, t) + min(0.0, 1.5 * (math.exp(t / 1.5) - 1))),
    ("hard_sigmoid", {"alpha": 0.2, "beta": 0.5}, lambda t: max(0.0, min(1.0, 0.2 * t + 0.5))),
    ("hard_sigmoid", {"alpha": -0.3, "beta": 0.4}, lambda t: max(0.0, min(1.0, -0.3 * t + 0.4))),
    ("hard_swish", {}, lambda t: t * max(0.0, min(1.0, t / 6 + 0.5))),
    ("clip", {"min": 0.0, "max": 6.0}, lambda t: min(max(t, 0.0), 6.0)),
    ("clip", {"min": -0.5, "max": 0.75}, lambda t: min(max(t, -0.5), 0.75)),
    ("clip", {"min": -math.inf, "max": 0.5}, lambda t: min(t, 0.5)),
    ("mish", {}, lambda t: t * math.tanh(_softplus(t))),
    ("gelu", {}, lambda t: 0.5 * t * (1 + math.erf(t / math.sqrt(2)))),
    ("gelu_tanh", {}, lambda t: 0.5 * t * (1 + math.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t**3)))),
    ("silu", {}, lambda t: t * _sigmoid(t)),
    ("quick_gelu", {"alpha": 1.702}, lambda t: t * _sigmoid(1.702 * t)),
    ("quick_gelu", {"alpha": -1.0}, lambda t: t * _sigmoid(-t)),
    ("step", {"at_zero": 0.0}, lambda t: 1.0 if t > 0 else 0.0),
    ("step", {"at_zero": 1.0}, lambda t: 1.0 if t >= 0 else 0.0),
    ("gaussian", {}, lambda t: math.exp(-t * t)),
]
IDS = [f"{name}{'-' + '-'.join(f'{k}={v:g}' for k, v in p.items()) if p else ''}" for name, p, _ in CASES]
SMOOTH = {"sigmoid", "tanh", "softsign", "softplus", "mish", "gelu", "gelu_tanh", "silu", "quick_gelu", "gaussian", "hard_swish"}


def test_registry_imports_no_onnx():
    """Loaded on its own in a fresh interpreter, activations.py pulls in numpy only."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('acts', {activations.__file__!r})\n"
        "module = sys.modules['acts'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime')], sorted(sys.modules)\n"
        "print(len(module.REGISTRY))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == len(REGISTRY)


def test_every_registry_entry_is_tested():
    assert {name for name, _, _ in CASES} == set(REGISTRY)


@pytest.mark.parametrize(("name", "params", "reference"), CASES, ids=IDS)
def test_numpy_form_matches_scalar_reference(name, params, reference):
    t = np.concatenate([np.linspace(-12, 12, 2401), [-40.0, -0.0, 0.0, 0.3, 3.0, -3.0, 40.0]])
    got = make(name, **params)(t)
    want = np.array([reference(float(v)) for v in t])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def _golden(fn, a: float, b: float, sign: float) -> float:
    """sign·min of sign·fn on [a, b] by golden section (independent of the registry's critical points)."""
    ratio = (math.sqrt(5) - 1) / 2
    best = min(sign * fn(a), sign * fn(b))
    for _ in range(120):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        fc, fd = sign * fn(c), sign * fn(d)
        best = min(best, fc, fd)
        if fc < fd:
            b = d
        else:
            a = c
    return sign * best


def reference_range(act, lo: float, hi: float) -> tuple[float, float]:
    """min and max of φ on [lo, hi]: a 4001-point grid, each grid extremum refined on its two cells."""
    grid = np.linspace(lo, hi, 4001)
    values = act(grid)
    low, high = float(values.min()), float(values.max())
    scalar = lambda t: float(act(np.array([t]))[0])
    left, middle, right = values[:-2], values[1:-1], values[2:]
    # Strict on at least one side: plateaus need no refinement, their value is already on the grid.
    minima = (middle <= left) & (middle <= right) & ((middle < left) | (middle < right))
    maxima = (middle >= left) & (middle >= right) & ((middle > left) | (middle > right))
    for i in np.flatnonzero(minima) + 1:
        low = min(low, _golden(scalar, grid[i - 1], grid[i + 1], 1.0))
    for i in np.flatnonzero(maxima) + 1:
        high = max(high, _golden(scalar, grid[i - 1], grid[i + 1], -1.0))
    return low, high


def _intervals() -> np.ndarray:
    """Random intervals plus the awkward ones: empty width, exactly on kinks, very wide."""
    rng = np.random.default_rng(7)
    lo = rng.uniform(-8, 6, 14)
    hi = lo + rng.choice([0.0, 0.05, 1.0, 4.0, 10.0], 14)
    fixed = [(-40, 40), (0, 0), (-3, 3), (-1.5, -1.5), (-0.76, -0.74), (0, 5), (-5, 0), (0.3, 2), (-1.2, -1.1), (6, 9)]
    return np.array(list(zip(lo, hi)) + fixed, dtype=np.float64)


@pytest.mark.parametrize(("name", "params", "reference"), CASES, ids=IDS)
def test_range_is_exact_against_refined_grid(name, params, reference):
    act = make(name, **params)
    intervals = _intervals()
    low, high = act.range_on(intervals[:, 0], intervals[:, 1])
    for (lo, hi), got_low, got_high in zip(intervals, low, high):
        want_low, want_high = reference_range(act, lo, hi)
        assert got_low <= want_low and got_high >= want_high, (lo, hi)  # never narrower
        assert want_low - got_low <= 1e-9 and got_high - want_high <= 1e-9, (lo, hi)  # at most 1e-9 wider


def test_range_with_per_neuron_prelu_slopes():
    """PRelu slopes per neuron, some negative (then φ is non-monotone): each neuron's own range."""
    slopes = np.array([-2.0, -0.5, 0.0, 0.25, 1.0, 3.0])
    act = make("prelu", slope=slopes)
    lo = np.array([-2.0, -3.0, -1.0, -4.0, -1.0, -0.5])
    hi = np.array([1.0, 0.5, 2.0, -1.0, 1.0, 0.25])
    low, high = act.range_on(lo, hi)
    for j, slope in enumerate(slopes):
        want = reference_range(make("prelu", slope=slope), lo[j], hi[j])
        assert low[j] <= want[0] <= low[j] + 1e-9 and high[j] - 1e-9 <= want[1] <= high[j]
    np.testing.assert_allclose(high, [4.0, 1.5, 2.0, -0.25, 1.0, 0.25], atol=1e-9)  # closed forms
    np.testing.assert_allclose(low, [0.0, 0.0, 0.0, -1.0, -1.0, -1.5], atol=1e-9)
    sliced = act.sliced(np.array([1, 4]), 6)
    np.testing.assert_array_equal(sliced.params["slope"], [-0.5, 1.0])


def test_non_monotone_minima_are_the_known_constants():
    """The interior minima the critical points find: GELU −0.16997, SiLU −0.27846, Mish −0.30884, HardSwish −0.375."""
    for name, want in (("gelu", -0.169971207), ("silu", -0.278464543), ("mish", -0.308843413), ("hard_swish", -0.375)):
        low, _ = make(name).range_on(np.array([-5.0]), np.array([5.0]))
        assert abs(low[0] - want) < 1e-9, name


def test_sup_abs_over_the_ball():
    gelu = make("gelu")
    sup = gelu.sup_abs(np.array([0.5, 2.0]), np.array([-1.0, 1.0]))
    # On [-1.5, -0.5] |GELU| peaks at the minimum; on [-1, 3] at t = 3.
    np.testing.assert_allclose(sup, [0.16997120748, 3 * 0.5 * (1 + math.erf(3 / math.sqrt(2)))], rtol=1e-9)


ZERO_AT_ZERO = {
    ("sigmoid", ()): False,
    ("softplus", ()): False,
    ("gaussian", ()): False,
    ("hard_sigmoid", (("alpha", 0.2), ("beta", 0.5))): False,
    ("hard_sigmoid", (("alpha", -0.3), ("beta", 0.4))): False,
    ("step", (("at_zero", 1.0),)): False,
    ("clip", (("min", 0.5), ("max", 2.0))): False,
    ("hard_sigmoid", (("alpha", 0.2), ("beta", -0.1))): True,
}


@pytest.mark.parametrize(("name", "params", "reference"), CASES, ids=IDS)
def test_zero_at_zero_flag(name, params, reference):
    assert make(name, **params).zero_at_zero == ZERO_AT_ZERO.get((name, tuple(params.items())), True)
    assert make(name, **params).zero_at_zero == (reference(0.0) == 0.0)


@pytest.mark.parametrize(("key", "expected"), list(ZERO_AT_ZERO.items()), ids=[k[0] + str(k[1]) for k in ZERO_AT_ZERO])
def test_zero_at_zero_for_shifted_parameters(key, expected):
    name, params = key
    assert make(name, **dict(params)).zero_at_zero is expected


@pytest.mark.parametrize(("name", "params", "reference"), CASES, ids=IDS)
def test_lipschitz_constant_bounds_the_numerical_derivative(name, params, reference):
    act = make(name, **params)
    t = np.linspace(-20, 20, 400001)
    values = act(t)
    slopes = np.abs(np.diff(values) / np.diff(t))
    if not math.isfinite(act.lipschitz):
        assert slopes.max() > 100  # a jump: no finite constant would be an upper bound
        return
    assert slopes.max() <= act.lipschitz * (1 + 1e-9)
    if name in SMOOTH:
        assert act.lipschitz <= 1.02 * slopes.max(), "sound but needlessly loose"


@pytest.mark.parametrize(("name", "params", "reference"), CASES, ids=IDS)
def test_bounded_by_is_the_global_sup(name, params, reference):
    act = make(name, **params)
    if act.bounded_by is None:
        assert np.abs(act(np.array([-1e3, 1e3]))).max() > 10  # genuinely unbounded
        return
    values = np.abs(act(np.concatenate([np.linspace(-60, 60, 120001), [-1e9, 1e9]])))
    assert values.max() <= act.bounded_by and values.max() >= act.bounded_by - 1e-6


def test_subgraph_functions_are_registry_entries():
    for name, params in activations.SUBGRAPH_FUNCTIONS:
        assert make(name, **params).name == name


def test_single_op_forms_name_registry_entries():
    for (domain, op), form in activations.SINGLE_OPS.items():
        assert form.name in REGISTRY, op
    gelu = activations.SINGLE_OPS[("", "Gelu")]
    assert gelu.variant({"approximate": b"tanh"}) == "gelu_tanh" and gelu.variant({}) == "gelu"


def test_clip_parameters_from_attributes_and_inputs():
    clip = activations.SINGLE_OPS[("", "Clip")]
    assert clip.params({"min": -1.0, "max": 2.0}, [None]) == {"min": -1.0, "max": 2.0}  # opset < 11
    assert clip.params({}, [None, np.array(0.0), np.array([6.0])]) == {"min": 0.0, "max": 6.0}  # opset >= 11
    assert clip.params({}, [None, None, np.array(0.5)]) == {"min": -np.inf, "max": 0.5}
    assert clip.check(clip.params({}, [None, np.array([0.0, 1.0]), None])) == "Clip bounds are not scalars"
    assert clip.check({"min": 0.0, "max": 6.0}) is None


def test_parameter_checks_decline_unsupported_values():
    thresholded = activations.SINGLE_OPS[("", "ThresholdedRelu")]
    assert thresholded.check({"alpha": -0.5}) == "ThresholdedRelu with a negative alpha"
    assert thresholded.check({"alpha": 1.0}) is None
    assert activations.SINGLE_OPS[("", "Celu")].check({"alpha": -1.0}) == "Celu with a non-positive alpha"
