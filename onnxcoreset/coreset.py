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
from typing import Callable, Sequence

import numpy as np

METHODS = ("coreset", "uniform", "percentile", "sensitivity", "coreset-vr")
VR_SCHEMES = ("systematic", "without-replacement")  # how coreset-vr samples the neurons it does not take for certain
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
    # max and −min rather than max(abs(w)): no temporary the size of the weights, same values
    largest = np.maximum(np.max(out_weights, axis=0), -np.min(out_weights, axis=0))
    return np.asarray(largest, dtype=np.float64) * np.asarray(activation_sup, dtype=np.float64)


def sample(weights: np.ndarray, target: int, rng: np.random.Generator, max_draws: int = MAX_DRAWS) -> Selection:
    """Algorithm 2: draw i.i.d. with pr ∝ weights until ``target`` distinct neurons are drawn.

    The kept set is the distinct indices drawn, and each kept neuron is reweighted by
    count(j)/(m·pr(j)) with m the number of draws actually used, so the consumer's output
    stays an unbiased estimate. Why the stopping rule is "draw until a (target+1)-th distinct
    neuron comes up, and do not use that draw": stopping *at* the draw that brings the
    target-th neuron makes m depend on which neurons were drawn, and over-weights the rare
    neurons that tend to end the sample (by up to 24% for pr = (.6, .25, .1, .05), target 2).
    Discarding the draw that would exceed the target (inverse sampling, Pathak 1964) keeps
    E[count(j)/(m·pr(j))] = 1 for every neuron while still keeping exactly ``target``.

    Neurons with zero weight are never drawn: they contribute nothing on the input ball, so
    when no more than ``target`` neurons have positive weight they are all kept as they are
    (scale 1), which is exact.
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
    while drawn < max_draws:
        batch = rng.choice(n, size=min(chunk, max_draws - drawn), p=prob)
        values, first = np.unique(batch, return_index=True)
        arrivals = np.sort(first[counts[values] == 0])  # where each neuron not yet drawn first appears
        room = target - distinct
        stop = arrivals.size > room
        if stop:
            batch = batch[: arrivals[room]]  # the draw of a (target+1)-th neuron ends the sample, unused
        counts += np.bincount(batch, minlength=n)
        distinct = int(np.count_nonzero(counts))
        drawn += batch.size
        if stop:
            break
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
    if method == "coreset-vr":
        return variance_reduced(sensitivity, target, rng)
    raise ValueError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")


# ---------------------------------------------------------------------------------------------
# The variance-reduced coreset: certain neurons kept as they are, the rest sampled without
# replacement with inclusion probabilities proportional to s(j), Horvitz–Thompson weights.


def inclusion_probabilities(weights: np.ndarray, target: int) -> np.ndarray:
    """π_j = min(1, m'·w_j / Σ_rest w) with m = ``target``, iterated on the remainder.

    Every neuron with m·pr(j) ≥ 1 would be drawn at least once in expectation by Algorithm 2; it
    is taken for certain (π = 1) and the remaining budget m' = m − #certain is spread again over
    the remaining neurons, until no probability reaches 1. Σ π_j = m whenever more than m neurons
    have positive weight; otherwise every positive neuron is certain.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError("sampling weights must be finite and non-negative")
    positive = weights > 0
    certain = np.zeros(weights.size, dtype=bool)
    pi = np.zeros(weights.size)
    if np.count_nonzero(positive) <= target:
        pi[positive] = 1.0
        return pi
    while True:
        rest = positive & ~certain
        budget = target - int(np.count_nonzero(certain))
        share = budget * weights[rest] / weights[rest].sum()
        over = share >= 1.0
        if not np.any(over):
            pi[rest] = share
            break
        certain[np.flatnonzero(rest)[over]] = True
    pi[certain] = 1.0
    return pi


def systematic_sample(pi: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Randomised systematic πps sampling: exactly Σπ units, unit j included with probability π_j.

    The units are put in random order, their π laid end to end on [0, Σπ), and the points
    u, u+1, u+2, … (u uniform on [0, 1)) pick the units they fall in. A unit with π_j < 1 spans
    less than one unit of length, so it is hit at most once and with probability exactly π_j.
    """
    order = rng.permutation(pi.size)
    ends = np.cumsum(pi[order])
    count = int(round(float(ends[-1]))) if ends.size else 0
    points = rng.uniform() + np.arange(count)
    hit = np.searchsorted(ends, points, side="right")
    return np.sort(order[np.minimum(hit, pi.size - 1)]).astype(np.int64)


def brewer_sample(pi: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brewer's draw-by-draw sampling without replacement (Tillé 2006, §6.2.6): inclusion probabilities exactly π.

    At draw i of n = Σπ, an unselected unit k is drawn with probability proportional to
        π_k (n − a − π_k) / (n − a − π_k (n − i + 1)),   a = Σ of π over the units already drawn.
    """
    n = int(round(float(pi.sum())))
    chosen: list[int] = []
    available = pi > 0
    taken = 0.0
    for i in range(1, n + 1):
        p = pi[available]
        numerator = p * (n - taken - p)
        denominator = n - taken - p * (n - i + 1)
        weight = np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), 0.0)
        weight = np.clip(weight, 0.0, None)
        if weight.sum() <= 0:  # only at the last draw through rounding: take the largest π left
            weight = p
        index = np.flatnonzero(available)[rng.choice(p.size, p=weight / weight.sum())]
        chosen.append(int(index))
        available[index] = False
        taken += pi[index]
    return np.sort(np.array(chosen, dtype=np.int64))


