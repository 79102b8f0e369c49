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

from . import __version__, bounds, coreset, io, surgery
from .chains import Chain, GraphView, Skipped, find_chains
from .errors import ModelError, UsageError
from .neurons import HiddenLayer, read_layer
from .report import ChainInfo, InspectReport, LayerReport, PruneReport, SkippedReport
from .validate import ValidationReport, compare

METADATA_PREFIX = "onnxcoreset."


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how. Exactly one of ``keep`` and ``neurons`` is set."""

    keep: float | None = None
    neurons: int | None = None
    method: str = "coreset"
    beta: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.keep is None) == (self.neurons is None):
            raise UsageError("give exactly one of --keep and --neurons")
        if self.keep is not None and not (0.0 < self.keep <= 1.0 and math.isfinite(self.keep)):
            raise UsageError(f"--keep must be in (0, 1], got {self.keep}")
        if self.neurons is not None and self.neurons < 1:
            raise UsageError(f"--neurons must be at least 1, got {self.neurons}")
        if self.method not in coreset.METHODS:
            raise UsageError(f"--method must be one of {', '.join(coreset.METHODS)}, got '{self.method}'")
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise UsageError(f"--beta must be a positive number, got {self.beta}")
        if self.seed < 0:
            raise UsageError(f"--seed must be non-negative, got {self.seed}")


def _param_count(store: io.WeightStore, names) -> int:
    return sum(int(np.prod(store.shape(n), dtype=np.int64)) for n in names)


def _all_weights(model: onnx.ModelProto, store: io.WeightStore) -> list[str]:
    names = [t.name for t in model.graph.initializer]
    names += [n.output[0] for n in model.graph.node if n.op_type == "Constant" and n.output and n.output[0] in store]
    return names


def _chain_tensors(chain: Chain) -> list[str]:
    names = [chain.producer.weight.tensor] + ([chain.producer.bias] if chain.producer.bias else [])
    names += [t for step in chain.steps for t, _ in step.sliced]
    return names + [c.weight.tensor for c in chain.consumers]


def input_radius(view: GraphView, tensor: str, beta: float, known: Mapping[str, float]) -> tuple[float, bool]:
    """A sound L2 radius for each row of ``tensor`` (its last axis), and whether it is certified.

    Graph inputs have radius β by definition; the hidden output of an already pruned chain has
    the norm of its per-neuron sups; LayerNormalization output is bounded by max|γ|·√n + ‖β_ln‖.
    Elsewhere (attention, convolutions, unknown ops) β is assumed and reported as such.
    """
    seen = 0
    while seen < 32:
        seen += 1
        if tensor in view.inputs and tensor not in view.store:
            return beta, True
        if tensor in known:
            return known[tensor], True
        index = view.producer.get(tensor)
        if index is None:
            break
        node = view.graph.node[index]
        if node.op_type in ("Identity", "Dropout") or (node.op_type == "Flatten" and _flatten_axis(node) == 1):
            tensor = node.input[0]
            continue
        if node.op_type == "LayerNormalization" and len(node.input) > 1:
            gamma = view.constant(node.input[1], max_size=1 << 22)
            shift = view.constant(node.input[2], max_size=1 << 22) if len(node.input) > 2 and node.input[2] else 0.0
            if gamma is not None and shift is not None and gamma.ndim == 1:
                return float(np.max(np.abs(gamma)) * math.sqrt(gamma.size) + np.linalg.norm(shift)), True
        break
    return beta, False


def _flatten_axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def _plan(layer: HiddenLayer, config: PruneConfig, radius: float, rng: np.random.Generator):
    sup = bounds.activation_sup(layer, radius)
    sensitivity = coreset.sensitivities(layer.out_weights, sup)
    target = coreset.target_count(layer.size, config.keep, config.neurons)
    norms = np.linalg.norm(layer.points, axis=1)
    selection = coreset.select(config.method, sensitivity=sensitivity, point_norms=norms, target=target, rng=rng)
    return selection, sensitivity


def _sliced_layer(layer: HiddenLayer, kept: np.ndarray) -> HiddenLayer:
    return HiddenLayer(
        layer.weights[kept],
        layer.bias[kept],
        layer.activation.sliced(kept, layer.size),
        layer.post_scale[kept],
        layer.post_shift[kept],
        layer.out_weights[:, kept],
    )


def prune_loaded(loaded: io.LoadedModel, config: PruneConfig) -> PruneReport:
    """Prune every chain of a loaded model in place (its WeightStore and declared shapes)."""
    model, store = loaded.model, loaded.store
    chains, skipped = find_chains(model.graph, store)
    view = GraphView(model.graph, store)
    params_before = _param_count(store, _all_weights(model, store))
    radii: dict[str, float] = {}
    layers: list[LayerReport] = []
    for position, chain in enumerate(chains):
        layer = read_layer(chain, store)
        if not (np.all(np.isfinite(layer.points)) and np.all(np.isfinite(layer.out_weights))):
            skipped.append(Skipped(chain.name, "its weights contain NaN or Inf"))
            continue
        radius, certified = input_radius(view, chain.producer.input, config.beta, radii)
        rng = np.random.default_rng([config.seed, position])
        selection, sensitivity = _plan(layer, config, radius, rng)
        before = _param_count(store, _chain_tensors(chain))
        bound = bounds.certified_bound(layer, selection.kept, selection.scale, radius)
        surgery.apply(chain, selection, store)
        surgery.resize_shapes(model.graph, chain, selection.size, store)
        radii[chain.hidden] = bounds.output_radius(_sliced_layer(layer, selection.kept), radius)
        layers.append(
            LayerReport(
                name=chain.name,
                activation=chain.activation_label,
                consumers=tuple(c.label for c in chain.consumers),
                neurons_before=chain.size,
                neurons_after=selection.size,
                params_before=before,
                params_after=_param_count(store, _chain_tensors(chain)),
                draws=selection.draws,
                radius=radius,
                radius_certified=certified,
                certified_bound=bound,
                sensitivity_total=float(sensitivity.sum()),
            )
        )
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
                    "certified_bound": l.certified_bound,
                }
                for l in report.layers
            ],
            sort_keys=True,
        ),
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


def check(model_path: Path) -> None:
    """The written model must pass the full checker (shape inference included)."""
    try:
        onnx.checker.check_model(str(model_path), full_check=True)
    except Exception as exc:  # the checker raises several types; all mean the same to a user
        raise ModelError(f"the pruned model fails onnx.checker: {str(exc).splitlines()[0][:300]}") from None


def prune(model: onnx.ModelProto | str | os.PathLike[str], config: PruneConfig | None = None, **options) -> tuple[onnx.ModelProto, PruneReport]:
    """Prune an in-memory model or a file; return the pruned ModelProto (weights inline) and the report.

    The input is never modified. Options are PruneConfig's fields (``keep=0.5, method="coreset"``).
    """
    config = config or PruneConfig(**options)
    loaded = _load_any(model)
    report = prune_loaded(loaded, config)
    loaded.store.materialize()
    return loaded.model, report


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
) -> PruneReport:
    """Prune a file into another, staged: nothing is written unless every check (and validation) passes.

    With ``force`` a model that fails validation is written anyway (the report says it failed).
    """
    source, target = Path(source), Path(target)
    if target.exists() and source.exists() and target.resolve() == source.resolve() and not force:
        raise UsageError(f"{target}: the output would overwrite the input; pass --force to allow it")
    loaded = io.load(source)
    report = prune_loaded(loaded, config)
    staged = io.stage(loaded, target)
    try:
        check(staged.model_path)
        validation: ValidationReport | None = None
        if validate:
            validation = compare(
                source, staged.model_path, device=device, probes=probes, beta=config.beta,
                seed=config.seed, shapes=shapes, data=data, max_error=max_error,
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
            params=_param_count(store, _chain_tensors(c)),
        )
        for c in chains
    )
    metadata = {p.key: p.value for p in loaded.model.metadata_props if p.key.startswith(METADATA_PREFIX)}
    return InspectReport(infos, tuple(SkippedReport(s.name, s.reason) for s in skipped), metadata)
