"""How one chain is pruned: a selection and a reweighting, given by the user or measured (``auto``).

Selections (which neurons stay, at a given count k):

* ``sensitivity``: the k largest s(j) = max_i |w_i(j)| · sup|ψ_j|, weights as they are;
* ``coreset``: Algorithm 2, i.i.d. draws with pr ∝ s, reweighted by count/(m·pr);
* ``coreset-vr``: certain neurons (m·pr ≥ 1) kept, the rest sampled without replacement, 1/π weights;
* ``uniform``, ``percentile`` (the k largest ‖p_j‖): the paper's baselines;
* ``greedy-ls``: forward selection for the least-squares refit (compensate.greedy_selection).

sup|ψ_j| is over the chain's input ball (``ball``), or with calibration data the RMS or the max
of |ψ_j| on it (``rms``, ``max``): a data-dependent sensitivity. Reweightings: ``none``,
``ball-ls`` (compensate.fit on data-free probes) and ``data-ls`` (on calibration activations,
with the probes' moments as a Tikhonov prior of weight DATA_PRIOR).

``auto`` tries every applicable selection × reweighting at the same count, fit on 3/4 of the
samples and measured on the other 1/4 (calibration data if given, else probes): the lowest
relative error E‖e‖²/E‖Uh − E[Uh]‖² wins, ties broken by the smaller certified bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np

from . import bounds, compensate, coreset, surgery
from .calibration import Samples, Sources
from .chains import Chain as GraphChain
from .coreset import Selection
from .neurons import HiddenLayer

SELECTIONS = ("sensitivity", "coreset", "coreset-vr", "uniform", "percentile", "greedy-ls")
METHODS = SELECTIONS + ("auto",)
REWEIGHTS = ("none", "ball-ls", "data-ls")
SUPS = ("ball", "rms", "max")
DATA_PRIOR = 0.25  # weight of the probes' moments in data-ls (1 would be ball-ls)
HOLDOUT = 0.25  # share of the samples auto measures on
TIE = 1e-9  # relative: errors this close are ties, decided by the certified bound
ROUNDOFF = 1e-12  # relative errors below this are float64 rounding of an exact fit: all ties
BUDGET_GRID = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass(frozen=True)
class Choice:
    """One way to prune a chain: selection, where its sups come from, and the reweighting."""

    selection: str
    sup: str = "ball"
    reweight: str = "none"

    @property
    def label(self) -> str:
        selection = self.selection if self.sup == "ball" or self.selection not in ("sensitivity", "coreset", "coreset-vr") else f"{self.selection}[{self.sup}]"
        return selection if self.reweight == "none" else f"{selection} + {self.reweight}"


@dataclass(frozen=True, eq=False)
class Plan:
    """What the pipeline applies: the selection, and the refit consumers (None: weights × scale)."""

    selection: Selection
    refit: compensate.Refit | None
    sensitivity: np.ndarray  # s(j) with sups over the ball (the paper's, for the report)
    sup: np.ndarray  # sup|ψ_j| over the ball
    choice: Choice
    error: float | None = None  # relative mean squared error of the consumers' pre-activations
    measured_on: str = ""  # on which samples the error was measured
    explanation: str = ""


@dataclass(frozen=True, eq=False)
class Context:
    """What the planner knows of one chain: its layer, ball, samples and which consumer rows have a bias."""

    layer: HiddenLayer
    radius: float
    target: int
    rng: np.random.Generator
    bias: np.ndarray  # [k] bool, per consumer output: a bias it may shift
    data: Samples | None = None
    probes: Samples | None = None
    cache: dict = field(default_factory=dict, repr=False)  # moments and data sups, shared by replace()

    def moments(self, kind: str, part: str) -> compensate.Moments:
        """Moments of ``kind`` (data, probes, mixed) on ``part`` (fit, holdout, all), computed once."""
        key = (kind, part)
        if key not in self.cache:
            if kind == "mixed":
                data, probes = self.moments("data", part), self.moments("probes", part)
                self.cache[key] = data.mixed(probes, DATA_PRIOR)
            elif part == "all":
                fit, held = self.moments(kind, "fit"), self.moments(kind, "holdout")
                self.cache[key] = fit if fit is held else fit.mixed(held, held.count / (fit.count + held.count))
            else:
                samples = self.data if kind == "data" else self.probes
                assert samples is not None
                fit, held = self._split(kind, samples)
                self.cache[(kind, "fit")] = fit.moments(self.layer.out_weights)
                self.cache[(kind, "holdout")] = self.cache[(kind, "fit")] if held is fit else held.moments(self.layer.out_weights)
        return self.cache[key]

    def _split(self, kind: str, samples: Samples) -> tuple[Samples, Samples]:
        return samples.split(HOLDOUT, np.random.default_rng([samples.rows, 0 if kind == "data" else 1]))


def applicable(method: str, reweight: str, sup: str, has_data: bool) -> list[Choice]:
    """The choices a method stands for: itself, or every applicable pair for ``auto``."""
    if method != "auto":
        return [Choice(method, sup, reweight)]
    selections = [Choice(s) for s in SELECTIONS]
    if has_data:
        selections += [Choice("sensitivity", "rms"), Choice("sensitivity", "max"), Choice("coreset-vr", "rms")]
    reweights = ["none", "ball-ls"] + (["data-ls"] if has_data else [])
    return [Choice(c.selection, c.sup, r) for c in selections for r in reweights]


def needs_samples(method: str, reweight: str, sup: str) -> bool:
    return method in ("greedy-ls", "auto") or reweight != "none" or sup != "ball"


def _fit_source(choice: Choice, context: Context) -> str:
    """Which moments a choice's greedy selection and refit use."""
    if choice.reweight == "data-ls":
        return "mixed" if context.probes is not None else "data"
    if choice.reweight == "ball-ls":
        return "probes"
    return "data" if context.data is not None else "probes"


