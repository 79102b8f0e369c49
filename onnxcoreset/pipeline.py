"""load -> find chains -> plan (numpy) -> apply -> check -> validate -> save, one function per stage.

Chains are pruned one after another from the input side, each planned on the weights as already
rewritten by the chains before it. Each chain draws from its own generator seeded by
(seed, position), so adding or skipping a chain never changes another chain's sample.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx

from . import __version__, attack, bounds, calibration, coreset, io, radii, strategy, surgery
from .blockwise import all_finite, row_norms
from .chains import Chain, GraphView, Skipped, find_chains
from .errors import ModelError, UsageError
from .neurons import HiddenLayer, read_layer, read_matrix
from .report import ChainInfo, InspectReport, LayerReport, PruneReport, SkippedReport
from .validate import PLAN_KEY, ValidationReport, compare, encode_plan

METADATA_PREFIX = "onnxcoreset."


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how: at most one of ``keep`` and ``neurons``, and/or ``epsilon``.

    With ``epsilon`` each chain keeps the fewest neurons whose certified bound is ≤ ε (see
    bounds.fewest_neurons); with ``keep`` or ``neurons`` as well, the larger count wins.
    """

    keep: float | None = None
    neurons: int | None = None
    method: str = "coreset"
    beta: float = 1.0
    seed: int = 0
    epsilon: float | None = None
    # The data-aware methods (strategy.py): consumer refit, where sup|ψ_j| comes from, a global budget.
    reweight: str = "none"
    sup: str = "ball"
    budget: float | None = None

    def __post_init__(self) -> None:
        if self.keep is not None and self.neurons is not None:
            raise UsageError("give exactly one of --keep and --neurons (or neither, with --epsilon)")
        if self.budget is not None and (self.keep is not None or self.neurons is not None or self.epsilon is not None):
            raise UsageError("--budget replaces --keep, --neurons and --epsilon: give only one of them")
        if self.keep is None and self.neurons is None and self.epsilon is None and self.budget is None:
            raise UsageError("give --keep FRACTION, --neurons N, --epsilon E or --budget FRACTION")
        if self.budget is not None and not (0.0 < self.budget <= 1.0 and math.isfinite(self.budget)):
            raise UsageError(f"--budget must be in (0, 1], got {self.budget}")
        if self.reweight not in strategy.REWEIGHTS:
            raise UsageError(f"--reweight must be one of {', '.join(strategy.REWEIGHTS)}, got '{self.reweight}'")
        if self.sup not in strategy.SUPS:
            raise UsageError(f"--sup must be one of {', '.join(strategy.SUPS)}, got '{self.sup}'")
        if self.epsilon is not None and self.data_aware:
            raise UsageError("--epsilon works with the plain selections (no --reweight, --sup, greedy-ls or auto)")
        if self.epsilon is not None and not (self.epsilon >= 0 and math.isfinite(self.epsilon)):
            raise UsageError(f"--epsilon must be a non-negative number, got {self.epsilon}")
        if self.keep is not None and not (0.0 < self.keep <= 1.0 and math.isfinite(self.keep)):
            raise UsageError(f"--keep must be in (0, 1], got {self.keep}")
        if self.neurons is not None and self.neurons < 1:
            raise UsageError(f"--neurons must be at least 1, got {self.neurons}")
        if self.method not in strategy.METHODS:
            raise UsageError(f"--method must be one of {', '.join(strategy.METHODS)}, got '{self.method}'")
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise UsageError(f"--beta must be a positive number, got {self.beta}")
        if self.seed < 0:
            raise UsageError(f"--seed must be non-negative, got {self.seed}")

    @property
    def data_aware(self) -> bool:
        """Whether chains need samples (calibration data or probes): see strategy.needs_samples."""
        return strategy.needs_samples(self.method, self.reweight, self.sup) or self.budget is not None


def _param_count(store: io.WeightStore, names) -> int:
    return sum(int(np.prod(store.shape(n), dtype=np.int64)) for n in names)


