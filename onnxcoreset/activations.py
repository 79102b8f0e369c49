"""Registry of activation functions: numpy form, exact range on an interval, and graph recognition.

Every entry answers the one question the coreset and the certificates ask: over the interval of
pre-activations a neuron can see, what values can φ take? For a piecewise-monotone φ that is
exact: evaluate φ at the interval's ends and at every critical point (extremum or kink) inside it.
Non-monotone functions (GELU, SiLU, Mish, HardSwish, PRelu with a negative slope) are therefore
handled exactly, not through a monotonicity assumption.

Recognition comes in two kinds:
* single ops (``Relu``, ``Gelu``, ``com.microsoft::FastGelu`` …), matched by op type, in
  ``SINGLE_OPS``;
* exporter subgraphs (Erf-GELU, tanh-GELU, x·Sigmoid(x) …), matched by *evaluating* the scalar
  subgraph in numpy and comparing it with ``SUBGRAPH_FUNCTIONS`` (see ``chains.py``), so operand
  order, Div-by-√2 versus Mul-by-1/√2 and Constant-node versus initializer constants all match.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping

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
    """The minimiser of a unimodal function on [lo, hi], to double precision (golden section)."""
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
    """A scalar activation applied neuron by neuron; ``params`` may hold one value per neuron."""

    name: str
    forward: Callable[[np.ndarray, Params], np.ndarray]
    critical: Callable[[Params], list[np.ndarray | float]] = lambda p: []
    zero_at_zero: bool = True
    lipschitz: float = 1.0
    bounded_by: float | None = None  # sup over all t of |φ(t)|, when finite
    params: Params = field(default_factory=dict)

    def __call__(self, t: np.ndarray) -> np.ndarray:
        return self.forward(np.asarray(t, dtype=np.float64), self.params)

    def range_on(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact (min, max) of φ over [lo, hi], elementwise over neurons, widened by rounding slack."""
        lo = np.asarray(lo, dtype=np.float64)
        hi = np.asarray(hi, dtype=np.float64)
        candidates = [lo, hi] + [np.clip(c, lo, hi) for c in self.critical(self.params)]
        values = np.stack([self(np.broadcast_to(c, np.broadcast(lo, hi).shape)) for c in candidates])
        low, high = values.min(axis=0), values.max(axis=0)
        slack = _OUTWARD * (1.0 + np.maximum(np.abs(low), np.abs(high)))
        return low - slack, high + slack

    def sliced(self, keep: np.ndarray, n: int) -> "Activation":
        """The same activation restricted to the kept neurons (per-neuron parameters sliced)."""
        params = {k: (v[keep] if np.ndim(v) and np.shape(v)[-1] == n else v) for k, v in self.params.items()}
        return replace(self, params=params)

    def with_params(self, **params: np.ndarray | float) -> "Activation":
        return replace(self, params={**self.params, **{k: np.asarray(v, np.float64) for k, v in params.items()}})


def _where_neg(t: np.ndarray, slope: np.ndarray) -> np.ndarray:
    return np.where(t >= 0, t, slope * t)