def variance_reduced(weights: np.ndarray, target: int, rng: np.random.Generator, scheme: str = "systematic") -> Selection:
    """coreset-vr: exactly ``target`` distinct neurons, an unbiased estimate of the consumers' output.

    Neurons with m·pr(j) ≥ 1 (iterated, see :func:`inclusion_probabilities`) are kept with
    scale 1; the others are sampled with inclusion probability π_j ∝ s(j) (``scheme``:
    systematic, or Brewer's without-replacement draws) and reweighted by 1/π_j. For every
    consumer i, E[Σ_{j kept} u_i(j) ψ_j] = Σ_j π_j · w_i(j)/π_j · ψ_j = Σ_j w_i(j) ψ_j.
    Unlike Algorithm 2 no neuron is drawn twice, and the heavy ones carry no sampling noise.
    """
    if scheme not in VR_SCHEMES:
        raise ValueError(f"unknown scheme '{scheme}'; choose one of {', '.join(VR_SCHEMES)}")
    weights = np.asarray(weights, dtype=np.float64)
    n = weights.size
    if target >= n:
        return identity(n)
    pi = inclusion_probabilities(weights, target)
    certain = np.flatnonzero(pi >= 1.0)
    uncertain = np.where(pi < 1.0, pi, 0.0)
    if uncertain.sum() > 0.5:
        drawn = systematic_sample(uncertain, rng) if scheme == "systematic" else brewer_sample(uncertain, rng)
    else:
        drawn = np.zeros(0, dtype=np.int64)
    kept = np.union1d(certain, drawn).astype(np.int64)
    scale = np.where(pi[kept] >= 1.0, 1.0, 1.0 / np.where(pi[kept] > 0, pi[kept], 1.0))
    return Selection(kept, scale, target)


# ---------------------------------------------------------------------------------------------
# A global parameter budget shared by several layers


def allocate_budget(
    counts: Sequence[np.ndarray], errors: Sequence[np.ndarray], cost: Callable[[Sequence[int]], float], budget: float
) -> list[int]:
    """Neurons to keep per layer so that ``cost(k) ≤ budget`` and the summed error is small.

    Layer c may keep any of ``counts[c]`` (increasing) neurons, with error ``errors[c]`` there
    (comparable across layers, e.g. relative to the layer's output energy); ``cost`` gives the
    parameters a choice of counts leaves (it may couple layers that share a matrix). Starting
    from each layer's smallest count, the move with the largest error decrease per added
    parameter (to any larger count of one layer) that still fits is taken, until none fits: the
    greedy solution of this knapsack, exact on the convex hull of each layer's error curve.
    """
    position = [0] * len(counts)
    current = [int(ks[0]) for ks in counts]
    spent = cost(current)
    if spent > budget:
        raise ValueError(f"the smallest counts already cost {spent:.0f} parameters, over the budget of {budget:.0f}")
    while True:
        best, choice = 0.0, None
        for c, (ks, es) in enumerate(zip(counts, errors)):
            here = position[c]
            for nxt in range(here + 1, len(ks)):
                trial = list(current)
                trial[c] = int(ks[nxt])
                extra = cost(trial) - spent
                if spent + extra > budget * (1 + 1e-12):
                    break
                gain = (es[here] - es[nxt]) / max(extra, 1e-12)
                if gain > best:
                    best, choice = gain, (c, nxt, spent + extra)
        if choice is None:
            break
        c, nxt, spent = choice
        position[c] = nxt
        current[c] = int(counts[c][nxt])
    return current
