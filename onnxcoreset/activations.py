"""Registry of activation functions: numpy form, exact range on an interval, and graph recognition.

Every entry answers the one question the coreset and the certificates ask: over the interval of
pre-activations a neuron can see, what values can φ take? For a piecewise-monotone φ that is
exact: evaluate φ at the interval's ends and at every critical point (extremum, kink or jump)
inside it. Non-monotone functions (GELU, SiLU, Mish, HardSwish, PRelu with a negative slope, the
Gaussian) are therefore handled exactly, not through a monotonicity assumption.

Recognition comes in two kinds:
* single ops (``Relu``, ``Gelu``, ``com.microsoft::FastGelu`` …), matched by op type, in
  ``SINGLE_OPS``;
* exporter subgraphs (Erf-GELU, tanh-GELU, x·Sigmoid(x), the binary step Greater→Cast …),
  matched by *evaluating* the scalar subgraph in numpy and comparing it with
  ``SUBGRAPH_FUNCTIONS`` (see ``chains.py``), so operand order, Div-by-√2 versus Mul-by-1/√2
  and Constant-node versus initializer constants all match.

Not recognised: the paper's soft clipping (its sharpness α is not a graph constant one can
read off a fixed pattern) and any activation with a parameter the probe cannot pin down.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

_erf = np.vectorize(math.erf, otypes=[np.float64])
_OUTWARD = 1e-12  # relative widening of computed ranges, to stay sound under rounding

Params = Mapping[str, np.ndarray]


def _sigmoid(t: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * t))


def _softplus(t: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, t)


def _gelu_erf(t: np.ndarray) -> np.ndarray:
    return 0.5 * t * (1.0 + _erf(t / math.sqrt(2.0)))


def _gelu_tanh(t: np.ndarray) -> np.ndarray:
    return 0.5 * t * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (t + 0.044715 * t**3)))


def _argmin(fn: Callable[[np.ndarray], np.ndarray], lo: float, hi: float) -> float:
    """The minimiser of a unimodal function on [lo, hi], to double precision (golden section).

    The minimiser itself is only known to ~1e-8 (the function is flat there), but φ at it is
    then within ~1e-16 of the true minimum, far inside the ranges' outward slack.
    """
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    for _ in range(200):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        if fn(np.array(c)) < fn(np.array(d)):
            b = d
        else:
            a = c
    return (a + b) / 2.0


@dataclass(frozen=True, eq=False)
class Activation:
    """A scalar activation applied neuron by neuron; ``params`` may hold one value per neuron.

    ``critical`` lists every point where φ stops being monotone or jumps (the range on an
    interval is then attained at its ends or at one of them); ``lipschitz`` is an upper bound of
    sup|φ'| (``inf`` for discontinuous φ); ``bounded_by`` is sup over all t of |φ(t)| when finite.
    """

    name: str
    forward: Callable[[np.ndarray, Params], np.ndarray]
    critical: Callable[[Params], list[np.ndarray | float]] = lambda p: []
    zero_at_zero: bool = True
    lipschitz: float = 1.0
    bounded_by: float | None = None
    formula: str = ""
    params: Params = field(default_factory=dict)

    def __call__(self, t: np.ndarray) -> np.ndarray:
        return self.forward(np.asarray(t, dtype=np.float64), self.params)

    def range_on(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact (min, max) of φ over [lo, hi], elementwise over neurons, widened by rounding slack."""
        lo = np.asarray(lo, dtype=np.float64)
        hi = np.asarray(hi, dtype=np.float64)
        shape = np.broadcast(lo, hi).shape
        candidates = [lo, hi] + [np.clip(c, lo, hi) for c in self.critical(self.params)]
        values = np.stack([np.broadcast_to(self(np.broadcast_to(c, shape)), shape) for c in candidates])
        low, high = values.min(axis=0), values.max(axis=0)
        slack = _OUTWARD * (1.0 + np.maximum(np.abs(low), np.abs(high)))
        return low - slack, high + slack

    def sup_abs(self, radius: np.ndarray, center: np.ndarray | float = 0.0) -> np.ndarray:
        """sup of |φ(t)| over |t − center| ≤ radius (the paper's sup over the ball, per neuron)."""
        low, high = self.range_on(np.asarray(center) - radius, np.asarray(center) + radius)
        return np.maximum(np.abs(low), np.abs(high))

    def sliced(self, keep: np.ndarray, n: int) -> Activation:
        """The same activation restricted to the kept neurons (per-neuron parameters sliced)."""
        params = {k: (v[keep] if np.ndim(v) and np.shape(v)[-1] == n else v) for k, v in self.params.items()}
        return replace(self, params=params)

    def with_params(self, **params: np.ndarray | float) -> Activation:
        return replace(self, params={**self.params, **{k: np.asarray(v, np.float64) for k, v in params.items()}})


