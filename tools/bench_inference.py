"""Inference speed of pruned models in onnxruntime, and the throughput of onnxcoreset's validation.

Latency: each model (original and pruned at --keep 0.5) runs in its own fresh process (two
sessions in one process compete for the same threads), batch 32, CPU provider with its default
threads; the median of --runs timed runs after 3 warm-ups, and the median of --repeat processes.
The ideal ratio is the pruned model's matmul FLOPs over the original's (2·in·out per Gemm/MatMul
weight and sample; the elementwise ops are negligible). Session creation time (loading the
weights included) is reported too.

Validation: the probes per second of ``validate.compare`` on a MiniLM-sized FFN chain
(384 → 1536 → 384, GELU as the Erf subgraph PyTorch exports), CPU: the whole-model probes and the
per-chain check against the certified bound (onnxruntime time and wall time).

    python tools/bench_inference.py                  # the three models of bench_speed + validation
    python tools/bench_inference.py --quick          # small models, a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

TOOLS_DIR = Path(__file__).resolve().parent
REPO = TOOLS_DIR.parent
sys.path.insert(0, str(TOOLS_DIR))

import gen_big_models as gen

DEFAULT_MODELS = ["vgg16_head", "ffn_1024x24", "ffn_4096x6"]
QUICK_MODELS = ["quick_vgg_head", "quick_ffn_512x8"]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))


# --------------------------------------------------------------------------- workers (child side)


def _latency_worker(path: str, batch: int, runs: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    begin = time.perf_counter()
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    created = time.perf_counter() - begin
    arg = sess.get_inputs()[0]
    x = np.random.default_rng(0).standard_normal((batch, int(arg.shape[1])), dtype=np.float32)
    for _ in range(3):
        sess.run(None, {arg.name: x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, {arg.name: x})
        times.append(time.perf_counter() - start)
    return {"session_s": created, "latency_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times)}


def _validation_worker(original: str, pruned: str, probes: int, chain_probes: int) -> dict:
    """chain_probes < 0: the default validation (compare with its defaults); else validate_chains
    with exactly that many random points per chain (compare bounds them on large chains)."""
    from onnxcoreset.validate import compare, validate_chains

    begin = time.perf_counter()
    if chain_probes < 0:
        report = compare(Path(original), Path(pruned), device="cpu", probes=probes)
        chains, ok, provider = report.chains, report.ok, report.provider
    else:
        chains, failures, _ = validate_chains(Path(original), Path(pruned), device="cpu", probes=chain_probes)
        ok, provider = not failures, chains[0].provider if chains else "?"
    wall = time.perf_counter() - begin
    return {"wall_s": wall, "ok": ok, "provider": provider,
            "chains": [{"probes": c.probes, "seconds": c.seconds, "ok": c.ok} for c in chains]}


# --------------------------------------------------------------------------- parent side


def _child(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", *args],
                          capture_output=True, text=True, env=_env(), cwd=str(REPO), check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {args[0]} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def prune(source: Path, target: Path) -> None:
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "onnxcoreset.cli", "prune", str(source), str(target), "--keep", "0.5", "--no-validate"]
    subprocess.run(cmd, check=True, env=_env(), cwd=str(REPO), stdout=subprocess.DEVNULL)


def matmul_flops(path: Path) -> int:
    """2·(weight elements) per sample over every Gemm/MatMul whose weight is an initializer."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type in ("Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in shapes:
            dims = shapes[node.input[1]]
            total += 2 * int(dims[0]) * int(dims[1]) if len(dims) == 2 else 0
    return total


