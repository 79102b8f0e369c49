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
    # The plan, replayable: original indices of the kept neurons and the factor each one's
    # outgoing weights were multiplied by (count/(m·pr) for sampled methods, else 1).
    kept: tuple[int, ...] = ()
    scale: tuple[float, ...] = ()
    # How far the certificate can be trusted and how tight it is (see radii.py, bounds.py, attack.py).
    radius_kind: str = "assumed"  # certified (propagated from β), measured (data file) or assumed (β)
    radius_source: str = ""  # where the radius came from, in one line
    attained_error: float | None = None  # the largest error a gradient search found on the ball
    theorem7_sample_size: int | None = None  # m = ⌈(t/ε²)(d·log t + log(1/δ))⌉, c = 1, δ = 0.1
    note: str = ""  # e.g. why --epsilon left the chain whole
    # The data-aware methods (strategy.py): what pruned this chain, and how well it did on samples.
    method: str = ""  # the selection (sensitivity, coreset-vr, greedy-ls, …); empty: the run's --method
    sup: str = ""  # ball, rms or max: where sup|ψ_j| in s(j) came from
    reweight: str = ""  # none, ball-ls or data-ls
    measured_error: float | None = None  # E‖e‖² / E‖Uh − E[Uh]‖² of the consumers' pre-activations
    measured_on: str = ""  # the samples it was measured on
    choice: str = ""  # why this selection and reweighting (auto), and skipped bias corrections

    @property
    def tightness(self) -> float | None:
        """certified / attained: 1 is a certificate that cannot be improved."""
        if self.attained_error is None or self.attained_error <= 0:
            return None
        return self.certified_bound / self.attained_error


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
    epsilon: float | None = None
    beta_source: str = "given"  # or "measured on FILE" (--beta-from)
    network_bound: dict[str, float] | None = None  # certified change of each output, where chains compose
    network_note: str = ""  # why there is no network bound

    def to_dict(self) -> dict:
        data = asdict(self)
        for entry, layer in zip(data["layers"], self.layers):
            entry["tightness"] = layer.tightness
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
            f"{l.radius:.4g} ({l.radius_kind})",
            f"{l.certified_bound:.4g}",
            "-" if l.attained_error is None else f"{l.attained_error:.4g}",
            "-" if l.tightness is None else f"{l.tightness:.2f}",
        ]
        for l in report.layers
    ]
    headers = ["layer", "activation", "neurons", "m", "radius", "certified bound", "attained", "ratio"]
    parts = [_table(headers, rows)]
    ratio = report.params_after / report.params_before if report.params_before else 1.0
    parts.append(
        f"parameters: {report.params_before:,} -> {report.params_after:,} ({100 * ratio:.1f}%)   "
        f"method {report.method}, seed {report.seed}, beta {report.beta:g} ({report.beta_source})"
        + ("" if report.epsilon is None else f", epsilon {report.epsilon:g}")
    )
    parts += [f"note {l.name}: {l.note}" for l in report.layers if l.note]
    parts += [
        f"plan {l.name}: {l.choice}"
        + ("" if l.measured_error is None else f"; relative error {l.measured_error:.4g} on {l.measured_on}")
        for l in report.layers if l.choice
    ]
    kinds = {l.radius_kind for l in report.layers}
    if kinds - {"certified"}:
        parts.append(
            "radius: certified = propagated from beta (the L2 norm bound of one input sample: 28 for 28x28 "
            "images in [0,1], 7140 for 0-255 pixels); measured = largest norm on --beta-from data; "
            "assumed = beta where neither applies, so those bounds hold only if it is right"
        )
    for skip in report.skipped:
        parts.append(f"skipped {skip.name}: {skip.reason}")
    network = report.network_bound or {}
    if report.network_bound and not report.validation:
        parts += [f"network bound: output '{k}' moves by at most {v:.4g} on the beta ball" for k, v in network.items()]
    if report.validation:
        v = report.validation
        vrows = [[o.name, f"{o.max_abs:.6g}", f"{o.mean_l1:.6g}", f"{network[o.name]:.6g}" if o.name in network else "-"]
                 for o in v.outputs]
        parts.append(f"validation on {v.probes} probes ({v.provider}):")
        parts.append(_table(["output", "max abs", "mean L1", "network bound"], vrows))
        if v.chains:
            crows = [
                [c.name, f"{c.max_abs:.6g}", f"{c.certified_bound:.6g}", str(c.probes), f"{c.probes_per_second:,.0f}",
                 "ok" if c.ok else "EXCEEDED"]
                for c in v.chains
            ]
            parts.append(_table(["layer", "max abs", "certified", "probes", "probes/s", "check"], crows))
        parts += [f"note: {n}" for n in v.notes]
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
        parts += [
            f"  {k} = " + (f"(kept neurons and scales of {v.count('kept')} chain(s), read by validate)" if k.endswith(".plan")
                           else v if len(v) <= 2000 else v[:2000] + " …")
            for k, v in sorted(report.metadata.items())
        ]
    return "\n".join(parts)