def _where_neg(t: np.ndarray, slope: np.ndarray) -> np.ndarray:
    return np.where(t >= 0, t, slope * t)


def _elu(t: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return np.where(t > 0, t, alpha * np.expm1(np.minimum(t, 0.0)))


def _celu(t: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.maximum(t, 0.0) + np.minimum(0.0, alpha * np.expm1(np.minimum(t, 0.0) / alpha))


def _hard_sigmoid(t: np.ndarray, p: Params) -> np.ndarray:
    return np.clip(p["alpha"] * t + p["beta"], 0.0, 1.0)


def _hard_sigmoid_kinks(p: Params) -> list[float]:
    alpha, beta = float(p["alpha"]), float(p["beta"])
    return [] if alpha == 0.0 else [-beta / alpha, (1.0 - beta) / alpha]


def _step(t: np.ndarray, p: Params) -> np.ndarray:
    """Heaviside step: 1 for t > 0, ``at_zero`` at 0 (Greater: 0, GreaterOrEqual: 1), 0 below."""
    return np.where(t > 0, 1.0, np.where(t == 0, p["at_zero"], 0.0))


_GELU_ARGMIN = _argmin(_gelu_erf, -3.0, 0.0)
_GELU_TANH_ARGMIN = _argmin(_gelu_tanh, -3.0, 0.0)
_SILU_ARGMIN = _argmin(lambda t: t * _sigmoid(t), -4.0, 0.0)
_MISH_ARGMIN = _argmin(lambda t: t * np.tanh(_softplus(t)), -4.0, 0.0)

# Lipschitz constants: sup |φ'| from the closed forms (GELU 1.12890, tanh-GELU 1.12900, SiLU 1.09984,
# Mish 1.08850, Gaussian √(2/e) = 0.85776), rounded up so that radius propagation stays sound.
IDENTITY = Activation("identity", lambda t, p: t, formula="t")
REGISTRY: dict[str, Activation] = {
    a.name: a
    for a in [
        IDENTITY,
        Activation("relu", lambda t, p: np.maximum(t, 0.0), lambda p: [0.0], formula="max(t, 0)"),
        Activation("leaky_relu", lambda t, p: _where_neg(t, p["alpha"]), lambda p: [0.0], formula="t ≥ 0 ? t : α·t"),
        Activation("prelu", lambda t, p: _where_neg(t, p["slope"]), lambda p: [0.0], formula="t ≥ 0 ? t : slope_j·t"),
        Activation("thresholded_relu", lambda t, p: np.where(t > p["alpha"], t, 0.0), lambda p: [p["alpha"]],
                   formula="t > α ? t : 0 (α ≥ 0)"),
        Activation("sigmoid", lambda t, p: _sigmoid(t), lipschitz=0.25, bounded_by=1.0, formula="1/(1+e^−t)"),
        Activation("tanh", lambda t, p: np.tanh(t), bounded_by=1.0, formula="tanh t"),
        Activation("softsign", lambda t, p: t / (1.0 + np.abs(t)), bounded_by=1.0, formula="t/(1+|t|)"),
        Activation("softplus", lambda t, p: _softplus(t), formula="log(1+e^t)"),
        Activation("elu", lambda t, p: _elu(t, p["alpha"]), lambda p: [0.0], formula="t > 0 ? t : α(e^t−1)"),
        Activation("selu", lambda t, p: p["gamma"] * _elu(t, p["alpha"]), lambda p: [0.0],
                   formula="γ·(t > 0 ? t : α(e^t−1))"),
        Activation("celu", lambda t, p: _celu(t, p["alpha"]), lambda p: [0.0], formula="max(0,t)+min(0,α(e^{t/α}−1))"),
        Activation("hard_sigmoid", _hard_sigmoid, _hard_sigmoid_kinks, bounded_by=1.0, formula="clip(α·t+β, 0, 1)"),
        Activation("hard_swish", lambda t, p: t * np.clip(t / 6.0 + 0.5, 0.0, 1.0), lambda p: [-3.0, -1.5, 3.0],
                   lipschitz=1.5, formula="t·clip(t/6+1/2, 0, 1)"),
        Activation("clip", lambda t, p: np.clip(t, p["min"], p["max"]), lambda p: [p["min"], p["max"]],
                   formula="clip(t, min, max)"),
        Activation("mish", lambda t, p: t * np.tanh(_softplus(t)), lambda p: [_MISH_ARGMIN], lipschitz=1.09,
                   formula="t·tanh(log(1+e^t))"),
        Activation("gelu", lambda t, p: _gelu_erf(t), lambda p: [_GELU_ARGMIN], lipschitz=1.13,
                   formula="t/2·(1+erf(t/√2))"),
        Activation("gelu_tanh", lambda t, p: _gelu_tanh(t), lambda p: [_GELU_TANH_ARGMIN], lipschitz=1.13,
                   formula="t/2·(1+tanh(√(2/π)(t+0.044715t³)))"),
        Activation("silu", lambda t, p: t * _sigmoid(t), lambda p: [_SILU_ARGMIN], lipschitz=1.1, formula="t·σ(t)"),
        # d/dt t·σ(αt) = silu'(αt), so the Lipschitz constant is SiLU's whatever α is.
        Activation("quick_gelu", lambda t, p: t * _sigmoid(p["alpha"] * t), lambda p: [_SILU_ARGMIN / p["alpha"]],
                   lipschitz=1.1, formula="t·σ(α·t)"),
        Activation("step", _step, lambda p: [0.0], lipschitz=math.inf, bounded_by=1.0, formula="t > 0 ? 1 : 0"),
        Activation("gaussian", lambda t, p: np.exp(-t * t), lambda p: [0.0], lipschitz=0.86, bounded_by=1.0,
                   formula="e^{−t²}"),
    ]
}


def make(name: str, **params: float | np.ndarray) -> Activation:
    """A registry activation with its parameters bound (e.g. ``make("leaky_relu", alpha=0.01)``)."""
    act = REGISTRY[name].with_params(**params)
    p = act.params
    if name == "clip":
        lo, hi = float(np.min(p["min"])), float(np.max(p["max"]))
        bound = max(abs(lo), abs(hi)) if math.isfinite(lo) and math.isfinite(hi) else None
        act = replace(act, bounded_by=bound, lipschitz=1.0 if lo < hi else 0.0)
    elif name in ("leaky_relu", "prelu"):
        slope = p["alpha" if name == "leaky_relu" else "slope"]
        act = replace(act, lipschitz=max(1.0, float(np.max(np.abs(slope)))))
    elif name == "elu":
        act = replace(act, lipschitz=max(1.0, float(np.max(np.abs(p["alpha"])))))
    elif name == "celu":  # φ'(t) = e^{t/α} on t < 0: at most 1 for α > 0, unbounded for α < 0
        act = replace(act, lipschitz=1.0 if float(np.min(p["alpha"])) > 0 else math.inf)
    elif name == "selu":
        gamma, alpha = float(p["gamma"]), float(p["alpha"])
        act = replace(act, lipschitz=abs(gamma) * max(1.0, abs(alpha)))
    elif name == "hard_sigmoid":
        act = replace(act, lipschitz=abs(float(p["alpha"])))
    elif name == "thresholded_relu":
        act = replace(act, lipschitz=math.inf if float(p["alpha"]) != 0.0 else 1.0)
    with np.errstate(all="ignore"):
        at_zero = act(np.zeros(1))
    return replace(act, zero_at_zero=bool(np.all(at_zero == 0.0)))


# Scalar functions an exporter may spell out as a subgraph; chains.py evaluates a candidate
# subgraph, fits a·φ+b for each entry and keeps the best fit within tolerance.
SUBGRAPH_FUNCTIONS: list[tuple[str, dict[str, float]]] = [
    ("gelu", {}),
    ("gelu_tanh", {}),
    ("silu", {}),
    ("quick_gelu", {"alpha": 1.702}),
    ("mish", {}),
    ("hard_swish", {}),
    ("hard_sigmoid", {"alpha": 1.0 / 6.0, "beta": 0.5}),
    ("sigmoid", {}),
    ("tanh", {}),
    ("softsign", {}),
    ("softplus", {}),
    ("relu", {}),
    ("clip", {"min": 0.0, "max": 6.0}),
    ("step", {"at_zero": 0.0}),
    ("step", {"at_zero": 1.0}),
    ("gaussian", {}),
]


@dataclass(frozen=True)
class OpForm:
    """How one ONNX op maps onto a registry activation.

    ``params`` turns the node's attributes and constant inputs into the entry's parameters;
    ``variant`` picks another entry from the attributes (Gelu's ``approximate``);
    ``check`` returns the reason the parameters are unsupported, or None;
    ``per_neuron_inputs`` are input positions holding one value per neuron (sliced by surgery);
    ``bias_input`` is an input added to the pre-activation before φ (BiasGelu, FastGelu).
    """

    name: str
    params: Callable[[dict, list], dict] = lambda attrs, inputs: {}
    per_neuron_inputs: tuple[int, ...] = ()
    bias_input: int | None = None
    variant: Callable[[dict], str] | None = None
    check: Callable[[dict], str | None] = lambda params: None


def _clip_params(attrs: dict, inputs: list) -> dict:
    """Clip's bounds: inputs 1 and 2 from opset 11, attributes ``min``/``max`` before."""
    low = inputs[1] if len(inputs) > 1 and inputs[1] is not None else attrs.get("min", -np.inf)
    high = inputs[2] if len(inputs) > 2 and inputs[2] is not None else attrs.get("max", np.inf)
    return {key: float(np.reshape(v, -1)[0]) if np.size(v) == 1 else np.asarray(v) for key, v in (("min", low), ("max", high))}


def _clip_check(params: dict) -> str | None:
    return None if np.ndim(params["min"]) == 0 and np.ndim(params["max"]) == 0 else "Clip bounds are not scalars"


def _gelu_variant(attrs: dict) -> str:
    return "gelu_tanh" if attrs.get("approximate", b"none") in (b"tanh", "tanh") else "gelu"


_SELU_ALPHA, _SELU_GAMMA = 1.67326319217681884765625, 1.05070102214813232421875
_MS = "com.microsoft"

SINGLE_OPS: dict[tuple[str, str], OpForm] = {
    ("", "Relu"): OpForm("relu"),
    ("", "LeakyRelu"): OpForm("leaky_relu", lambda a, i: {"alpha": a.get("alpha", 0.01)}),
    ("", "PRelu"): OpForm("prelu", lambda a, i: {"slope": np.asarray(i[1], np.float64).reshape(-1)}, (1,)),
    ("", "ThresholdedRelu"): OpForm(
        "thresholded_relu",
        lambda a, i: {"alpha": a.get("alpha", 1.0)},
        check=lambda p: None if float(p["alpha"]) >= 0 else "ThresholdedRelu with a negative alpha",
    ),
    ("", "Sigmoid"): OpForm("sigmoid"),
    ("", "Tanh"): OpForm("tanh"),
    ("", "Softsign"): OpForm("softsign"),
    ("", "Softplus"): OpForm("softplus"),
    ("", "Elu"): OpForm("elu", lambda a, i: {"alpha": a.get("alpha", 1.0)}),
    ("", "Selu"): OpForm("selu", lambda a, i: {"alpha": a.get("alpha", _SELU_ALPHA), "gamma": a.get("gamma", _SELU_GAMMA)}),
    ("", "Celu"): OpForm(
        "celu",
        lambda a, i: {"alpha": a.get("alpha", 1.0)},
        check=lambda p: None if float(p["alpha"]) > 0 else "Celu with a non-positive alpha",
    ),
    ("", "HardSigmoid"): OpForm("hard_sigmoid", lambda a, i: {"alpha": a.get("alpha", 0.2), "beta": a.get("beta", 0.5)}),
    ("", "HardSwish"): OpForm("hard_swish"),
    ("", "Clip"): OpForm("clip", _clip_params, check=_clip_check),
    ("", "Mish"): OpForm("mish"),
    ("", "Gelu"): OpForm("gelu", variant=_gelu_variant),
    (_MS, "Gelu"): OpForm("gelu"),
    (_MS, "FastGelu"): OpForm("gelu_tanh", per_neuron_inputs=(1,), bias_input=1),
    (_MS, "BiasGelu"): OpForm("gelu", per_neuron_inputs=(1,), bias_input=1),
    (_MS, "QuickGelu"): OpForm("quick_gelu", lambda a, i: {"alpha": a.get("alpha", 1.702)}),
}