def _elu(t: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return np.where(t > 0, t, alpha * np.expm1(np.minimum(t, 0.0)))


def _hard_sigmoid(t: np.ndarray, p: Params) -> np.ndarray:
    return np.clip(p["alpha"] * t + p["beta"], 0.0, 1.0)


_GELU_ARGMIN = _argmin(_gelu_erf, -3.0, 0.0)
_GELU_TANH_ARGMIN = _argmin(_gelu_tanh, -3.0, 0.0)
_SILU_ARGMIN = _argmin(lambda t: t * _sigmoid(t), -4.0, 0.0)
_MISH_ARGMIN = _argmin(lambda t: t * np.tanh(_softplus(t)), -4.0, 0.0)

# Lipschitz constants: sup |φ'|, from the closed forms (GELU 1.1289, SiLU 1.0998, Mish 1.0886),
# rounded up so that radius propagation stays sound.
IDENTITY = Activation("identity", lambda t, p: t)
REGISTRY: dict[str, Activation] = {
    a.name: a
    for a in [
        IDENTITY,
        Activation("relu", lambda t, p: np.maximum(t, 0.0), lambda p: [0.0]),
        Activation("leaky_relu", lambda t, p: _where_neg(t, p["alpha"]), lambda p: [0.0]),
        Activation("prelu", lambda t, p: _where_neg(t, p["slope"]), lambda p: [0.0]),
        Activation("sigmoid", lambda t, p: _sigmoid(t), zero_at_zero=False, lipschitz=0.25, bounded_by=1.0),
        Activation("tanh", lambda t, p: np.tanh(t), bounded_by=1.0),
        Activation("softplus", lambda t, p: _softplus(t), zero_at_zero=False),
        Activation("elu", lambda t, p: _elu(t, p["alpha"]), lambda p: [0.0]),
        Activation("selu", lambda t, p: p["gamma"] * _elu(t, p["alpha"]), lambda p: [0.0]),
        Activation(
            "celu",
            lambda t, p: np.maximum(t, 0.0) + np.minimum(0.0, p["alpha"] * np.expm1(np.minimum(t, 0.0) / p["alpha"])),
            lambda p: [0.0],
        ),
        Activation(
            "hard_sigmoid",
            _hard_sigmoid,
            lambda p: [-p["beta"] / p["alpha"], (1.0 - p["beta"]) / p["alpha"]],
            zero_at_zero=False,
            bounded_by=1.0,
        ),
        Activation(
            "hard_swish", lambda t, p: t * np.clip(t / 6.0 + 0.5, 0.0, 1.0), lambda p: [-3.0, -1.5, 3.0], lipschitz=1.5
        ),
        Activation("clip", lambda t, p: np.clip(t, p["min"], p["max"]), lambda p: [p["min"], p["max"]]),
        Activation("mish", lambda t, p: t * np.tanh(_softplus(t)), lambda p: [_MISH_ARGMIN], lipschitz=1.09),
        Activation("gelu", lambda t, p: _gelu_erf(t), lambda p: [_GELU_ARGMIN], lipschitz=1.13),
        Activation("gelu_tanh", lambda t, p: _gelu_tanh(t), lambda p: [_GELU_TANH_ARGMIN], lipschitz=1.13),
        Activation("silu", lambda t, p: t * _sigmoid(t), lambda p: [_SILU_ARGMIN], lipschitz=1.1),
        Activation(
            "quick_gelu",
            lambda t, p: t * _sigmoid(p["alpha"] * t),
            lambda p: [_SILU_ARGMIN / p["alpha"]],
            lipschitz=1.1,
        ),
    ]
}


def make(name: str, **params: float | np.ndarray) -> Activation:
    """A registry activation with its parameters bound (e.g. ``make("leaky_relu", alpha=0.01)``)."""
    act = REGISTRY[name].with_params(**params)
    if name == "clip":
        lo, hi = float(np.min(act.params["min"])), float(np.max(act.params["max"]))
        bound = max(abs(lo), abs(hi)) if math.isfinite(lo) and math.isfinite(hi) else None
        act = replace(act, zero_at_zero=lo <= 0.0 <= hi, bounded_by=bound)
    elif name in ("leaky_relu", "prelu"):
        slope = act.params["alpha" if name == "leaky_relu" else "slope"]
        act = replace(act, lipschitz=max(1.0, float(np.max(np.abs(slope)))))
    elif name in ("elu", "celu"):
        act = replace(act, lipschitz=max(1.0, float(np.max(np.abs(act.params["alpha"])))))
    elif name == "selu":
        gamma, alpha = float(act.params["gamma"]), float(act.params["alpha"])
        act = replace(act, lipschitz=abs(gamma) * max(1.0, abs(alpha)))
    elif name == "hard_sigmoid":
        act = replace(act, lipschitz=abs(float(act.params["alpha"])), zero_at_zero=float(act.params["beta"]) == 0.0)
    elif name == "quick_gelu":
        act = replace(act, lipschitz=1.1 * max(1.0, abs(float(act.params["alpha"]))))
    return act


# Scalar functions an exporter may spell out as a subgraph; chains.py evaluates a candidate
# subgraph and keeps the first entry it reproduces. Order matters: closest look-alikes last.
SUBGRAPH_FUNCTIONS: list[tuple[str, dict[str, float]]] = [
    ("gelu", {}),
    ("gelu_tanh", {}),
    ("silu", {}),
    ("quick_gelu", {"alpha": 1.702}),
    ("mish", {}),
    ("hard_swish", {}),
    ("sigmoid", {}),
    ("tanh", {}),
    ("softplus", {}),
    ("relu", {}),
    ("clip", {"min": 0.0, "max": 6.0}),
]


@dataclass(frozen=True)
class OpForm:
    """How one ONNX op maps onto a registry activation.

    ``params`` turns the node's attributes and constant inputs into the entry's parameters;
    ``per_neuron_inputs`` are input positions holding one value per neuron (sliced by surgery);
    ``bias_input`` is an input added to the pre-activation before φ (BiasGelu, FastGelu).
    """

    name: str
    params: Callable[[dict, list], dict] = lambda attrs, inputs: {}
    per_neuron_inputs: tuple[int, ...] = ()
    bias_input: int | None = None


def _clip_params(attrs: dict, inputs: list) -> dict:
    low = inputs[1] if len(inputs) > 1 and inputs[1] is not None else attrs.get("min", -np.inf)
    high = inputs[2] if len(inputs) > 2 and inputs[2] is not None else attrs.get("max", np.inf)
    return {"min": float(np.asarray(low).reshape(-1)[0]), "max": float(np.asarray(high).reshape(-1)[0])}


_SELU_ALPHA, _SELU_GAMMA = 1.67326319217681884765625, 1.05070102214813232421875
_MS = "com.microsoft"

SINGLE_OPS: dict[tuple[str, str], OpForm] = {
    ("", "Relu"): OpForm("relu"),
    ("", "LeakyRelu"): OpForm("leaky_relu", lambda a, i: {"alpha": a.get("alpha", 0.01)}),
    ("", "PRelu"): OpForm("prelu", lambda a, i: {"slope": np.asarray(i[1], np.float64).reshape(-1)}, (1,)),
    ("", "Sigmoid"): OpForm("sigmoid"),
    ("", "Tanh"): OpForm("tanh"),
    ("", "Softplus"): OpForm("softplus"),
    ("", "Elu"): OpForm("elu", lambda a, i: {"alpha": a.get("alpha", 1.0)}),
    ("", "Selu"): OpForm("selu", lambda a, i: {"alpha": a.get("alpha", _SELU_ALPHA), "gamma": a.get("gamma", _SELU_GAMMA)}),
    ("", "Celu"): OpForm("celu", lambda a, i: {"alpha": a.get("alpha", 1.0)}),
    ("", "HardSigmoid"): OpForm("hard_sigmoid", lambda a, i: {"alpha": a.get("alpha", 0.2), "beta": a.get("beta", 0.5)}),
    ("", "HardSwish"): OpForm("hard_swish"),
    ("", "Clip"): OpForm("clip", _clip_params),
    ("", "Mish"): OpForm("mish"),
    ("", "Gelu"): OpForm("gelu"),  # approximate="tanh" is remapped in chains.single_op_activation
    (_MS, "Gelu"): OpForm("gelu"),
    (_MS, "FastGelu"): OpForm("gelu_tanh", per_neuron_inputs=(1,), bias_input=1),
    (_MS, "BiasGelu"): OpForm("gelu", per_neuron_inputs=(1,), bias_input=1),
    (_MS, "QuickGelu"): OpForm("quick_gelu", lambda a, i: {"alpha": a.get("alpha", 1.702)}),
}
