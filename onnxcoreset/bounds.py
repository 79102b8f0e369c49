"""Sound bounds on the input ball: ranges, radii, and the certified error of a pruned chain.

Notation. The chain's input is x ∈ R^d with ‖x‖ ≤ r; z = [x; 1], so ‖z‖² ≤ R² = r² + 1. Neuron j
has the point p_j = [w_j; b_j], pre-activation t_j = p_j·z ∈ [b_j − r‖w_j‖, b_j + r‖w_j‖] (exactly
this interval: the extremes are at x = ±r·w_j/‖w_j‖), and hidden value ψ_j = a_j·φ_j(t_j) + s_j.
Pruning changes consumer neuron i's input by

    e_i(x) = Σ_j c_ij ψ_j(x),   c_ij = w_i(j) − u_i(j)   (u = the stored pruned weight, 0 if dropped).

:func:`certify` returns max_i sup_{‖x‖≤r} |e_i(x)|, bounded from above by the smallest of:

1. the triangle inequality Σ_j |c_ij| sup|ψ_j| (reported for comparison; never the smallest);
2. sign-split interval arithmetic on each neuron's exact range [lo_j, hi_j] (activations.range_on):
   e_i ∈ [Σ c⁺lo + c⁻hi, Σ c⁺hi + c⁻lo], never worse than 1;
3. a ReLU decomposition φ(t) = λt + κ + Σ_k μ_k relu(σ_k t + τ_k) + g(t) (see :func:`relu_form`),
   in which the linear part is bounded exactly, the bounded remainder g by intervals, and each sign
   of the ReLU part by Cauchy–Schwarz (:func:`_relu_part_bound`), once with shared weights for
   all consumers and then consumer by consumer with the eigenvalue bound, in branch-and-bound order.

Every bound is an upper bound for real arithmetic; a relative 1e-9 of the triangle bound is added
so that the float64 evaluation of e_i (rounding ≤ n·2⁻⁵³ of it) never exceeds the certificate.
This module is plain numpy: it sees weights, never graphs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from . import activations
from .activations import Activation
from .blockwise import float64_blocks, one_blas_thread

if TYPE_CHECKING:  # the layer type only; importing neurons would pull in the graph modules
    from .neurons import HiddenLayer

ROUNDING_SLACK = 1e-9  # relative to the triangle bound, see the module docstring
_EIG_SLACK = 1e-9  # relative to the trace: eigvalsh is backward stable to ~d·2⁻⁵³·‖M‖ ≤ d·2⁻⁵³·tr M


def preactivation_interval(layer: HiddenLayer, radius: float) -> tuple[np.ndarray, np.ndarray]:
    half = radius * layer.weight_norms  # float64, cached: the weights may be a float32 view
    return layer.bias - half, layer.bias + half


def neuron_range(layer: HiddenLayer, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-neuron (min, max) of ψ_j over ‖x‖ ≤ radius."""
    lo, hi = layer.activation.range_on(*preactivation_interval(layer, radius))
    if layer.multiplier_weights is not None:
        # Gated FFN: φ(w_j·x+b_j)·(v_j·x+c_j) lies in the product of the two factors' intervals on the
        # ball (sound, not exact: both factors see the same x). Widened by a relative 1e-12 for rounding.
        half = radius * np.linalg.norm(layer.multiplier_weights, axis=1)
        m_lo, m_hi = layer.multiplier_bias - half, layer.multiplier_bias + half
        corners = np.stack([lo * m_lo, lo * m_hi, hi * m_lo, hi * m_hi])
        slack = 1e-12 * (1.0 + np.max(np.abs(corners), axis=0))
        lo, hi = corners.min(axis=0) - slack, corners.max(axis=0) + slack
    low = np.where(layer.post_scale >= 0, layer.post_scale * lo, layer.post_scale * hi) + layer.post_shift
    high = np.where(layer.post_scale >= 0, layer.post_scale * hi, layer.post_scale * lo) + layer.post_shift
    return low, high