def _select(choice: Choice, context: Context, part: str, rng: np.random.Generator) -> tuple[Selection, np.ndarray]:
    layer = context.layer
    sup = bounds.activation_sup(layer, context.radius)
    if choice.sup != "ball":
        if context.data is None:
            raise ValueError(f"sup '{choice.sup}' needs calibration data")
        if ("sup", choice.sup) not in context.cache:
            context.cache[("sup", choice.sup)] = compensate.data_sup(context.data.current, choice.sup)
        sup = context.cache[("sup", choice.sup)]
    sensitivity = coreset.sensitivities(layer.out_weights, sup)
    if context.target >= layer.size:
        return coreset.identity(layer.size), sensitivity
    if choice.selection == "greedy-ls":
        moments = context.moments(_fit_source(choice, context), part)
        kept = compensate.greedy_selection(moments, context.target)
        return Selection(kept, np.ones(kept.size)), sensitivity
    if choice.selection == "coreset-vr":
        return coreset.variance_reduced(sensitivity, context.target, rng), sensitivity
    norms = np.sqrt(layer.weight_norms**2 + layer.bias**2) if choice.selection == "percentile" else sensitivity
    return coreset.select(choice.selection, sensitivity=sensitivity, point_norms=norms, target=context.target, rng=rng), sensitivity


def _refit(choice: Choice, context: Context, selection: Selection, part: str) -> compensate.Refit | None:
    if choice.reweight == "none" or selection.is_identity(context.layer.size):
        return None
    moments = context.moments(_fit_source(choice, context), part)
    return compensate.fit(moments, context.layer.out_weights, selection.kept, bias=context.bias)


def relative_error(moments: compensate.Moments, out_weights: np.ndarray, selection: Selection, refit: compensate.Refit | None) -> float:
    """E‖e‖² over the energy E‖Uh − E[Uh]‖² of the consumers' pre-activations (0: exact, 1: as bad as a constant)."""
    refit = refit or compensate.unchanged(out_weights, selection.kept, selection.scale)
    energy = compensate.output_energy(moments)
    error = compensate.mean_squared_error(moments, selection.kept, refit)
    return error / energy if energy > 0 else (0.0 if error == 0 else float("inf"))


