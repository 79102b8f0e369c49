"""Certified bounds against attained errors, ε-driven sizes and validation throughput, on real models.

For LeNet-300-100 (models/build/lenet300_mnist.onnx from models/train_lenet300.py; the random
models/build_mlp.py MLP when it is missing) and for all-MiniLM-L6-v2's six FFNs
(models/build/minilm_l6_opset17_legacy.onnx from models/export_minilm.py):

1. at keep 0.5 and 0.25 (coreset method, seed 0): per chain the input radius and its kind, the
   certified bound, the interval-arithmetic bound it improves on (for chains planned on the
   original weights), the attained error (the pipeline's gradient search, and a longer search
   here) and their ratio;
2. the neurons ``--epsilon`` keeps per chain for three values of ε, and how long the search took;
3. the per-chain validation throughput: ``--probes`` points through both chain sub-models on
   onnxruntime (device auto: CUDA where onnxruntime-gpu finds a GPU), in probes per second.

β for LeNet is √784 = 28, the radius of [0, 1]^784 (its inputs are x/255). MiniLM's FFN inputs
are LayerNorm outputs, whose radius is certified from γ and β alone, so β plays no part there.

Usage: python tools/eval_bounds.py [--models lenet,minilm] [--probes 100000] [--device auto]
Writes tools/results/eval_bounds.md (the printed tables, headed by the command) and eval_bounds.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "models"))

import onnxcoreset  # noqa: E402
from onnxcoreset import attack, bounds  # noqa: E402
from onnxcoreset.chains import find_chains  # noqa: E402
from onnxcoreset.io import load  # noqa: E402
from onnxcoreset.neurons import read_layer  # noqa: E402
from onnxcoreset.pipeline import PruneConfig, _stored_outgoing  # noqa: E402
from onnxcoreset.validate import validate_chains  # noqa: E402

LENET = ROOT / "models" / "build" / "lenet300_mnist.onnx"
MINILM = ROOT / "models" / "build" / "minilm_l6_opset17_legacy.onnx"
RESULTS = ROOT / "tools" / "results"
EPSILONS = {"lenet": (150.0, 400.0, 1500.0), "minilm": (400.0, 800.0, 1600.0)}


def _models(names: list[str], workdir: Path) -> list[tuple[str, Path, float]]:
    chosen = []
    if "lenet" in names:
        if LENET.exists():
            chosen.append(("lenet", LENET, 28.0))
        else:
            import build_mlp

            path = workdir / "mlp_784_300_100_10.onnx"
            onnx.save(build_mlp.build(0), path)
            chosen.append(("lenet (random build_mlp weights)", path, 28.0))
    if "minilm" in names:
        if not MINILM.exists():
            raise SystemExit(f"{MINILM} is missing: run python models/export_minilm.py first")
        chosen.append(("minilm", MINILM, 1.0))
    return chosen


def _independent(chains) -> set[str]:
    """Chains whose producer is no other chain's consumer: planned on the file's own weights."""
    consumers = {c.node for chain in chains for c in chain.consumers}
    return {chain.name for chain in chains if chain.producer.node not in consumers}


def _recheck(loaded, chains, layer_report, radius: float, steps: int) -> tuple[float, float]:
    """(interval bound, longer search's attained error) for a chain planned on the file's weights."""
    chain = next(c for c in chains if c.name == layer_report.name)
    layer = read_layer(chain, loaded.store)
    layer = replace(layer, weights=np.asarray(layer.weights, np.float64), out_weights=np.asarray(layer.out_weights, np.float64))
    kept, scale = np.asarray(layer_report.kept), np.asarray(layer_report.scale)
    coef = bounds.coefficients(layer.out_weights, kept, _stored_outgoing(chain, loaded.store, kept, scale))
    certificate = bounds.certify(layer, coef, radius)
    worst = np.argsort(-certificate.per_consumer)[:6]
    found = attack.search([attack.Term(layer, coef)], radius, np.random.default_rng(99), consumers=worst,
                          worst=4, steps=steps, starts=16, random_points=8192)
    return certificate.interval, found.value


def bounds_table(name: str, path: Path, beta: float, steps: int) -> list[dict]:
    loaded = load(path)
    chains = find_chains(loaded.model.graph, loaded.store)[0]
    independent = _independent(chains)
    rows = []
    for keep in (0.5, 0.25):
        start = time.perf_counter()
        _, report = onnxcoreset.prune(path, PruneConfig(keep=keep, beta=beta))
        seconds = time.perf_counter() - start
        for layer in report.layers:
            interval, longer = _recheck(loaded, chains, layer, layer.radius, steps) if layer.name in independent else (None, None)
            attained = max(a for a in (layer.attained_error, longer) if a is not None)
            rows.append({
                "model": name, "keep": keep, "chain": layer.name, "neurons": f"{layer.neurons_before}->{layer.neurons_after}",
                "radius": layer.radius, "radius_kind": layer.radius_kind, "certified": layer.certified_bound,
                "interval": interval, "attained_pipeline": layer.attained_error, "attained_long": longer,
                "ratio": layer.certified_bound / attained if attained else None, "prune_seconds": seconds,
            })
    return rows


def epsilon_table(name: str, path: Path, beta: float) -> list[dict]:
    rows = []
    for epsilon in EPSILONS[name.split(" ")[0]]:
        start = time.perf_counter()
        _, report = onnxcoreset.prune(path, PruneConfig(epsilon=epsilon, beta=beta))
        seconds = time.perf_counter() - start
        rows.append({
            "model": name, "epsilon": epsilon, "seconds": seconds,
            "kept": [f"{l.neurons_after}/{l.neurons_before}" for l in report.layers],
            "certified": [l.certified_bound for l in report.layers],
        })
    return rows


def throughput_table(name: str, path: Path, beta: float, probes: int, device: str, workdir: Path) -> list[dict]:
    target = workdir / f"{path.stem}_half.onnx"
    onnxcoreset.prune_file(path, target, PruneConfig(keep=0.5, beta=beta), validate=False)
    chains, failures, notes = validate_chains(path, target, device=device, probes=probes)
    return [{
        "model": name, "chain": c.name, "probes": c.probes, "seconds": c.seconds, "probes_per_second": c.probes_per_second,
        "provider": c.provider, "max_abs": c.max_abs, "adversarial_max_abs": c.adversarial_max_abs,
        "certified": c.certified_bound, "ok": c.ok,
    } for c in chains]


def _fmt(value, digits=4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _markdown(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lenet,minilm")
    parser.add_argument("--probes", type=int, default=100_000, help="points per chain for the throughput run")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=150, help="ascent steps of the longer search")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    command = "python tools/eval_bounds.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results: dict[str, list] = {"bounds": [], "epsilon": [], "throughput": []}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for name, path, beta in _models(args.models.split(","), workdir):
            results["bounds"] += bounds_table(name, path, beta, args.steps)
            results["epsilon"] += epsilon_table(name, path, beta)
            results["throughput"] += throughput_table(name, path, beta, args.probes, args.device, workdir)
    threads = os.environ.get("OPENBLAS_NUM_THREADS", "unset")
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    text = [f"`{command.strip()}`", "",
            f"{os.cpu_count()} CPU cores, OPENBLAS_NUM_THREADS={threads}, load average at the end {load}; "
            "certified and interval bounds as the package computes them, attained = largest error found by "
            "the pipeline's gradient search and by a longer one (150 steps, 16 starts per consumer and sign).", ""]
    text.append(_markdown(
        ["model", "keep", "chain", "neurons", "radius", "kind", "certified", "interval", "attained", "attained (long)", "certified/attained"],
        [[r["model"], r["keep"], r["chain"], r["neurons"], r["radius"], r["radius_kind"], r["certified"], r["interval"],
          r["attained_pipeline"], r["attained_long"], r["ratio"]] for r in results["bounds"]],
    ))
    text += ["", _markdown(
        ["model", "ε", "neurons kept per chain", "certified per chain", "seconds"],
        [[r["model"], r["epsilon"], ", ".join(r["kept"]), ", ".join(_fmt(c) for c in r["certified"]), r["seconds"]]
         for r in results["epsilon"]],
    )]
    text += ["", _markdown(
        ["model", "chain", "probes", "seconds", "probes/s", "provider", "max abs", "certified", "ok"],
        [[r["model"], r["chain"], r["probes"], r["seconds"], f"{r['probes_per_second']:,.0f}", r["provider"], r["max_abs"],
          r["certified"], r["ok"]] for r in results["throughput"]],
    )]
    report = "\n".join(text)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eval_bounds.md").write_text(report + "\n")
    (args.out / "eval_bounds.json").write_text(json.dumps(results, indent=2, default=lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)) + "\n")


if __name__ == "__main__":
    main()