def _all_weights(model: onnx.ModelProto, store: io.WeightStore) -> list[str]:
    names = [t.name for t in model.graph.initializer]
    names += [n.output[0] for n in model.graph.node if n.op_type == "Constant" and n.output and n.output[0] in store]
    return names


def input_radius(view: GraphView, tensor: str, beta: float, known: Mapping[str, float]) -> tuple[float, bool]:
    """(radius, certified) for rows of ``tensor``: see radii.chain_radius, which the pipeline uses."""
    return radii.input_radius(view, tensor, beta, known)


# Layers with more weight entries than this (incoming, outgoing and gate together) are certified
# by bounds.interval_certificate and the norm of the kept sups, which read the weights a few MiB at
# a time. bounds.certify's eigenvalue bounds cost O(d³) per consumer and several float64 copies of
# the weights: seconds for MiniLM's FFN, hours for a 4096×16384 one.
FULL_CERTIFICATE_MAX_ENTRIES = 1 << 21


def _is_large(layer: HiddenLayer) -> bool:
    gate = 0 if layer.multiplier_weights is None else layer.multiplier_weights.size
    return layer.weights.size + layer.out_weights.size + gate > FULL_CERTIFICATE_MAX_ENTRIES


def _in_float64(layer: HiddenLayer) -> HiddenLayer:
    """The layer with float64 copies of its matrices (read_layer may give float32 views)."""
    return replace(
        layer, weights=np.asarray(layer.weights, dtype=np.float64), out_weights=np.asarray(layer.out_weights, dtype=np.float64)
    )


def _finite(layer: HiddenLayer) -> bool:
    """No NaN or Inf in the layer's weights. The row norms and column maxima the plan needs anyway
    show any (NaN and ±Inf propagate into both); only when they do is every entry looked at, since a
    float64 weight near 1e155 overflows its norm while finite."""
    matrices = [layer.weights, layer.out_weights] + ([layer.multiplier_weights] if layer.multiplier_weights is not None else [])
    vectors = [layer.bias] + ([layer.multiplier_bias] if layer.multiplier_bias is not None else [])
    if not all(bool(np.all(np.isfinite(v))) for v in vectors):
        return False
    summaries = [layer.weight_norms, layer.out_weight_max]
    if layer.multiplier_weights is not None or not all(bool(np.all(np.isfinite(s))) for s in summaries):
        return all(all_finite(m) for m in matrices)
    return True


def _point_norms(layer: HiddenLayer) -> np.ndarray:
    """‖p_j‖ of the points [w_j; b_j] (and [v_j; c_j] of a gate), without stacking them into a copy."""
    squares = layer.weight_norms**2 + layer.bias**2
    if layer.multiplier_weights is not None:
        squares = squares + row_norms(layer.multiplier_weights) ** 2 + layer.multiplier_bias**2
    return np.sqrt(squares)


def _plan(layer: HiddenLayer, config: PruneConfig, radius: float, rng: np.random.Generator, target: int | None = None):
    """The selection, the sensitivities and the per-neuron sups it was drawn from."""
    sup = bounds.activation_sup(layer, radius)
    sensitivity = coreset.sensitivities(layer.out_weight_max[None, :], sup)  # max_i |w_i(j)|, computed once
    if target is None:
        target = coreset.target_count(layer.size, config.keep, config.neurons)
    norms = _point_norms(layer)
    selection = coreset.select(config.method, sensitivity=sensitivity, point_norms=norms, target=target, rng=rng)
    return selection, sensitivity, sup