def activation_sup(layer: HiddenLayer, radius: float) -> np.ndarray:
    """sup over the ball of |ψ_j|, per neuron."""
    low, high = neuron_range(layer, radius)
    return np.maximum(np.abs(low), np.abs(high))


# ---------------------------------------------------------------------------------------------
# Norms and radii


def largest_eigenvalue(matrix: np.ndarray) -> float:
    """A sound upper bound on λ_max of a symmetric positive semi-definite matrix."""
    if matrix.size == 0:
        return 0.0
    if not np.all(np.isfinite(matrix)):  # NaN/Inf weights: no finite bound (and LAPACK would not converge)
        return math.inf
    top = float(np.linalg.eigvalsh(matrix)[-1])
    return max(top, 0.0) + _EIG_SLACK * float(np.trace(matrix)) + 1e-300


def spectral_norm(matrix: np.ndarray) -> float:
    """A sound upper bound on ‖M‖₂, through the smaller of the two Gram matrices."""
    if matrix.size == 0:
        return 0.0
    gram = matrix @ matrix.T if matrix.shape[0] <= matrix.shape[1] else matrix.T @ matrix
    return math.sqrt(largest_eigenvalue(gram))


def ball_quadratic_sup(weights: np.ndarray, bias: np.ndarray, share: np.ndarray, radius: float) -> float:
    """A sound upper bound on sup_{‖x‖≤r} Σ_j ω_j (w_j·x + b_j)² for ω ≥ 0, with the bias exact.

    Write the sum as xᵀAx + 2gᵀx + h (A = Σ ω w wᵀ ⪰ 0, g = Σ ω b w, h = Σ ω b²). For every
    λ > λ_max(A), λ‖x‖² − xᵀAx − 2gᵀx ≥ −gᵀ(λI − A)⁻¹g (the minimum of a convex quadratic), so
        sum ≤ f(λ) = λr² + h + Σ_k g̃_k²/(λ − λ_k)        (eigenpairs λ_k of A, g̃ = Qᵀg),
    and min_λ f is the exact supremum (the S-lemma). f is convex in λ; its minimiser lies in
    (λ_max, λ_max + ‖g‖/r], found by golden section on log(λ − λ_max); any λ gives a valid bound.
    Eigenpairs come from the smaller Gram matrix; a relative 1e-9 of tr(M)·(r² + 1) covers their
    rounding (eigh is backward stable to ~d·2⁻⁵³·‖M‖).
    """
    active = share > 0
    root = np.sqrt(share[active])
    b_mat = np.asarray(weights[active], dtype=np.float64) * root[:, None]
    beta = np.asarray(bias[active], dtype=np.float64) * root
    h = float(beta @ beta)
    trace = float(np.einsum("ij,ij->", b_mat, b_mat)) + h
    slack = _EIG_SLACK * trace * (radius**2 + 1.0) + 1e-300
    if not (math.isfinite(trace) and math.isfinite(radius)):  # NaN/Inf upstream: no finite bound (eigh would not converge)
        return math.inf
    if b_mat.size == 0:
        return h + slack
    if b_mat.shape[0] <= b_mat.shape[1]:
        lam, vectors = np.linalg.eigh(b_mat @ b_mat.T)  # A's non-zero spectrum; g lies in its range
        lam = np.clip(lam, 0.0, None)
        g2 = lam * (vectors.T @ beta) ** 2
    else:
        lam, vectors = np.linalg.eigh(b_mat.T @ b_mat)
        lam = np.clip(lam, 0.0, None)
        g2 = (vectors.T @ (b_mat.T @ beta)) ** 2
    top = float(lam.max())
    if radius <= 0:
        return h + slack
    g_norm = math.sqrt(float(g2.sum()))
    if g_norm == 0.0:
        return top * radius**2 + h + slack

    def f(log_delta: float) -> float:
        value = top + math.exp(log_delta)
        with np.errstate(divide="ignore", invalid="ignore"):
            result = value * radius**2 + h + float(np.sum(g2 / (value - lam)))
        return result if math.isfinite(result) else math.inf

    # δ = λ − λ_max from where it still changes λ in float64 up to ‖g‖/r, where f' ≥ 0 already
    hi = math.log(g_norm / radius)
    lo = max(hi - 60.0, math.log(max(8.0 * np.finfo(float).eps * top, 1e-300)))
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = min(lo, hi), hi
    for _ in range(80):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        if f(c) < f(d):
            b = d
        else:
            a = c
    plain = top * radius**2 + 2.0 * g_norm * radius + h  # xᵀAx ≤ λ_max r², 2gᵀx ≤ 2‖g‖r
    return min(f(0.5 * (a + b)), f(hi), plain) + slack


