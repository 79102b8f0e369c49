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
:class:`Moments` (E[h'h'ᵀ], E[h'hᵀ], E[hhᵀ] and the means), estimated from samples: calibration
activations (``data-ls``) or probes of the input ball (``ball-ls``). The ridge λ is relative:
``ridge`` × the mean variance of the kept neurons.

:func:`greedy_selection` picks the neurons for this fit directly: forward selection by pivoted
Cholesky, each step adding the neuron that most reduces the fit's residual.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RIDGE = 1e-3  # relative ridge toward the original weights; large values give back U_K


@dataclass(frozen=True, eq=False)
class Moments:
    """First and second moments of the current hidden values h' and the original ones h, per sample."""

    count: float
    mean_current: np.ndarray  # [n] E[h']
    mean_original: np.ndarray  # [n] E[h]
    current: np.ndarray  # [n, n] E[h' h'ᵀ]
    cross: np.ndarray  # [n, n] E[h' hᵀ]
    original: np.ndarray  # [n, n] E[h hᵀ]

    @property
    def size(self) -> int:
        return int(self.mean_current.size)

    @staticmethod
    def of(current: np.ndarray, original: np.ndarray | None = None, chunk: int = 4096) -> Moments:
        """Moments of samples [N, n]; ``original`` None means the same samples (h' = h)."""
        current = np.asarray(current)
        same = original is None
        original = current if same else np.asarray(original)
        if current.shape != original.shape or current.ndim != 2 or current.shape[0] == 0:
            raise ValueError(f"moments need two [N, n] sample arrays of the same shape, got {current.shape} and {original.shape}")
        count, n = current.shape
        second = np.zeros((n, n))
        cross = np.zeros((n, n)) if not same else second
        energy = np.zeros((n, n)) if not same else second
        for start in range(0, count, chunk):
            h_now = np.asarray(current[start : start + chunk], dtype=np.float64)
            second += h_now.T @ h_now
            if not same:
                h_then = np.asarray(original[start : start + chunk], dtype=np.float64)
                cross += h_now.T @ h_then
                energy += h_then.T @ h_then
        mean_now = np.asarray(current, dtype=np.float64).mean(axis=0)
        mean_then = mean_now if same else np.asarray(original, dtype=np.float64).mean(axis=0)
        return Moments(float(count), mean_now, mean_then, second / count, cross / count, energy / count)

    def mixed(self, other: Moments, weight: float) -> Moments:
        """(1 − weight)·self + weight·other: a mixture of the two sample distributions."""
        if other.size != self.size:
            raise ValueError("moments of layers of different sizes cannot be mixed")
        a, b = 1.0 - weight, weight
        return Moments(
            self.count + other.count,
            a * self.mean_current + b * other.mean_current,
            a * self.mean_original + b * other.mean_original,
            a * self.current + b * other.current,
            a * self.cross + b * other.cross,
            a * self.original + b * other.original,
        )


@dataclass(frozen=True, eq=False)
class Refit:
    """New consumer weights on the kept neurons and the shift of each consumer output's bias."""

    weights: np.ndarray  # [k, |K|], the u in the certificate's c = w − u
    bias_shift: np.ndarray  # [k], 0 where the consumer has no bias to edit


def _as_mask(bias: bool | np.ndarray, k: int) -> np.ndarray:
    mask = np.broadcast_to(np.asarray(bias, dtype=bool), (k,))
    return np.array(mask)


def fit(
    moments: Moments,
    out_weights: np.ndarray,
    kept: np.ndarray,
    *,
    bias: bool | np.ndarray = True,
    ridge: float = RIDGE,
) -> Refit:
    """The least-squares consumer weights on ``kept`` (see the module docstring), row by row.

    ``bias`` says, per consumer output (or for all), whether a bias correction δ may be added;
    rows without one are fit on second moments so that their mean error is minimised too.
    """
    out_weights = np.asarray(out_weights, dtype=np.float64)
    kept = np.asarray(kept, dtype=np.int64)
    k = out_weights.shape[0]
    with_bias = _as_mask(bias, k)
    weights = np.zeros((k, kept.size))
    shift = np.zeros(k)
    if kept.size == 0:
        shift[with_bias] = out_weights[with_bias] @ moments.mean_original
        return Refit(weights, shift)
    mean_kept = moments.mean_current[kept]
    for centred in (True, False):
        rows = np.flatnonzero(with_bias == centred)
        if rows.size == 0:
            continue
        gram = moments.current[np.ix_(kept, kept)]
        cross = moments.cross[kept]  # [|K|, n]
        if centred:
            gram = gram - np.outer(mean_kept, mean_kept)
            cross = cross - np.outer(mean_kept, moments.mean_original)
        target = cross @ out_weights[rows].T  # [|K|, rows]
        lam = ridge * max(float(np.trace(gram)) / kept.size, 1e-300)
        rhs = target + lam * out_weights[rows][:, kept].T
        weights[rows] = _solve_spd(gram + lam * np.eye(kept.size), rhs).T
        if centred:
            shift[rows] = out_weights[rows] @ moments.mean_original - weights[rows] @ mean_kept
    return Refit(weights, shift)


def _solve_spd(matrix: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    try:
        factor = np.linalg.cholesky(matrix)
    except np.linalg.LinAlgError:  # singular to working precision: the minimum-norm solution
        return np.linalg.lstsq(matrix, rhs, rcond=None)[0]
    return np.linalg.solve(factor.T, np.linalg.solve(factor, rhs))


def unchanged(out_weights: np.ndarray, kept: np.ndarray, scale: np.ndarray) -> Refit:
    """The refit that a plain selection amounts to: u = w on K times the scale, no bias shift."""
    out_weights = np.asarray(out_weights, dtype=np.float64)
    return Refit(out_weights[:, kept] * np.asarray(scale, dtype=np.float64), np.zeros(out_weights.shape[0]))


def mean_squared_error(moments: Moments, out_weights: np.ndarray, kept: np.ndarray, refit: Refit) -> float:
    """E ‖U h − (U' h'_K + δ)‖² / k: the mean squared change of a consumer pre-activation."""
    u = np.asarray(out_weights, dtype=np.float64)
    v, delta = refit.weights, refit.bias_shift
    kept = np.asarray(kept, dtype=np.int64)
    k = u.shape[0]
    original = np.einsum("ij,ij->", u @ moments.original, u)
    crossed = np.einsum("ij,ij->", v @ moments.cross[kept], u)
    current = np.einsum("ij,ij->", v @ moments.current[np.ix_(kept, kept)], v)
    mean_then = u @ moments.mean_original
    mean_now = v @ moments.mean_current[kept]
    total = original - 2.0 * crossed + current - 2.0 * delta @ mean_then + 2.0 * delta @ mean_now + delta @ delta
    return max(float(total), 0.0) / max(k, 1)


def output_energy(moments: Moments, out_weights: np.ndarray) -> float:
    """E ‖U h − E[U h]‖² / k: the error of dropping every neuron with the best bias, a scale for errors."""
    u = np.asarray(out_weights, dtype=np.float64)
    mean = u @ moments.mean_original
    return max(float(np.einsum("ij,ij->", u @ moments.original, u) - mean @ mean), 0.0) / max(u.shape[0], 1)


def greedy_selection(moments: Moments, out_weights: np.ndarray, target: int, *, ridge: float = RIDGE) -> np.ndarray:
    """The ``target`` neurons chosen one at a time, each reducing the least-squares residual most.

    With R = Cov(h') + λI and A = U·Cov(h, h') (a [k, n] matrix), adding neuron j to the kept
    set lowers the residual E‖U h − U' h'_K − δ‖² by ‖A_{:,j}‖² / R_jj, where A and R are the
    residuals after regressing on the neurons already kept. Both are updated by the pivoted
    Cholesky step of the chosen column: O(n·t) per step, O(n·target²) in all.
    """
    u = np.asarray(out_weights, dtype=np.float64)
    n = moments.size
    target = max(0, min(int(target), n))
    covariance = moments.current - np.outer(moments.mean_current, moments.mean_current)
    covariance = covariance + ridge * max(float(np.trace(covariance)) / n, 1e-300) * np.eye(n)
    residual = u @ (moments.cross - np.outer(moments.mean_current, moments.mean_original)).T  # [k, n]
    diagonal = np.diag(covariance).copy()
    columns = np.zeros((n, target))
    available = np.ones(n, dtype=bool)
    chosen = np.zeros(target, dtype=np.int64)
    for step in range(target):
        gains = np.einsum("ij,ij->j", residual, residual) / np.maximum(diagonal, 1e-300)
        gains[~available] = -np.inf
        j = int(np.argmax(gains))
        pivot = np.sqrt(max(diagonal[j], 1e-300))
        column = (covariance[:, j] - columns[:, :step] @ columns[j, :step]) / pivot
        columns[:, step] = column
        residual -= np.outer(residual[:, j] / pivot, column)
        diagonal -= column**2
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
