"""The coreset mathematics of Mussay et al. (ICLR 2020), in plain numpy. Knows nothing of graphs.

A hidden layer is seen as n neurons; neuron j has a sensitivity
    s(j) = max_i |w_i(j)| · sup_{‖x‖≤β} |φ(p_j·x)|                         (Algorithm 2, Corollary 8)
computed by the caller, who knows the activation and the input radius. Selecting neurons returns
a :class:`Selection`: the kept indices and the factor each kept neuron's outgoing weights are
multiplied by (count(j)/(m·pr(j)) for sampled coresets, 1 for deterministic rankings).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

METHODS = ("coreset", "uniform", "percentile", "sensitivity")
MAX_DRAWS = 20_000_000  # a very skewed distribution may never reach the target; stop here


@dataclass(frozen=True, eq=False)
class Selection:
    """Which neurons survive and how their outgoing weights are rescaled."""

    kept: np.ndarray  # sorted int64 indices into the original neurons
    scale: np.ndarray  # float64, one per kept neuron
    draws: int | None = None  # m, the number of i.i.d. draws actually used (sampled methods)

    @property
    def size(self) -> int:
        return int(self.kept.size)

    def is_identity(self, n: int) -> bool:
        return self.size == n and bool(np.all(self.scale == 1.0))


def identity(n: int) -> Selection:
    return Selection(np.arange(n, dtype=np.int64), np.ones(n))


def target_count(n: int, keep: float | None = None, neurons: int | None = None) -> int:
    """Distinct neurons to keep: a fraction (rounded half up) or an absolute count, clamped to [1, n]."""
    if neurons is not None:
        return max(1, min(n, int(neurons)))
    assert keep is not None
    return max(1, min(n, int(math.floor(keep * n + 0.5))))


def sensitivities(out_weights: np.ndarray, activation_sup: np.ndarray) -> np.ndarray:
    """s(j) = max_i |w_i(j)| · sup|φ_j| for outgoing weights of shape [k, n] (all consumers stacked)."""
    return np.max(np.abs(out_weights), axis=0) * np.asarray(activation_sup, dtype=np.float64)


def sample(weights: np.ndarray, target: int, rng: np.random.Generator, max_draws: int = MAX_DRAWS) -> Selection:
    """Algorithm 2: draw i.i.d. with pr ∝ weights until ``target`` distinct neurons are drawn.

    The kept set is the distinct indices drawn, and each kept neuron is reweighted by
    count(j)/(m·pr(j)) with m the number of draws actually used, so the consumer's output
    stays an unbiased estimate. Neurons with zero weight are never drawn: they contribute
    nothing on the input ball, so when no more than ``target`` neurons have positive weight they
    are all kept as they are (scale 1), which is exact.
    """
    weights = np.asarray(weights, dtype=np.float64)
    n = weights.size
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError("sampling weights must be finite and non-negative")
    positive = np.flatnonzero(weights > 0)
    if positive.size <= target:
        kept = positive if positive.size else np.array([int(np.argmax(weights))], dtype=np.int64)
        return Selection(kept.astype(np.int64), np.ones(kept.size))
    prob = weights / weights.sum()
    counts = np.zeros(n, dtype=np.int64)
    distinct = 0
    drawn = 0
    chunk = max(2 * target, 1024)
    while distinct < target and drawn < max_draws:
        batch = rng.choice(n, size=min(chunk, max_draws - drawn), p=prob)
        values, first = np.unique(batch, return_index=True)
        new = counts[values] == 0
        order = np.sort(first[new])
        still_needed = target - distinct
        if order.size >= still_needed:
            batch = batch[: order[still_needed - 1] + 1]  # stop at the draw that reached the target
        counts += np.bincount(batch, minlength=n)
        distinct = int(np.count_nonzero(counts))
        drawn += batch.size
        chunk *= 2
    kept = np.flatnonzero(counts)
    scale = counts[kept] / (drawn * prob[kept])
    return Selection(kept.astype(np.int64), scale, drawn)


def top_k(scores: np.ndarray, target: int) -> Selection:
    """Keep the ``target`` largest scores (ties to the lower index), without reweighting."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:target]
    kept = np.sort(order).astype(np.int64)
    return Selection(kept, np.ones(kept.size))


def select(
    method: str,
    *,
    sensitivity: np.ndarray,
    point_norms: np.ndarray,
    target: int,
    rng: np.random.Generator,
) -> Selection:
    """One layer's selection by the named method (see ``METHODS``)."""
    n = sensitivity.size
    if target >= n:
        return identity(n)
    if method == "coreset":
        return sample(sensitivity, target, rng)
    if method == "uniform":
        return sample(np.ones(n), target, rng)
    if method == "percentile":
        return top_k(point_norms, target)
    if method == "sensitivity":
        return top_k(sensitivity, target)
    raise ValueError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
