"""Least-squares compensation of a pruned layer, in closed form and plain numpy. Knows nothing of graphs.

After a selection keeps the neurons K, the consumers' weights on K (and their biases) are refit
so that the consumers' pre-activations change as little as possible, in mean square, over a
distribution of inputs:

    minimise   E ‖U h(x) + c − (U' h'_K(x) + c + δ)‖²  + λ ‖U' − U_K‖²
    solution   U'ᵀ = (Cov(h'_K) + λI)⁻¹ (Cov(h'_K, h) Uᵀ + λ U_Kᵀ),   δ = U E[h] − U' E[h'_K]

h is the hidden layer of the original network and h' the one that runs after the earlier
layers were pruned (the same, for probes drawn at the layer itself), so the fit also absorbs
the error the earlier layers left. A consumer without a bias to edit gets δ = 0 and the
uncentred solution (second moments instead of covariances). Everything is computed from
:class:`Moments` (E[h'h'ᵀ], E[h'tᵀ] and E‖t‖² for the target t = U h, and the means), estimated
from samples: calibration activations (``data-ls``) or probes of the input ball (``ball-ls``).
The ridge λ is relative: ``ridge`` × the mean variance of the kept neurons.

:func:`greedy_selection` picks the neurons for this fit directly: forward selection by pivoted
Cholesky, each step adding the neuron that most reduces the fit's residual.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RIDGE = 1e-6  # relative ridge toward the original weights (numerical safety; 1e-3 measured no better)


@dataclass(frozen=True, eq=False)
class Moments:
    """The moments a refit needs, per sample: of h' (what runs) and of the target t = U h (what was).

    Everything the fit, its error and the greedy selection use is a function of these, so the
    original hidden values enter only through t: O(N·n·k) rather than O(N·n²) to collect.
    """

    count: float
    mean_current: np.ndarray  # [n] E[h']
    mean_target: np.ndarray  # [k] E[t]
    current: np.ndarray  # [n, n] E[h' h'ᵀ]
    cross: np.ndarray  # [n, k] E[h' tᵀ]
    energy: float  # E[‖t‖²]

    @property
    def size(self) -> int:
        return int(self.mean_current.size)

    @staticmethod
    def of(current: np.ndarray, original: np.ndarray | None, out_weights: np.ndarray, chunk: int = 4096) -> Moments:
        """Moments of samples h' [N, n] and h [N, n] (None: the same samples) for consumers U [k, n]."""
        current = np.asarray(current)
        original = current if original is None else np.asarray(original)
        u = np.asarray(out_weights, dtype=np.float64)
        if current.shape != original.shape or current.ndim != 2 or current.shape[0] == 0 or u.shape[1] != current.shape[1]:
            raise ValueError(f"moments need [N, n] samples of one shape and [k, n] weights, got {current.shape}, {original.shape}, {u.shape}")
        count, n = current.shape
        second, cross = np.zeros((n, n)), np.zeros((n, u.shape[0]))
        sum_now, sum_target, energy = np.zeros(n), np.zeros(u.shape[0]), 0.0
        for start in range(0, count, chunk):
            h_now = np.asarray(current[start : start + chunk], dtype=np.float64)
            target = np.asarray(original[start : start + chunk], dtype=np.float64) @ u.T
            second += h_now.T @ h_now
            cross += h_now.T @ target
            sum_now += h_now.sum(axis=0)
            sum_target += target.sum(axis=0)
            energy += float(np.einsum("ij,ij->", target, target))
        return Moments(float(count), sum_now / count, sum_target / count, second / count, cross / count, energy / count)

    def mixed(self, other: Moments, weight: float) -> Moments:
        """(1 − weight)·self + weight·other: the moments of a mixture of the two sample distributions."""
        if other.size != self.size or other.cross.shape != self.cross.shape:
            raise ValueError("moments of different layers cannot be mixed")
        a, b = 1.0 - weight, weight
        return Moments(
            self.count + other.count,
            a * self.mean_current + b * other.mean_current,
            a * self.mean_target + b * other.mean_target,
            a * self.current + b * other.current,
            a * self.cross + b * other.cross,
            a * self.energy + b * other.energy,
        )