def _planner(loaded: io.LoadedModel, chains: Sequence[Chain], config: PruneConfig,
             data: Mapping[str, np.ndarray] | None, device: str) -> strategy.Planner | None:
    """The data-aware planner when the config needs samples (None: the plain selections of _plan)."""
    if not config.data_aware:
        return None
    if data is None and (config.reweight == "data-ls" or config.sup != "ball"):
        what = "--reweight data-ls" if config.reweight == "data-ls" else f"--sup {config.sup}"
        raise UsageError(f"{what} needs calibration data: give --calibration data.npz (model inputs keyed by input name)")
    probes = config.method in ("auto", "greedy-ls") or config.reweight != "none" or config.budget is not None
    sources = calibration.Sources(loaded, chains, beta=config.beta, data=data, probes=probes, seed=config.seed, device=device)
    return strategy.Planner(sources, method=config.method, reweight=config.reweight, sup=config.sup, seed=config.seed)


def _budget_counts(planner: strategy.Planner, chains: Sequence[Chain], view: GraphView, config: PruneConfig,
                   measured: Mapping[str, float] | None, measured_from: str) -> dict[str, int]:
    """Neurons per chain under --budget: a share of the chains' parameters, spent where the measured
    error (relative, on held-out samples of the unpruned network) falls fastest (coreset.allocate_budget)."""
    store = view.store
    usable = [c for c in chains if _finite(read_layer(c, store))]
    sizes = [c.size for c in usable]
    counts = strategy.budget_counts(sizes)
    errors = []
    for position, chain in enumerate(usable):
        layer = _in_float64(read_layer(chain, store))
        radius = radii.chain_radius(view, chain.producer.input, config.beta, {}, measured, measured_from).value
        context = planner.context(chain, layer, radius, chain.size, position, original=True)
        errors.append(strategy.error_curve(context, config.method, config.reweight, config.sup, counts[position]))
    owners: dict[str, list[int]] = {}
    for index, chain in enumerate(usable):
        for name in surgery.touched(chain):
            owners.setdefault(name, []).append(index)
    tensors = [(int(np.prod(store.shape(name), dtype=np.int64)), [i for i in chain_ids if _slices(usable[i], name, store)])
               for name, chain_ids in owners.items()]
    cost = strategy.parameter_cost(sizes, tensors)
    try:
        chosen = coreset.allocate_budget(counts, errors, cost, config.budget * cost(sizes))
    except ValueError:
        smallest = cost([int(c[0]) for c in counts]) / cost(sizes)
        raise UsageError(f"--budget {config.budget:g} is below the smallest share the layers can take ({smallest:.3g})") from None
    return {chain.name: count for chain, count in zip(usable, chosen)}


def _slices(chain: Chain, name: str, store: io.WeightStore) -> bool:
    """Whether pruning the chain shrinks the tensor (a broadcast bias of one value does not)."""
    return name != chain.producer.bias or int(np.prod(store.shape(name), dtype=np.int64)) == chain.size


def _plan_fields(plan: strategy.Plan | None, biases: Sequence[surgery.ConsumerBias]) -> dict:
    """The report fields of a data-aware plan (none for the plain selections)."""
    if plan is None:
        return {}
    skipped = "; ".join(f"{b.reason}: its bias correction is skipped" for b in biases if b.tensor is None)
    return {
        "method": plan.choice.selection,
        "sup": plan.choice.sup,
        "reweight": plan.choice.reweight,
        "measured_error": plan.error,
        "measured_on": plan.measured_on,
        "choice": plan.explanation + (f"; {skipped}" if skipped else ""),
    }


def _sliced_layer(layer: HiddenLayer, kept: np.ndarray) -> HiddenLayer:
    return HiddenLayer(
        layer.weights[kept],
        layer.bias[kept],
        layer.activation.sliced(kept, layer.size),
        layer.post_scale[kept],
        layer.post_shift[kept],
        layer.out_weights[:, kept],
        None if layer.multiplier_weights is None else layer.multiplier_weights[kept],
        None if layer.multiplier_bias is None else layer.multiplier_bias[kept],
    )