def ball_affine_norm(weights: np.ndarray, bias: np.ndarray, radius: float) -> float:
    """An upper bound on sup_{‖x‖≤r} ‖W x + b‖ for W of shape [n, d].

    The smaller of the triangle inequality ‖W‖₂·r + ‖b‖ and the exact supremum of ‖Wx + b‖²
    from :func:`ball_quadratic_sup` with ω = 1.
    """
    triangle = spectral_norm(weights) * radius + float(np.linalg.norm(bias))
    exact = math.sqrt(ball_quadratic_sup(weights, bias, np.ones(weights.shape[0]), radius))
    return min(triangle, exact)


def output_radius(layer: HiddenLayer, radius: float) -> float:
    """A sound bound on ‖ψ(x)‖₂ over ‖x‖ ≤ radius: the smallest of three valid ones.

    * the norm of the per-neuron sups (each |ψ_j| ≤ sup_j, so ‖ψ‖² ≤ Σ sup_j²);
    * Lipschitz, for φ(0) = 0 with |φ(t)| ≤ L|t|: ‖ψ‖ ≤ max|a|·L·sup‖Wx + b‖ + ‖s‖;
    * bounded φ: ‖ψ‖ ≤ √n·max|a|·sup|φ| + ‖s‖.

    The layer passed in should be the pruned one, since that is what runs.
    """
    candidates = [float(np.linalg.norm(activation_sup(layer, radius)))]
    if layer.multiplier_weights is None and layer.size:
        act = layer.activation
        scale = float(np.max(np.abs(layer.post_scale)))
        shift = float(np.linalg.norm(layer.post_shift))
        if act.zero_at_zero and math.isfinite(act.lipschitz):
            candidates.append(scale * act.lipschitz * ball_affine_norm(layer.weights, layer.bias, radius) + shift)
        if act.bounded_by is not None:
            candidates.append(math.sqrt(layer.size) * scale * act.bounded_by + shift)
    return min(candidates)


# ---------------------------------------------------------------------------------------------
# ReLU decompositions


@dataclass(frozen=True, eq=False)
class ReluForm:
    """φ(t) = slope·t + offset + Σ_k weight_k·relu(scale_k·t + shift_k) + g(t), per neuron.

    ``residual_critical`` lists the points where the remainder g stops being monotone (so its
    range on an interval is attained at the ends or there); None means g ≡ 0 exactly.
    """

    slope: np.ndarray
    offset: np.ndarray
    atoms: tuple[tuple[np.ndarray, float, float], ...]
    residual_critical: tuple[float, ...] | None = None

    def evaluate(self, t: np.ndarray) -> np.ndarray:
        """The decomposition without g, elementwise (t of shape [..., n])."""
        value = self.slope * t + self.offset
        for weight, scale, shift in self.atoms:
            value = value + weight * np.maximum(scale * t + shift, 0.0)
        return value


def _mish_positive_argmin() -> float:
    return activations._argmin(lambda t: t * (np.tanh(activations._softplus(t)) - 1.0), 0.0, 10.0)


_MISH_POSITIVE_ARGMIN = _mish_positive_argmin()