@dataclass(frozen=True, eq=False)
class Refit:
    """New consumer weights on the kept neurons and the shift of each consumer output's bias."""

    weights: np.ndarray  # [k, |K|], the u in the certificate's c = w − u
    bias_shift: np.ndarray  # [k], 0 where the consumer has no bias to edit


def fit(
    moments: Moments,
    out_weights: np.ndarray,
    kept: np.ndarray,
    *,
    bias: bool | np.ndarray = True,
    ridge: float | None = None,
) -> Refit:
    """The least-squares consumer weights on ``kept`` (see the module docstring), row by row.

    ``bias`` says, per consumer output (or for all), whether a bias correction δ may be added;
    rows without one are fit on second moments so that their mean error is minimised too.
    """
    ridge = RIDGE if ridge is None else ridge
    out_weights = np.asarray(out_weights, dtype=np.float64)
    kept = np.asarray(kept, dtype=np.int64)
    k = out_weights.shape[0]
    with_bias = np.array(np.broadcast_to(np.asarray(bias, dtype=bool), (k,)))
    weights = np.zeros((k, kept.size))
    shift = np.zeros(k)
    if kept.size == 0:
        shift[with_bias] = moments.mean_target[with_bias]
        return Refit(weights, shift)
    mean_kept = moments.mean_current[kept]
    for centred in (True, False):
        rows = np.flatnonzero(with_bias == centred)
        if rows.size == 0:
            continue
        gram = moments.current[np.ix_(kept, kept)]
        target = moments.cross[np.ix_(kept, rows)]  # [|K|, rows]
        if centred:
            gram = gram - np.outer(mean_kept, mean_kept)
            target = target - np.outer(mean_kept, moments.mean_target[rows])
        lam = ridge * max(float(np.trace(gram)) / kept.size, 1e-300)
        rhs = target + lam * out_weights[np.ix_(rows, kept)].T
        weights[rows] = _solve_spd(gram + lam * np.eye(kept.size), rhs).T
        if centred:
            shift[rows] = moments.mean_target[rows] - weights[rows] @ mean_kept
    return Refit(weights, shift)