def _stored_outgoing(chain: Chain, store: io.WeightStore, kept: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The consumers' weights on the kept neurons as surgery will store them (rounded once to the
    stored type, as surgery._take does), times Gemm's alpha: the u in the certificate's c = w − u."""
    rows = []
    for consumer in chain.consumers:
        stored = read_matrix(store, consumer.weight)[kept]
        if not np.all(scale == 1.0):
            dtype = np.asarray(store.read(consumer.weight.tensor)).dtype
            stored = (stored * scale[:, None]).astype(dtype).astype(np.float64)
        rows.append(consumer.alpha * stored.T)
    return np.vstack(rows)


def _count_for_epsilon(chain: Chain, store: io.WeightStore, layer: HiddenLayer, config: PruneConfig, radius: float,
                       position: int, large: bool) -> tuple[int | None, str]:
    """The count to keep: --keep/--neurons, raised to the fewest that --epsilon certifies, and a note.

    Each count is planned with the chain's own seeded generator, exactly as the final plan is,
    and judged by the same certificate the report gives (bounds.certify, or the interval
    certificate for large layers), so the count found is certified.
    """
    base = None if config.keep is None and config.neurons is None else coreset.target_count(layer.size, config.keep, config.neurons)
    if config.epsilon is None:
        return base, ""
    epsilon = config.epsilon

    def meets(count: int) -> bool:
        selection = _plan(layer, config, radius, np.random.default_rng([config.seed, position]), count)[0]
        if large:
            return bounds.interval_certificate(layer, selection.kept, selection.scale, radius) <= epsilon
        outgoing = _stored_outgoing(chain, store, selection.kept, selection.scale)
        coef = bounds.coefficients(layer.out_weights, selection.kept, outgoing)
        return bounds.certify(layer, coef, radius, target=epsilon).bound <= epsilon

    fewest = bounds.fewest_neurons(meets, layer.size)
    note = f"kept whole: no smaller count is certified within ε = {epsilon:g}" if fewest >= layer.size else ""
    return (fewest if base is None else max(base, fewest)), note


def prune_loaded(
    loaded: io.LoadedModel,
    config: PruneConfig,
    measured: Mapping[str, float] | None = None,
    measured_from: str = "data",
    beta_source: str = "given",
    calibration_data: Mapping[str, np.ndarray] | None = None,
    device: str = "auto",
) -> PruneReport:
    """Prune every chain of a loaded model in place (its WeightStore and declared shapes).

    ``measured`` maps tensors to their largest row norm on a data file (validate.measure_row_norms):
    the radius of chains whose input radius cannot be propagated soundly (see radii.py).
    ``calibration_data`` (model inputs by name) feeds the data-aware methods (strategy.py).
    """
    model, store = loaded.model, loaded.store
    chains, skipped = find_chains(model.graph, store)
    view = GraphView(model.graph, store)
    params_before = _param_count(store, _all_weights(model, store))
    known: dict[str, radii.Radius] = {}
    propagated: dict = {}  # radii.chain_radius's cache, shared by the chains (in topological order)
    links: list[radii.ChainLink] = []
    layers: list[LayerReport] = []
    planner = _planner(loaded, chains, config, calibration_data, device)
    budget = _budget_counts(planner, chains, view, config, measured, measured_from) if planner and config.budget else {}
    for position, chain in enumerate(chains):
        layer = read_layer(chain, store)
        if not _finite(layer):
            skipped.append(Skipped(chain.name, "its weights contain NaN or Inf"))
            continue
        large = _is_large(layer)
        layer = layer if large else _in_float64(layer)
        where = radii.chain_radius(view, chain.producer.input, config.beta, known, measured, measured_from, propagated)
        radius = where.value
        if not math.isfinite(radius):  # e.g. an earlier layer, skipped, holds Inf weights
            skipped.append(Skipped(chain.name, f"its input radius is not finite ({radius}): NaN or Inf weights upstream"))
            continue
        with np.errstate(all="ignore"):
            unbounded = not np.all(np.isfinite(bounds.activation_sup(layer, radius)))
        if unbounded:  # an Inf PRelu slope or post-activation constant
            skipped.append(Skipped(chain.name, "its neurons are unbounded on the input ball: NaN or Inf parameters"))
            continue
        target, note = _count_for_epsilon(chain, store, layer, config, radius, position, large)
        rng = np.random.default_rng([config.seed, position])
        plan: strategy.Plan | None = None
        if planner is None:
            selection, sensitivity, sup = _plan(layer, config, radius, rng, target)
        else:  # the data-aware methods: samples, selection, least-squares refit (strategy.py)
            count = budget.get(chain.name) or target or coreset.target_count(layer.size, config.keep, config.neurons)
            plan = planner.plan(planner.context(chain, layer, radius, count, position), strategy.tie_breaker(layer, radius, large))
            selection, sensitivity, sup = plan.selection, plan.sensitivity, plan.sup
            if budget:
                note = f"--budget {config.budget:g} gives this chain {selection.size} of {layer.size} neurons"
        biases = surgery.consumer_biases(view, chain) if plan is not None and plan.refit is not None else []
        before = _param_count(store, surgery.touched(chain))
        attained: float | None = None
        if plan is not None and plan.refit is not None:  # refit consumers: certified on their new weights and biases
            bound, attained = strategy.refit_certificate(chain, store, layer, plan.refit, selection.kept, radius, biases, large,
                                                         np.random.default_rng([config.seed, position, 1]))
            hidden_radius = float(np.linalg.norm(sup[selection.kept])) if large else bounds.output_radius(_sliced_layer(layer, selection.kept), radius)
            gain, composable = (math.inf, "a large layer (no error gain computed)") if large else (
                radii.error_gain(layer.out_weights, layer.post_scale, layer.activation.lipschitz), radii.composable(chain))
        elif large:  # sound, cheaper bounds: see FULL_CERTIFICATE_MAX_ENTRIES
            bound = bounds.interval_certificate(layer, selection.kept, selection.scale, radius)
            hidden_radius = float(np.linalg.norm(sup[selection.kept]))
            gain, composable = math.inf, "a large layer (no error gain computed)"
        else:
            outgoing = _stored_outgoing(chain, store, selection.kept, selection.scale)
            coef = bounds.coefficients(layer.out_weights, selection.kept, outgoing)
            certificate = bounds.certify(layer, coef, radius)
            bound, attained = certificate.bound, 0.0
            if bound > 0:  # the consumers with the largest certified bounds are the likeliest worst
                worst = np.argsort(-certificate.per_consumer)[:4]
                found = attack.search([attack.Term(layer, coef)], radius, np.random.default_rng([config.seed, position, 1]),
                                      consumers=worst, steps=60, starts=12)
                attained = found.value
            hidden_radius = bounds.output_radius(_sliced_layer(layer, selection.kept), radius)
            gain, composable = radii.error_gain(layer.out_weights, layer.post_scale, layer.activation.lipschitz), radii.composable(chain)
        known[chain.hidden] = radii.Radius(hidden_radius, where.kind, f"hidden output of {chain.name}")
        links.append(radii.ChainLink(chain.name, chain.producer.node, chain.producer.input,
                                     tuple(c.node for c in chain.consumers), bound, gain, composable))
        theorem7 = bounds.theorem7_sample_size(float(sensitivity.sum()), config.epsilon or bound, layer.weights.shape[1] + 1)
        del layer  # it may map the old weights; surgery reads only what it keeps
        surgery.apply(chain, selection, store)
        if plan is not None and plan.refit is not None:
            surgery.rewrite_consumers(chain, store, plan.refit.weights, plan.refit.bias_shift, biases)
        surgery.resize_shapes(model.graph, chain, selection.size, store)
        layers.append(
            LayerReport(
                name=chain.name,
                activation=chain.activation_label,
                consumers=tuple(c.label for c in chain.consumers),
                neurons_before=chain.size,
                neurons_after=selection.size,
                params_before=before,
                params_after=_param_count(store, surgery.touched(chain)),
                draws=selection.draws,
                radius=radius,
                radius_certified=where.kind == radii.CERTIFIED,
                certified_bound=bound,
                sensitivity_total=float(sensitivity.sum()),
                kept=tuple(int(i) for i in selection.kept),
                scale=tuple(float(f) for f in selection.scale),
                radius_kind=where.kind,
                radius_source=where.how,
                attained_error=attained,
                theorem7_sample_size=theorem7,
                note=note,
                **_plan_fields(plan, biases),
            )
        )
    network, network_note = radii.network_bound(view, links)
    report = PruneReport(
        version=__version__,
        method=config.method,
        seed=config.seed,
        beta=config.beta,
        keep=config.keep,
        neurons=config.neurons,
        params_before=params_before,
        params_after=_param_count(store, _all_weights(model, store)),
        layers=tuple(layers),
        skipped=tuple(SkippedReport(s.name, s.reason) for s in skipped),
        epsilon=config.epsilon,
        beta_source=beta_source,
        network_bound=network,
        network_note=network_note,
    )
    _write_metadata(model, report)
    return report


def _write_metadata(model: onnx.ModelProto, report: PruneReport) -> None:
    """Record how the model was pruned in ``onnxcoreset.*`` metadata keys (replacing older ones)."""
    values = {
        "version": report.version,
        "method": report.method,
        "seed": str(report.seed),
        "beta": repr(report.beta),
        "keep": repr(report.keep) if report.keep is not None else "",
        "neurons": str(report.neurons) if report.neurons is not None else "",
        "layers": json.dumps(
            [
                {
                    "name": l.name,
                    "neurons_before": l.neurons_before,
                    "neurons_after": l.neurons_after,
                    "radius": l.radius,
                    "radius_certified": l.radius_certified,
                    "radius_kind": l.radius_kind,
                    "certified_bound": l.certified_bound,
                    "attained_error": l.attained_error,
                    **({"method": l.method, "sup": l.sup, "reweight": l.reweight} if l.method else {}),
                }
                for l in report.layers
            ],
            sort_keys=True,
        ),
        "epsilon": repr(report.epsilon) if report.epsilon is not None else "",
        "network_bound": json.dumps(report.network_bound, sort_keys=True) if report.network_bound else "",
        PLAN_KEY[len(METADATA_PREFIX):]: encode_plan({l.name: (np.array(l.kept, dtype=np.int64), np.array(l.scale)) for l in report.layers}),
    }
    kept = [p for p in model.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in values.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_PREFIX + key, value


def _load_any(model: onnx.ModelProto | str | os.PathLike[str]) -> io.LoadedModel:
    if isinstance(model, onnx.ModelProto):
        return io.from_proto(model)
    if isinstance(model, (str, os.PathLike)):
        return io.load(model)
    raise UsageError(f"expected an onnx.ModelProto or a path, got {type(model).__name__}")


def check(model_path: Path, source: Path | None = None) -> None:
    """The written model must pass the full checker (shape inference included).

    When it does not and the ``source`` model fails too, the input is blamed: pruning did not break it.
    """
    try:
        onnx.checker.check_model(str(model_path), full_check=True)
    except Exception as exc:  # the checker raises several types; all mean the same to a user
        if source is not None:
            try:
                onnx.checker.check_model(str(source), full_check=True)
            except Exception:  # the output's reason is the informative one: its nodes are sorted
                raise ModelError(f"{source}: the input model fails onnx.checker too: {_first_line(exc)}") from None
        raise ModelError(f"the pruned model fails onnx.checker: {_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


def prune(model: onnx.ModelProto | str | os.PathLike[str], config: PruneConfig | None = None, *,
          calibration: Mapping[str, np.ndarray] | None = None, **options) -> tuple[onnx.ModelProto, PruneReport]:
    """Prune an in-memory model or a file; return the pruned ModelProto (weights inline) and the report.

    The input is never modified. Options are PruneConfig's fields (``keep=0.5, method="coreset"``);
    ``calibration`` holds model inputs by name for the data-aware methods.
    """
    config = config or PruneConfig(**options)
    loaded = _load_any(model)
    report = prune_loaded(loaded, config, calibration_data=calibration)
    return io.finish(loaded), report


def measured_radii(loaded: io.LoadedModel, source, data: Mapping[str, np.ndarray], device: str = "auto") -> dict[str, float]:
    """The largest row norm of every chain's input when the original model runs on ``data``."""
    from .validate import measure_row_norms

    chains, _ = find_chains(loaded.model.graph, loaded.store)
    return measure_row_norms(source, [c.producer.input for c in chains], data, device)