def relu_form(activation: Activation, n: int) -> ReluForm | None:
    """The activation as a linear part, ReLUs and a bounded remainder, or None when none is known.

    GELU, SiLU, quick-GELU and tanh-GELU are relu(t) + g(t) with g(t) = φ(−|t|) (since
    φ(t) − t = φ(−t) for φ(t) = t·F(t) with F(t) + F(−t) = 1), so g has its extremes at ±argmin φ
    and a kink at 0; for GELU |g| ≤ 0.17. Leaky ReLU is αt + (1−α)relu(t), clip(t, lo, hi) is
    lo + relu(t − lo) − relu(t − hi) and hard-sigmoid clip(αt+β, 0, 1) is relu(αt+β) − relu(αt+β−1),
    all exact. ELU, SELU, CELU, softplus, Mish and hard-swish are a ReLU plus a bounded remainder.
    """
    p = activation.params
    ones, zeros = np.ones(n), np.zeros(n)
    name = activation.name

    def plain(weight=ones, critical: tuple[float, ...] | None = None) -> ReluForm:
        return ReluForm(zeros, zeros, ((np.broadcast_to(weight, (n,)).astype(np.float64), 1.0, 0.0),), critical)

    if name == "identity":
        return ReluForm(ones, zeros, ())
    if name == "relu":
        return plain()
    if name in ("leaky_relu", "prelu"):
        raw = np.asarray(p["alpha" if name == "leaky_relu" else "slope"], np.float64).reshape(-1)
        if raw.size not in (1, n) or not np.all(np.isfinite(raw)):
            return None
        slope = np.broadcast_to(raw, (n,)).copy()
        return ReluForm(slope, zeros, ((1.0 - slope, 1.0, 0.0),))
    if name in ("elu", "softplus"):
        return plain(critical=(0.0,))
    if name == "celu":
        return plain(critical=(0.0,)) if float(np.min(p["alpha"])) > 0 else None
    if name == "selu":
        return plain(ones * float(p["gamma"]), critical=(0.0,))
    if name in ("gelu", "gelu_tanh", "silu"):
        argmin = {"gelu": activations._GELU_ARGMIN, "gelu_tanh": activations._GELU_TANH_ARGMIN,
                  "silu": activations._SILU_ARGMIN}[name]
        return plain(critical=(argmin, 0.0, -argmin))
    if name == "quick_gelu":
        alpha = float(np.reshape(p["alpha"], -1)[0]) if np.size(p["alpha"]) == 1 else 0.0
        if alpha <= 0:
            return None
        return plain(critical=(activations._SILU_ARGMIN / alpha, 0.0, -activations._SILU_ARGMIN / alpha))
    if name == "mish":
        return plain(critical=(activations._MISH_ARGMIN, 0.0, _MISH_POSITIVE_ARGMIN))
    if name == "hard_swish":
        return plain(critical=(-3.0, -1.5, 0.0, 1.5, 3.0))
    if name == "clip" and np.size(p["min"]) == 1 and np.size(p["max"]) == 1:
        lo, hi = float(np.reshape(p["min"], -1)[0]), float(np.reshape(p["max"], -1)[0])
        if not lo < hi:
            return None
        atoms, slope, offset = [], zeros, zeros
        if math.isfinite(lo):
            atoms.append((ones, 1.0, -lo))
            offset = ones * lo
        else:
            slope = ones
        if math.isfinite(hi):
            atoms.append((-ones, 1.0, -hi))
        return ReluForm(slope, offset, tuple(atoms))
    if name == "hard_sigmoid" and np.size(p["alpha"]) == 1 and np.size(p["beta"]) == 1:
        alpha, beta = float(np.reshape(p["alpha"], -1)[0]), float(np.reshape(p["beta"], -1)[0])
        if alpha == 0.0:
            return None
        return ReluForm(zeros, zeros, ((ones, alpha, beta), (-ones, alpha, beta - 1.0)))
    return None