def plan(
    context: Context,
    method: str,
    reweight: str = "none",
    sup: str = "ball",
    bound: Callable[[Selection, compensate.Refit | None], float] | None = None,
) -> Plan:
    """The context's plan for ``method`` (one of METHODS): as asked, or the best measured for ``auto``."""
    ball_sup = bounds.activation_sup(context.layer, context.radius)
    ball_sensitivity = coreset.sensitivities(context.layer.out_weights, ball_sup)
    choices = applicable(method, reweight, sup, context.data is not None)
    evaluation = "data" if context.data is not None else "probes" if context.probes is not None else None
    measured_on = "" if evaluation is None else (context.data if evaluation == "data" else context.probes).source
    if len(choices) == 1:
        choice = choices[0]
        selection, _ = _select(choice, context, "all", context.rng)
        refit = _refit(choice, context, selection, "all")
        error = None if evaluation is None else relative_error(context.moments(evaluation, "all"), context.layer.out_weights, selection, refit)
        return Plan(selection, refit, ball_sensitivity, ball_sup, choice, error, measured_on and f"{measured_on} (in-sample)", f"{choice.label} as asked")
    if evaluation is None:
        raise ValueError("auto needs samples (calibration data or probes) to measure on")
    held = context.moments(evaluation, "holdout")
    seeds = context.rng.integers(0, 2**63 - 1, size=len(choices))
    trials = []
    for choice, seed in zip(choices, seeds):
        rng = np.random.default_rng(int(seed))
        selection, _ = _select(choice, context, "fit", rng)
        refit = _refit(choice, context, selection, "fit")
        trials.append((relative_error(held, context.layer.out_weights, selection, refit), choice, selection, seed))
    best_error = min(t[0] for t in trials)
    tied = [t for t in trials if t[0] <= max(best_error + TIE * best_error, ROUNDOFF)]
    if len(tied) > 1 and bound is not None:
        scored = [(bound(t[2], _refit(t[1], context, t[2], "fit")), i) for i, t in enumerate(tied)]
        winner = tied[min(scored)[1]]
        why = f"tied with {len(tied) - 1} other(s) on error, smallest certified bound"
    else:
        winner = tied[0]
        why = "lowest held-out error"
    error, choice, selection, _ = winner
    if choice.selection == "greedy-ls":  # the held-out measure chose it; select again on every sample
        selection, _ = _select(choice, context, "all", np.random.default_rng(int(winner[3])))
    refit = _refit(choice, context, selection, "all")
    ranked = sorted(trials, key=lambda t: t[0])
    runner = next((t for t in ranked if t[1] != choice), None)
    plain = min((t for t in trials if t[1].reweight == "none"), key=lambda t: t[0])
    explanation = (
        f"auto chose {choice.label} ({why}: {error:.4g} on held-out {measured_on}; "
        + (f"next {runner[1].label} {runner[0]:.4g}; " if runner else "")
        + f"best without reweighting {plain[1].label} {plain[0]:.4g}; {len(trials)} tried)"
    )
    return Plan(selection, refit, ball_sensitivity, ball_sup, choice, error, measured_on, explanation)


# ---------------------------------------------------------------------------------------------
# A global budget


def error_curve(context: Context, method: str, reweight: str, sup: str, counts: Sequence[int]) -> np.ndarray:
    """The held-out relative error of the context pruned to each count (``auto`` measured as greedy-ls
    with the best reweighting available, to keep the curve cheap)."""
    if method == "auto":
        method, reweight, sup = "greedy-ls", ("data-ls" if context.data is not None else "ball-ls"), "ball"
    evaluation = "data" if context.data is not None else "probes"
    held = context.moments(evaluation, "holdout")
    errors = []
    for count in counts:
        trial = replace(context, target=int(count), rng=np.random.default_rng(0))
        choice = Choice(method, sup, reweight)
        selection, _ = _select(choice, trial, "fit", trial.rng)
        errors.append(relative_error(held, context.layer.out_weights, selection, _refit(choice, trial, selection, "fit")))
    return np.minimum.accumulate(np.array(errors))  # a larger count can do what a smaller one did


def budget_counts(sizes: Sequence[int]) -> list[np.ndarray]:
    """The counts each chain may take under a budget: BUDGET_GRID of its size (at least 1)."""
    return [np.unique(np.clip(np.floor(np.array(BUDGET_GRID) * n + 0.5).astype(np.int64), 1, n)) for n in sizes]


def parameter_cost(sizes: Sequence[int], tensors: Sequence[tuple[int, Sequence[int]]]) -> Callable[[Sequence[int]], float]:
    """cost(k) = Σ over tensors of size × Π (k_c / n_c) over the chains c that slice it."""

    def cost(counts: Sequence[int]) -> float:
        total = 0.0
        for size, chains in tensors:
            factor = 1.0
            for c in chains:
                factor *= counts[c] / sizes[c]
            total += size * factor
        return total

    return cost