def prune_file(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    config: PruneConfig,
    *,
    validate: bool = True,
    device: str = "auto",
    probes: int = 64,
    shapes: Mapping[str, Sequence[int]] | None = None,
    data: Mapping[str, np.ndarray] | None = None,
    max_error: float | None = None,
    force: bool = False,
    radius_data: Mapping[str, np.ndarray] | None = None,
    radius_data_name: str = "data",
    beta_source: str = "given",
    chain_probes: int | None = None,
    calibration: Mapping[str, np.ndarray] | None = None,
) -> PruneReport:
    """Prune a file into another, staged: nothing is written unless every check (and validation) passes.

    With ``force`` a model that fails validation is written anyway (the report says it failed).
    ``radius_data`` (inputs by name) gives measured radii to chains whose radius cannot be
    propagated; validation checks every chain against its certified bound on ``chain_probes``
    points besides comparing outputs (validate.compare).
    """
    source, target = Path(source), Path(target)
    if target.exists() and source.exists() and target.resolve() == source.resolve() and not force:
        raise UsageError(f"{target}: the output would overwrite the input; pass --force to allow it")
    io.check_target(target)  # before the work: a big model should not be pruned only to fail here
    loaded = io.load(source)
    measured = measured_radii(loaded, source, radius_data, device) if radius_data else None
    report = prune_loaded(loaded, config, measured, radius_data_name, beta_source, calibration, device)
    staged = io.stage(loaded, target, overwrite_input=force)
    try:
        check(staged.model_path, source)
        validation: ValidationReport | None = None
        if validate:
            validation = compare(
                source, staged.model_path, device=device, probes=probes, beta=config.beta,
                seed=config.seed, shapes=shapes, data=data, max_error=max_error,
                **({} if chain_probes is None else {"chain_probes": chain_probes}),
            )
        report = _with(report, validation)
        if validation is not None and not validation.ok and not force:
            staged.discard()
            return report
        written = staged.commit()
    except BaseException:
        staged.discard()
        raise
    return _with(report, validation, tuple(str(p) for p in written))


def _with(report: PruneReport, validation: ValidationReport | None, outputs: tuple[str, ...] = ()) -> PruneReport:
    return replace(report, validation=validation, outputs=outputs)


def inspect(model: onnx.ModelProto | str | os.PathLike[str]) -> InspectReport:
    """The prunable chains and the skipped near-misses, with the model's onnxcoreset metadata."""
    loaded = _load_any(model)
    store = loaded.store
    chains, skipped = find_chains(loaded.model.graph, store)
    infos = tuple(
        ChainInfo(
            name=c.name,
            producer=loaded.model.graph.node[c.producer.node].op_type,
            activation=c.activation_label,
            steps=tuple(s.kind if s.kind != "activation" else c.activation_label for s in c.steps),
            consumers=tuple(x.label for x in c.consumers),
            hidden_size=c.size,
            params=_param_count(store, surgery.touched(c)),
        )
        for c in chains
    )
    metadata = {p.key: p.value for p in loaded.model.metadata_props if p.key.startswith(METADATA_PREFIX)}
    return InspectReport(infos, tuple(SkippedReport(s.name, s.reason) for s in skipped), metadata)