def bench_latency(names: list[str], work: Path, batch: int, runs: int, repeat: int, log) -> list[dict]:
    rows = []
    for name in names:
        source = gen.generate(gen.SPECS[name], work / "models")
        pruned = work / "pruned" / name / f"{name}.onnx"
        prune(source, pruned)
        results: dict[str, list[dict]] = {"original": [], "pruned": []}
        for _ in range(repeat):
            for label, path in (("original", source), ("pruned", pruned)):
                results[label].append(_child(["latency", str(path), str(batch), str(runs)]))
        med = {k: {m: statistics.median(r[m] for r in v) for m in ("session_s", "latency_ms")} for k, v in results.items()}
        flops = {"original": matmul_flops(source), "pruned": matmul_flops(pruned)}
        row = {"model": name, **{f"{k}_{m}": med[k][m] for k in med for m in med[k]},
               "flop_ratio": flops["pruned"] / flops["original"],
               "latency_ratio": med["pruned"]["latency_ms"] / med["original"]["latency_ms"]}
        rows.append(row)
        log(f"{name}: latency {med['original']['latency_ms']:.1f} → {med['pruned']['latency_ms']:.1f} ms "
            f"(ratio {row['latency_ratio']:.3f}, ideal {row['flop_ratio']:.3f}); session "
            f"{med['original']['session_s']:.2f} → {med['pruned']['session_s']:.2f} s")
    return rows