def _solve_spd(matrix: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(matrix, rhs)
    except np.linalg.LinAlgError:  # singular to working precision: the minimum-norm solution
        return np.linalg.lstsq(matrix, rhs, rcond=None)[0]


def unchanged(out_weights: np.ndarray, kept: np.ndarray, scale: np.ndarray) -> Refit:
    """The refit that a plain selection amounts to: u = w on K times the scale, no bias shift."""
    out_weights = np.asarray(out_weights, dtype=np.float64)
    return Refit(out_weights[:, kept] * np.asarray(scale, dtype=np.float64), np.zeros(out_weights.shape[0]))


def mean_squared_error(moments: Moments, kept: np.ndarray, refit: Refit) -> float:
    """E ‖t − (U' h'_K + δ)‖² / k with t = U h: the mean squared change of a consumer pre-activation."""
    v, delta = refit.weights, refit.bias_shift
    kept = np.asarray(kept, dtype=np.int64)
    k = delta.size
    crossed = np.einsum("ij,ji->", v, moments.cross[kept])
    current = np.einsum("ij,ij->", v @ moments.current[np.ix_(kept, kept)], v)
    mean_now = v @ moments.mean_current[kept]
    total = moments.energy - 2.0 * crossed + current - 2.0 * delta @ moments.mean_target + 2.0 * delta @ mean_now + delta @ delta
    return max(float(total), 0.0) / max(k, 1)


def output_energy(moments: Moments) -> float:
    """E ‖t − E[t]‖² / k: the error of dropping every neuron with the best bias, a scale for errors."""
    k = moments.mean_target.size
    return max(moments.energy - float(moments.mean_target @ moments.mean_target), 0.0) / max(k, 1)


def greedy_selection(moments: Moments, target: int, *, ridge: float | None = None) -> np.ndarray:
    """The ``target`` neurons chosen one at a time, each reducing the least-squares residual most.

    With R = Cov(h') + λI and A = Cov(t, h') (a [k, n] matrix), adding neuron j to the kept set
    lowers the residual E‖t − U' h'_K − δ‖² by ‖A_{:,j}‖² / R_jj, where A and R are the
    residuals after regressing on the neurons already kept. Both follow from the pivoted
    Cholesky columns ℓ of the chosen neurons: R_S = R − L Lᵀ and A_S = A − B Lᵀ with
    b = A_S[:, j]/√R_S,jj, so each step costs O((k + t)·n) without rewriting A or R.
    """
    ridge = RIDGE if ridge is None else ridge
    n = moments.size
    target = max(0, min(int(target), n))
    covariance = moments.current - np.outer(moments.mean_current, moments.mean_current)
    covariance = covariance + ridge * max(float(np.trace(covariance)) / n, 1e-300) * np.eye(n)
    initial = np.ascontiguousarray((moments.cross - np.outer(moments.mean_current, moments.mean_target)).T)  # [k, n]
    norms = np.einsum("ij,ij->j", initial, initial)  # ‖A_S[:, j]‖², kept current
    diagonal = np.diag(covariance).copy()  # R_S[j, j]
    # Lᵀ and Bᵀ, one row per step: contiguous prefixes. einsum rather than @ for these matrix-vector
    # products: single-threaded, it stays fast where BLAS threads contend for busy cores.
    columns = np.zeros((target, n))
    loadings = np.zeros((target, initial.shape[0]))
    available = np.ones(n, dtype=bool)
    chosen = np.zeros(target, dtype=np.int64)
    for step in range(target):
        gains = np.where(available, norms / np.maximum(diagonal, 1e-300), -np.inf)
        j = int(np.argmax(gains))
        pivot = np.sqrt(max(diagonal[j], 1e-300))
        previous = columns[:step, j]
        column = (covariance[:, j] - np.einsum("sn,s->n", columns[:step], previous)) / pivot
        load = (initial[:, j] - np.einsum("sk,s->k", loadings[:step], previous)) / pivot
        overlap = np.einsum("sk,k->s", loadings[:step], load)
        projection = np.einsum("k,kn->n", load, initial) - np.einsum("s,sn->n", overlap, columns[:step])  # bᵀ A_S
        norms = np.maximum(norms - 2.0 * column * projection + column**2 * (load @ load), 0.0)
        diagonal -= column**2
        columns[step], loadings[step] = column, load
        available[j] = False
        chosen[step] = j
    return np.sort(chosen)


def data_sup(hidden: np.ndarray, kind: str) -> np.ndarray:
    """sup |ψ_j| replaced by a statistic of calibration activations [N, n]: ``rms`` or ``max`` of |ψ_j|."""
    hidden = np.asarray(hidden, dtype=np.float64)
    if kind == "rms":
        return np.sqrt(np.mean(hidden**2, axis=0))
    if kind == "max":
        return np.max(np.abs(hidden), axis=0)
    raise ValueError(f"unknown data statistic '{kind}'; choose rms or max")


# ---------------------------------------------------------------------------------------------
# Data-free input distributions


def ball(count: int, dim: int, radius: float, rng: np.random.Generator) -> np.ndarray:
    """``count`` points uniform in the ball ‖x‖ ≤ radius of R^dim."""
    direction = rng.standard_normal((count, dim))
    direction /= np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-300)
    return radius * rng.uniform(0.0, 1.0, (count, 1)) ** (1.0 / max(dim, 1)) * direction


def gaussian(count: int, dim: int, radius: float, rng: np.random.Generator) -> np.ndarray:
    """N(0, r²/(d+2)·I): the Gaussian with the second moment of the uniform ball of radius r."""
    return rng.standard_normal((count, dim)) * (radius / np.sqrt(dim + 2.0))


def layernorm_outputs(count: int, gamma: np.ndarray, shift: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Points uniform on the set LayerNormalization can output: γ ⊙ z + β, z of mean 0 and norm √d.

    LayerNorm over the last axis maps any row to z = (x − mean)/std, which has zero mean and
    ‖z‖ = √d (slightly less with its ε), then applies γ and β: the exact output set, data-free.
    """
    gamma = np.asarray(gamma, dtype=np.float64).reshape(-1)
    shift = np.broadcast_to(np.asarray(shift, dtype=np.float64).reshape(-1), gamma.shape)
    dim = gamma.size
    z = rng.standard_normal((count, dim))
    z -= z.mean(axis=1, keepdims=True)
    z *= np.sqrt(dim) / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-300)
    return z * gamma + shift