def residual_range(activation: Activation, form: ReluForm, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact (min, max) of g = φ − form on [lo_j, hi_j], widened for the rounding of the subtraction."""
    if form.residual_critical is None:
        return np.zeros_like(lo), np.zeros_like(hi)
    candidates = [lo, hi] + [np.clip(c, lo, hi) for c in form.residual_critical]
    values = np.stack([activation(t) - form.evaluate(t) for t in candidates])
    atoms = sum((np.abs(w * s) for w, s, _ in form.atoms), np.zeros_like(lo))
    slack = 1e-12 * (1.0 + (np.abs(lo) + np.abs(hi)) * (1.0 + np.abs(form.slope) + atoms) + np.abs(values).max(axis=0))
    return values.min(axis=0) - slack, values.max(axis=0) + slack


# ---------------------------------------------------------------------------------------------
# The certificate


@dataclass(frozen=True, eq=False)
class Certificate:
    """The certified bound of one pruned chain, with the simpler bounds it improves on."""

    bound: float  # max over consumer neurons i of sup_{‖x‖≤r} |e_i(x)|
    per_consumer: np.ndarray  # [k], each consumer's certified bound
    triangle: float  # max_i Σ_j |c_ij| sup|ψ_j| (each with the same rounding slack as ``bound``)
    interval: float  # max_i of the sign-split interval bound alone
    exact_consumers: int  # consumers whose eigenvalue (per-consumer Cauchy–Schwarz) bound was computed


def coefficients(out_weights: np.ndarray, kept: np.ndarray, new_out_weights: np.ndarray) -> np.ndarray:
    """c = w − u for every original neuron: u is the pruned consumers' weight on kept neurons, 0 elsewhere."""
    result = np.array(out_weights, dtype=np.float64, copy=True)
    result[:, kept] -= new_out_weights
    return result


@dataclass(frozen=True, eq=False)
class _ReluParts:
    """Consumer-independent pieces of bound 3 and the per-consumer terms except the ReLU sums' tops."""

    points: np.ndarray  # [A, d+1], the atoms' points
    coefficient: np.ndarray  # [k, A], each consumer's coefficient on each atom
    base_upper: np.ndarray  # [k], upper bound of e_i minus the positive ReLU sum's upper bound
    base_lower: np.ndarray  # [k], lower bound of e_i plus the negative ReLU sum's upper bound
    positive_top: np.ndarray  # [k], current upper bound of Σ_{μ>0} μ relu(q·z)
    negative_top: np.ndarray  # [k], current upper bound of Σ_{μ<0} |μ| relu(q·z)
    radius: float  # r


def _relu_part_bound(weights: np.ndarray, share: np.ndarray, quadratic_sup: float) -> np.ndarray:
    """sup over ‖x‖ ≤ r of Σ_j m_j relu(q_j·z), z = [x; 1], for m ≥ 0 (rows of ``weights``), via shared ω.

    Cauchy–Schwarz with weights ω_j > 0:  Σ m_j relu(q_j·z) = Σ (m_j/√ω_j)(√ω_j relu(q_j·z))
        ≤ √(Σ m_j²/ω_j) · √(Σ ω_j relu(q_j·z)²) ≤ √(Σ m_j²/ω_j) · √(Σ ω_j (q_j·z)²)      (relu(t)² ≤ t²)
        ≤ √(Σ m_j²/ω_j) · √(sup_{‖x‖≤r} Σ ω_j (q_j·z)²),
    the last factor being ``quadratic_sup`` (:func:`ball_quadratic_sup`, at most λ_max(Σ ω q qᵀ)·(r² + 1)).
    Entries with ω_j = 0 must have m_j = 0.
    """
    safe = np.where(share > 0, share, 1.0)
    return np.sqrt(np.sum(weights**2 / safe, axis=1) * quadratic_sup)


def _weighted_top(weights: np.ndarray, points: np.ndarray, radius: float) -> float:
    """sup over ‖x‖ ≤ r of Σ_j m_j relu(q_j·z) for one consumer's m ≥ 0: the eigenvalue bound.

    Cauchy–Schwarz with ω = m:  Σ m_j relu(q_j·z) ≤ √(Σ m_j) · √(Σ m_j (q_j·z)²)
        ≤ √(Σ m_j) · √(sup_{‖x‖≤r} Σ m_j (q_j·z)²) ≤ √(Σ m_j) · √(λ_max(Σ m_j q_j q_jᵀ)·(r² + 1)),
    the supremum taken exactly in the bias (:func:`ball_quadratic_sup`).
    """
    support = np.flatnonzero(weights > 0)
    if support.size == 0:
        return 0.0
    m, q = weights[support], points[support]
    return math.sqrt(float(np.sum(m)) * ball_quadratic_sup(q[:, :-1], q[:, -1], m, radius))


def _relu_parts(layer: HiddenLayer, coef: np.ndarray, radius: float, form: ReluForm) -> _ReluParts:
    """Bound 3 for every consumer, with the ReLU sums bounded by intervals and shared-weight Cauchy–Schwarz."""
    effective = coef * layer.post_scale  # coefficient of φ_j in e_i
    constant = coef @ layer.post_shift + effective @ form.offset
    linear = (effective * form.slope) @ layer.points  # e_i's linear part is linear·z
    linear_half = radius * np.linalg.norm(linear[:, :-1], axis=1)
    lo, hi = preactivation_interval(layer, radius)
    g_lo, g_hi = residual_range(layer.activation, form, lo, hi)
    pos, neg = np.clip(effective, 0, None), np.clip(effective, None, 0)
    residual_hi, residual_lo = pos @ g_hi + neg @ g_lo, pos @ g_lo + neg @ g_hi

    points, blocks = [], []
    for weight, scale, shift in form.atoms:
        atom_points = layer.points * scale
        atom_points[:, -1] += shift
        points.append(atom_points)
        blocks.append(effective * weight)
    if points:
        atom_points = np.vstack(points)
        atom_coef = np.hstack(blocks)
    else:
        atom_points, atom_coef = np.zeros((0, layer.points.shape[1])), np.zeros((coef.shape[0], 0))
    half = radius * np.linalg.norm(atom_points[:, :-1], axis=1)
    relu_lo, relu_hi = np.maximum(atom_points[:, -1] - half, 0.0), np.maximum(atom_points[:, -1] + half, 0.0)
    plus, minus = np.clip(atom_coef, 0, None), -np.clip(atom_coef, None, 0)
    positive_top, negative_top = plus @ relu_hi, minus @ relu_hi
    if atom_points.shape[0]:
        for share in _shared_weights(atom_coef):
            quadratic = ball_quadratic_sup(atom_points[:, :-1], atom_points[:, -1], share, radius)
            positive_top = np.minimum(positive_top, _relu_part_bound(plus, share, quadratic))
            negative_top = np.minimum(negative_top, _relu_part_bound(minus, share, quadratic))
    base = constant + linear[:, -1]
    return _ReluParts(
        atom_points,
        atom_coef,
        base + linear_half - minus @ relu_lo + residual_hi,
        base - linear_half + plus @ relu_lo + residual_lo,
        positive_top,
        negative_top,
        radius,
    )


def _shared_weights(atom_coef: np.ndarray) -> list[np.ndarray]:
    """The ω tried by :func:`_relu_part_bound`: 1, and the rms and max of |coefficient| over consumers."""
    used = np.any(atom_coef != 0, axis=0)
    magnitude = np.abs(atom_coef)
    return [
        used.astype(np.float64),
        np.where(used, np.sqrt(np.mean(magnitude**2, axis=0)), 0.0),
        np.where(used, np.max(magnitude, axis=0), 0.0),
    ]


def certify(layer: HiddenLayer, coef: np.ndarray, radius: float, *, target: float | None = None) -> Certificate:
    """The certified bound max_i sup_{‖x‖≤radius} |e_i(x)| for coefficients c of shape [k, n].

    Branch and bound: consumers are visited in decreasing order of their cheap bound (1–3 with
    shared weights), and the per-consumer eigenvalue bound is computed until the next cheap bound
    is no larger than the largest bound already final. With ``target`` the search stops early once
    it is decided whether the bound is ≤ target: the result's ``bound`` is then still a valid upper
    bound, and it is ≤ target exactly when the full computation's would be.
    """
    coef = np.asarray(coef, dtype=np.float64)
    k = coef.shape[0]
    if k == 0 or not np.any(coef):
        zeros = np.zeros(k)
        return Certificate(0.0, zeros, 0.0, 0.0, 0)
    low, high = neuron_range(layer, radius)
    magnitude = np.maximum(np.abs(low), np.abs(high))
    triangle = np.abs(coef) @ magnitude
    plus, minus = np.clip(coef, 0, None), np.clip(coef, None, 0)
    upper, lower = plus @ high + minus @ low, plus @ low + minus @ high
    interval = np.maximum(np.abs(upper), np.abs(lower))
    form = relu_form(layer.activation, layer.size) if layer.multiplier_weights is None else None
    parts = _relu_parts(layer, coef, radius, form) if form is not None else None

    def consumer_bound(i: int) -> float:
        up, lo = upper[i], lower[i]
        if parts is not None:
            up = min(up, parts.base_upper[i] + parts.positive_top[i])
            lo = max(lo, parts.base_lower[i] - parts.negative_top[i])
        return max(abs(up), abs(lo))

    per_consumer = np.array([consumer_bound(i) for i in range(k)])
    exact = 0
    if parts is not None and parts.points.shape[0]:
        final = 0.0
        stop = final if target is None else target
        for i in np.argsort(-per_consumer, kind="stable"):
            if per_consumer[i] <= max(final, stop):
                break
            for part in ("positive", "negative"):
                top = parts.positive_top if part == "positive" else parts.negative_top
                weights = parts.coefficient[i] if part == "positive" else -parts.coefficient[i]
                top[i] = min(top[i], _weighted_top(np.clip(weights, 0, None), parts.points, parts.radius))
            per_consumer[i] = consumer_bound(i)
            exact += 1
            final = max(final, per_consumer[i])
            if target is not None and final > target:
                break
    slack = ROUNDING_SLACK * triangle
    per_consumer = per_consumer + slack
    return Certificate(
        float(per_consumer.max()), per_consumer, float((triangle + slack).max()), float((interval + slack).max()), exact
    )


def interval_error_bound(coefficients: np.ndarray, low: np.ndarray, high: np.ndarray) -> float:
    """max_i sup |Σ_j c_ij ψ_j| given ψ_j ∈ [low_j, high_j]: interval arithmetic, term by term."""
    positive = np.clip(coefficients, 0.0, None)
    negative = np.clip(coefficients, None, 0.0)
    upper = positive @ high + negative @ low
    lower = positive @ low + negative @ high
    return float(np.max(np.maximum(np.abs(upper), np.abs(lower)), initial=0.0))


def certified_bound(
    layer: HiddenLayer,
    kept: np.ndarray,
    scale: np.ndarray | None,
    radius: float,
    *,
    weights: np.ndarray | None = None,
    bias_shift: np.ndarray | None = None,
) -> float:
    """:func:`certify`'s bound for keeping ``kept`` with their outgoing weights multiplied by ``scale``.

    Refit consumers (compensate.py) give their new weights u on the kept neurons as ``weights``
    [k, |K|] (``scale`` is then ignored) and the shift δ of each consumer's bias as
    ``bias_shift``: the error becomes e_i = Σ_j c_ij ψ_j − δ_i, bounded by bound_i + |δ_i|.
    """
    new = layer.out_weights[:, kept] * scale if weights is None else np.asarray(weights, dtype=np.float64)
    certificate = certify(layer, coefficients(layer.out_weights, kept, new), radius)
    if bias_shift is None or not np.any(bias_shift):
        return certificate.bound
    return float(np.max(certificate.per_consumer + np.abs(np.asarray(bias_shift, dtype=np.float64))))


# ---------------------------------------------------------------------------------------------
# ε-driven size, and Theorem 7 for information


def fewest_neurons(meets: Callable[[int], bool], n: int) -> int:
    """Bisection for the count to keep: a k with meets(k) and not meets(k − 1), k ∈ [1, n].

    meets(n) is taken as true (keeping every neuron changes nothing). The bound need not be
    monotone in k for a sampled selection, so this finds *a* boundary, not always the global
    fewest. It is monotone in ε all the same: every ε walks the same tree of midpoints, and where
    two values of ε first decide differently the smaller goes right, above that midpoint, and the
    larger goes left, at or below it. So a smaller ε never keeps fewer neurons.
    """
    failing, passing = 0, n
    while passing - failing > 1:
        middle = (failing + passing) // 2
        if meets(middle):
            passing = middle
        else:
            failing = middle
    return passing


THEOREM7_DELTA = 0.1


def theorem7_sample_size(total_sensitivity: float, epsilon: float, dimension: int, delta: float = THEOREM7_DELTA) -> int | None:
    """m = ⌈(c·t/ε²)·(d·log t + log(1/δ))⌉ with c = 1: the sample size of Theorem 7's form.

    t = Σ_j s(j) is the total sensitivity, d the dimension of the points p_j (inputs + 1), δ the
    failure probability. The theorem's constant c is unspecified; c = 1 makes this a reference
    figure, not a guarantee. None when t or ε is not positive; at least 1.
    """
    if not (total_sensitivity > 0 and epsilon > 0 and math.isfinite(total_sensitivity) and epsilon**2 > 0):
        return None
    value = total_sensitivity / epsilon**2 * (dimension * math.log(total_sensitivity) + math.log(1.0 / delta))
    return max(1, math.ceil(value)) if math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------
# Large layers


def interval_certificate(layer: HiddenLayer, kept: np.ndarray, scale: np.ndarray, radius: float) -> float:
    """Bound 2 alone (sign-split intervals) plus the rounding slack, reading the outgoing weights a
    few MiB at a time: the certificate for layers too large for :func:`certify`'s eigenvalue bounds.

    c_ij = w_i(j)·f_j with f_j = 1 − scale_j for kept neurons and 1 for dropped ones. With centre
    m_j = (hi_j + lo_j)/2 and half-width h_j = (hi_j − lo_j)/2 the extremes of Σ_j c_ij ψ_j are
    c_i·m ± |c_i|·h, so bound 2 is |c_i·m| + |c_i|·h: the same number as the sign split, never
    smaller than :func:`certified_bound`'s, without the copies of c that the sign split needs.
    """
    factor = np.ones(layer.size)
    factor[kept] = 1.0 - np.asarray(scale, dtype=np.float64)
    low, high = neuron_range(layer, radius)
    centre = factor * (0.5 * high + 0.5 * low)  # halves first: no overflow near the float64 limit
    spread = np.abs(factor) * (0.5 * high - 0.5 * low)
    magnitude = np.abs(factor) * np.maximum(np.abs(low), np.abs(high))
    k = layer.out_weights.shape[0]
    middle, sums = np.zeros(k), np.zeros((k, 2))
    positive = np.stack([spread, magnitude], axis=1)  # both sums of |c| in one product
    with one_blas_thread():
        for rows, cols, block in float64_blocks(layer.out_weights):
            middle[rows] += block @ centre[cols]
            np.abs(block, out=block)  # a scratch copy: safe to overwrite
            sums[rows] += block @ positive[cols]
    width, triangle = sums[:, 0], sums[:, 1]
    return float(np.max(np.abs(middle) + width + ROUNDING_SLACK * triangle, initial=0.0))
