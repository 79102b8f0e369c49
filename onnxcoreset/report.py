"""What a run did, as frozen data: JSON for pipelines, a table for people."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .validate import ValidationReport


@dataclass(frozen=True)
class LayerReport:
    name: str
    activation: str
    consumers: tuple[str, ...]
    neurons_before: int
    neurons_after: int
    params_before: int
    params_after: int
    draws: int | None  # m actually drawn, for sampled methods
    radius: float  # input radius the sensitivities and the bound use
    radius_certified: bool  # False where the radius could not be propagated and β was assumed
    certified_bound: float  # max over consumer neurons of the worst-case change on the ball
    sensitivity_total: float  # t = Σ_j s(j), Theorem 7's total sensitivity


@dataclass(frozen=True)
class SkippedReport:
    name: str
    reason: str


@dataclass(frozen=True)
class ChainInfo:
    """A prunable chain as ``inspect`` lists it."""

    name: str
    producer: str
    activation: str
    steps: tuple[str, ...]
    consumers: tuple[str, ...]
    hidden_size: int
    params: int


@dataclass(frozen=True)
class InspectReport:
    chains: tuple[ChainInfo, ...]
    skipped: tuple[SkippedReport, ...]
    metadata: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PruneReport:
    version: str
    method: str
    seed: int
    beta: float
    keep: float | None
    neurons: int | None
    params_before: int
    params_after: int
    layers: tuple[LayerReport, ...]
    skipped: tuple[SkippedReport, ...]
    validation: ValidationReport | None = None
    outputs: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        data = asdict(self)
        data["validation"] = self.validation.to_dict() if self.validation else None
        data["compression"] = self.params_after / self.params_before if self.params_before else 1.0
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def render_prune(report: PruneReport) -> str:
    rows = [
        [
            l.name,
            l.activation,
            f"{l.neurons_before} -> {l.neurons_after}",
            str(l.draws) if l.draws is not None else "-",
            f"{l.radius:.4g}{'' if l.radius_certified else ' (assumed)'}",
            f"{l.certified_bound:.4g}",
        ]
        for l in report.layers
    ]
    parts = [_table(["layer", "activation", "neurons", "m", "radius", "certified bound"], rows)]
    ratio = report.params_after / report.params_before if report.params_before else 1.0
    parts.append(
        f"parameters: {report.params_before:,} -> {report.params_after:,} ({100 * ratio:.1f}%)   "
        f"method {report.method}, seed {report.seed}, beta {report.beta:g}"
    )
    for skip in report.skipped:
        parts.append(f"skipped {skip.name}: {skip.reason}")
    if report.validation:
        v = report.validation
        vrows = [[o.name, f"{o.max_abs:.6g}", f"{o.mean_l1:.6g}"] for o in v.outputs]
        parts.append(f"validation on {v.probes} probes ({v.provider}):")
        parts.append(_table(["output", "max abs", "mean L1"], vrows))
        parts += [f"FAILED: {f}" for f in v.failures] or ["validation passed"]
    return "\n".join(parts)


def render_inspect(report: InspectReport) -> str:
    rows = [
        [c.name, c.activation, " ".join(c.steps) or "-", ", ".join(c.consumers), str(c.hidden_size), f"{c.params:,}"]
        for c in report.chains
    ]
    parts = [f"{len(report.chains)} prunable chain(s)"]
    if rows:
        parts.append(_table(["producer", "activation", "steps", "consumers", "hidden", "params"], rows))
    parts.append(f"{len(report.skipped)} skipped")
    parts += [f"  {s.name}: {s.reason}" for s in report.skipped]
    if report.metadata:
        parts.append("onnxcoreset metadata:")
        parts += [f"  {k} = {v}" for k, v in sorted(report.metadata.items())]
    return "\n".join(parts)