class Planner:
    """The data-aware planning of one model: samples for each chain, its plan, budget counts."""

    def __init__(self, sources: Sources, *, method: str, reweight: str, sup: str, seed: int) -> None:
        self.sources = sources
        self.method, self.reweight, self.sup, self.seed = method, reweight, sup, seed

    def context(self, chain: GraphChain, layer: HiddenLayer, radius: float, target: int, position: int,
                original: bool = False) -> Context:
        rng = np.random.default_rng([self.seed, position, 2])
        data, probes = self.sources.samples(chain, layer, radius, rng, original)
        biases = surgery.consumer_biases(self.sources.view, chain)
        mask = np.concatenate([np.full(rows, b.tensor is not None) for rows, b in zip(_consumer_rows(chain, self.sources), biases)])
        return Context(layer, radius, target, np.random.default_rng([self.seed, position]), mask, data, probes)

    def plan(self, context: Context, bound: Callable[[Selection, compensate.Refit | None], float] | None = None) -> Plan:
        return plan(context, self.method, self.reweight, self.sup, bound)


def _consumer_rows(chain: GraphChain, sources: Sources) -> list[int]:
    store = sources.loaded.store
    return [store.shape(c.weight.tensor)[1 - c.weight.neuron_axis] for c in chain.consumers]


def refit_certificate(chain: GraphChain, store, layer: HiddenLayer, refit: compensate.Refit, kept: np.ndarray,
                      radius: float, biases: list[surgery.ConsumerBias], large: bool,
                      rng: np.random.Generator) -> tuple[float, float | None]:
    """(certified bound, attained error) of a chain whose consumers were refit, as they will be stored.

    The error of consumer output i is e_i(x) = Σ_j c_ij ψ_j(x) − δ_i with c = w − u: bounded by the
    smaller of bounds.certify's bound plus |δ_i| and the sign-split interval shifted by δ_i.
    The attained error is the largest |e_i| at the points a gradient search finds for Σ c ψ.
    """
    weights, shift = surgery.stored_refit(chain, store, refit.weights, refit.bias_shift, biases)
    coef = bounds.coefficients(layer.out_weights, kept, weights)
    low, high = bounds.neuron_range(layer, radius)
    plus, minus = np.clip(coef, 0, None), np.clip(coef, None, 0)
    upper, lower = plus @ high + minus @ low - shift, plus @ low + minus @ high - shift
    triangle = np.abs(coef) @ np.maximum(np.abs(low), np.abs(high))
    interval = np.maximum(np.abs(upper), np.abs(lower)) + bounds.ROUNDING_SLACK * triangle
    if large:
        return float(np.max(interval, initial=0.0)), None
    certificate = bounds.certify(layer, coef, radius)
    per_consumer = np.minimum(certificate.per_consumer + np.abs(shift), interval)
    bound = float(np.max(per_consumer, initial=0.0))
    if bound == 0:
        return 0.0, 0.0
    from . import attack

    worst = np.argsort(-per_consumer)[:4]
    found = attack.search([attack.Term(layer, coef)], radius, rng, consumers=worst, steps=60, starts=12)
    errors = layer.hidden(found.points) @ coef.T - shift
    return bound, float(np.max(np.abs(errors), initial=0.0))


def tie_breaker(layer: HiddenLayer, radius: float, large: bool) -> Callable[[Selection, compensate.Refit | None], float]:
    """The certified bound auto breaks ties with: bounds.certified_bound, or for large layers the
    sign-split interval bound (what the pipeline certifies them with), before rounding to storage."""

    def bound(selection: Selection, refit: compensate.Refit | None) -> float:
        refit = refit or compensate.unchanged(layer.out_weights, selection.kept, selection.scale)
        if not large:
            return bounds.certified_bound(layer, selection.kept, None, radius, weights=refit.weights, bias_shift=refit.bias_shift)
        coef = bounds.coefficients(layer.out_weights, selection.kept, refit.weights)
        low, high = bounds.neuron_range(layer, radius)
        plus, minus = np.clip(coef, 0, None), np.clip(coef, None, 0)
        upper = plus @ high + minus @ low - refit.bias_shift
        lower = plus @ low + minus @ high - refit.bias_shift
        return float(np.max(np.maximum(np.abs(upper), np.abs(lower)), initial=0.0))

    return bound