def _minilm_chain(folder: Path) -> Path:
    """384 → 1536 → GELU (Erf subgraph, as PyTorch's legacy exporter writes it) → 384, random weights."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    path = folder / "minilm_ffn_chain.onnx"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    d, h = 384, 1536
    inits = [
        numpy_helper.from_array((rng.standard_normal((d, h)) / np.sqrt(d)).astype(np.float32), "w1"),
        numpy_helper.from_array((0.1 * rng.standard_normal(h)).astype(np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal((h, d)) / np.sqrt(h)).astype(np.float32), "w2"),
        numpy_helper.from_array((0.1 * rng.standard_normal(d)).astype(np.float32), "b2"),
        numpy_helper.from_array(np.array(np.sqrt(2.0), np.float32), "sqrt2"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
    ]
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["mm1"]),
        helper.make_node("Add", ["mm1", "b1"], ["pre"]),
        helper.make_node("Div", ["pre", "sqrt2"], ["scaled"]),
        helper.make_node("Erf", ["scaled"], ["erf"]),
        helper.make_node("Add", ["erf", "one"], ["erf1"]),
        helper.make_node("Mul", ["pre", "erf1"], ["gx"]),
        helper.make_node("Mul", ["gx", "half"], ["gelu"]),
        helper.make_node("MatMul", ["gelu", "w2"], ["mm2"]),
        helper.make_node("Add", ["mm2", "b2"], ["output"]),
    ]
    graph = helper.make_graph(nodes, "minilm_ffn", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", d])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", d])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.save(model, str(path))
    return path


def bench_validation(work: Path, settings: list[tuple[int, int]], repeat: int, log) -> list[dict]:
    source = _minilm_chain(work / "validation")
    pruned = work / "validation" / "minilm_ffn_chain.pruned.onnx"
    prune(source, pruned)
    rows = []
    for probes, chain_probes in settings:
        runs = [_child(["validation", str(source), str(pruned), str(probes), str(chain_probes)]) for _ in range(repeat)]
        wall = statistics.median(r["wall_s"] for r in runs)
        chain_seconds = statistics.median(sum(c["seconds"] for c in r["chains"]) for r in runs)
        chain_total = runs[0]["chains"][0]["probes"] if runs[0]["chains"] else 0
        row = {"probes": probes, "chain_probes": chain_probes, "chain_points": chain_total, "wall_s": wall,
               "chain_ort_s": chain_seconds, "provider": runs[0]["provider"], "ok": all(r["ok"] for r in runs),
               "chain_points_per_s_ort": chain_total / chain_seconds if chain_seconds else float("nan"),
               "points_per_s_wall": (probes + chain_total) / wall}
        rows.append(row)
        log(f"validation probes={probes} chain_probes={'default' if chain_probes < 0 else chain_probes}: {wall:.2f} s wall, "
            f"{row['chain_points_per_s_ort']:.0f} chain points/s in onnxruntime, {row['points_per_s_wall']:.0f} points/s wall")
    return rows


def render(latency: list[dict], validation: list[dict], command: str, batch: int, runs: int, repeat: int) -> str:
    lines = [
        "# Inference speed of pruned models, and validation throughput",
        "",
        f"Command: `{command}`  ",
        (f"Machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, onnxruntime {_version('onnxruntime-gpu') or _version('onnxruntime')} "
         "(CPUExecutionProvider, default threads). No GPU in this environment: the CUDA figures are not measured."),
        "",
        f"## Latency at batch {batch} (median of {runs} runs per process, median of {repeat} processes, one model per process)",
        "",
        "| model | original ms | pruned ms | latency ratio | ideal FLOP ratio | latency / ideal (target ≤ 1.10) | session s original | session s pruned |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in latency:
        lines.append(
            f"| {r['model']} | {r['original_latency_ms']:.1f} | {r['pruned_latency_ms']:.1f} | {r['latency_ratio']:.3f} | "
            f"{r['flop_ratio']:.3f} | {r['latency_ratio'] / r['flop_ratio']:.2f} | {r['original_session_s']:.2f} | {r['pruned_session_s']:.2f} |"
        )
    if validation:
        lines += [
            "",
            "## Validation throughput on a MiniLM-sized FFN chain (384 → 1536 GELU → 384), CPU",
            "",
            ("First row: the default validation, `validate.compare(original, pruned, device='cpu')` (64 whole-model "
             "probes, then the chain on its own against its certified bound on 4096 random points of its ball plus "
             "the adversarial points a gradient search finds). Other rows: `validate_chains(..., probes=C)` alone. "
             "Wall time includes loading, building the sub-model sessions and the search."),
            "",
            "| probes P | chain probes C | chain points run | wall s | chain points/s (onnxruntime time) | all points/s (wall) | passed |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in validation:
            lines.append(f"| {r['probes']} | {'default' if r['chain_probes'] < 0 else r['chain_probes']} | {r['chain_points']} | {r['wall_s']:.2f} | "
                         f"{r['chain_points_per_s_ort']:.0f} | {r['points_per_s_wall']:.0f} | {r['ok']} |")
        lines += ["", "CUDA: not measured (no GPU in this environment)."]
    return "\n".join(lines) + "\n"


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        kind, rest = argv[1], argv[2:]
        if kind == "latency":
            result = _latency_worker(rest[0], int(rest[1]), int(rest[2]))
        else:
            result = _validation_worker(rest[0], rest[1], int(rest[2]), int(rest[3]))
        print(json.dumps(result))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help=f"Comma-separated names from gen_big_models.SPECS (default {','.join(DEFAULT_MODELS)}).")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--runs", type=int, default=20, help="Timed runs per process.")
    parser.add_argument("--repeat", type=int, default=3, help="Processes per model; the median is reported.")
    parser.add_argument("--quick", action="store_true", help="Small models, fewer runs: a smoke test.")
    parser.add_argument("--no-validation", action="store_true", help="Skip the validation throughput part.")
    parser.add_argument("--work", type=Path, default=Path("/tmp/onnxcoreset-bench"))
    parser.add_argument("--results", type=Path, help="Markdown file to write (default tools/results/bench_inference[_quick].md).")
    args = parser.parse_args(argv)
    names = args.models.split(",") if args.models else QUICK_MODELS if args.quick else DEFAULT_MODELS
    runs, repeat = (5, 1) if args.quick else (args.runs, args.repeat)
    command = "python tools/bench_inference.py " + " ".join(argv)

    def log(message: str) -> None:
        print(message, flush=True)

    latency = bench_latency(names, args.work, args.batch, runs, repeat, log)
    settings = [(64, -1), (0, 1024)] if args.quick else [(64, -1), (0, 4096), (0, 65536), (0, 262144)]
    validation = [] if args.no_validation else bench_validation(args.work, settings, repeat, log)
    text = render(latency, validation, command, args.batch, runs, repeat)
    out = args.results or TOOLS_DIR / "results" / f"bench_inference{'_quick' if args.quick else ''}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print()
    print(text)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
