"""Figure 2 of Mussay et al. (ICLR 2020): one layer's approximation error against coreset size.

On the trained LeNet-300-100 (models/train_lenet300.py; built when missing), ONE hidden layer at
a time is replaced by k of its neurons, chosen exactly as ``onnxcoreset prune`` chooses them (the
package's activation sups, sensitivities and ``coreset.select``, with the generator the pipeline
would give that chain), and every other weight is left as it is. The queries are the 10,000 MNIST
test images (x/255); for the second hidden layer they are the first layer's activations on them.

Error, per query x and consumer neuron i (the next layer's pre-activation z_i, whose own bias
cancels): e_i(x) = |Σ_j w_i(j) ψ_j(x) − Σ_{j∈C} u_i(j) ψ_j(x)|. The figure shows its mean over
all queries and all consumer neurons; the table also gives the mean over queries of max_i e_i(x)
and the relative error mean e / mean |z|. Randomised methods (coreset, uniform) are repeated over
seeds: mean, and the band between the 10th and 90th percentile over seeds.

β for the first hidden layer is √784 = 28, the L2 radius of [0, 1]^784 (the pipeline's β for a
graph input); the second layer's radius is the first layer's output radius on that ball, as
``bounds.output_radius`` propagates it in the pipeline. β does not affect uniform or percentile.

Usage: python tools/fig2_coreset_error.py [--seeds 10] [--model models/build/lenet300_mnist.onnx]
Writes tools/results/fig2_coreset_error.png and fig2_coreset_error.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np

import onnxcoreset
from onnxcoreset import bounds, coreset, io
from onnxcoreset.chains import find_chains
from onnxcoreset.neurons import HiddenLayer, read_layer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_mnist import LENET300, RESULTS, SHARED, digest, ensure_lenet300, load_mnist_test, shown

METHODS = ("coreset", "uniform", "percentile", "sensitivity")  # the paper compares the first three
RANDOMISED = {"coreset", "uniform"}
STYLE = {
    "coreset": {"color": "tab:blue", "marker": "o", "label": "coreset (paper)"},
    "uniform": {"color": "tab:orange", "marker": "s", "label": "uniform"},
    "percentile": {"color": "tab:green", "marker": "^", "label": "percentile (largest ‖p_j‖)"},
    "sensitivity": {
        "color": "tab:gray",
        "marker": "x",
        "linestyle": "--",
        "label": "top-k sensitivity (not in paper)",
    },
}
SIZES = {0: (10, 20, 30, 50, 75, 100, 150, 200, 250, 280), 1: (5, 10, 15, 20, 30, 40, 50, 60, 75, 90)}


@dataclass(frozen=True)
class Errors:
    """One selection's error over the queries."""

    mean: float  # mean over queries and consumer neurons of |z_i - ẑ_i|
    mean_max: float  # mean over queries of max_i |z_i - ẑ_i|
    draws: int | None


def layer_errors(layer: HiddenLayer, hidden: np.ndarray, selection: coreset.Selection) -> Errors:
    """The consumers' error when only ``selection`` of ``layer``'s neurons feed them, on cached ψ(x)."""
    approx = np.zeros_like(layer.out_weights)
    approx[:, selection.kept] = layer.out_weights[:, selection.kept] * selection.scale
    error = np.abs(hidden @ (layer.out_weights - approx).T)
    return Errors(float(error.mean()), float(error.max(axis=1).mean()), selection.draws)


def select(
    layer: HiddenLayer, radius: float, method: str, size: int, rng: np.random.Generator
) -> coreset.Selection:
    """The selection the pipeline would make for this layer (pipeline._plan, with --neurons size)."""
    sensitivity = coreset.sensitivities(layer.out_weights, bounds.activation_sup(layer, radius))
    norms = np.linalg.norm(layer.points, axis=1)
    return coreset.select(method, sensitivity=sensitivity, point_norms=norms, target=size, rng=rng)


def check_matches_pipeline(model: Path, chains, layer: HiddenLayer, radius: float) -> str:
    """Prune the file with ``onnxcoreset.prune(neurons=k, method="coreset")`` and compare its first layer to ours.

    k is chosen no smaller than every later layer, so the pipeline leaves those intact and the
    first consumer's weights must equal ours exactly: kept rows, rescaled columns.
    """
    size = max([c.size for c in chains[1:]] + [layer.size // 2])
    if size >= layer.size:
        return "not checked against the pipeline (no size prunes only the first layer)"
    ours = select(layer, radius, "coreset", size, np.random.default_rng([0, 0]))
    pruned, _ = onnxcoreset.prune(model, neurons=size, method="coreset", seed=0, beta=radius)
    reloaded = io.from_proto(pruned)
    theirs = read_layer(find_chains(reloaded.model.graph, reloaded.store)[0][0], reloaded.store)
    same_rows = np.array_equal(theirs.weights, layer.weights[ours.kept].astype(np.float32).astype(np.float64))
    expected = (layer.out_weights[:, ours.kept] * ours.scale).astype(np.float32).astype(np.float64)
    if not (same_rows and np.array_equal(theirs.out_weights, expected)):
        raise AssertionError("this script's selection differs from the one onnxcoreset.prune makes")
    return f"checked: at {size} kept neurons (seed 0) the selection equals onnxcoreset.prune's, weight for weight"


def run_layer(
    layer: HiddenLayer,
    queries: np.ndarray,
    radius: float,
    position: int,
    sizes: Sequence[int],
    seeds: Sequence[int],
) -> dict[str, dict[int, list[Errors]]]:
    hidden = layer.hidden(queries)
    results: dict[str, dict[int, list[Errors]]] = {}
    for method in METHODS:
        results[method] = {}
        for size in sizes:
            method_seeds = seeds if method in RANDOMISED else seeds[:1]
            # The pipeline seeds chain `position` with default_rng([seed, position]); do the same.
            results[method][size] = [
                layer_errors(
                    layer,
                    hidden,
                    select(layer, radius, method, size, np.random.default_rng([seed, position])),
                )
                for seed in method_seeds
            ]
    return results


def summary(errors: list[Errors], field: str) -> tuple[float, float, float]:
    values = np.array([getattr(e, field) for e in errors])
    return float(values.mean()), float(np.percentile(values, 10)), float(np.percentile(values, 90))


def plot(panels: list[tuple[str, dict[str, dict[int, list[Errors]]]]], path: Path) -> None:
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for axis, (title, results) in zip(axes[0], panels):
        for method, by_size in results.items():
            sizes = sorted(by_size)
            stats = np.array([summary(by_size[s], "mean") for s in sizes])
            axis.plot(sizes, stats[:, 0], markersize=4, **STYLE[method])
            if method in RANDOMISED:
                axis.fill_between(
                    sizes, stats[:, 1], stats[:, 2], color=STYLE[method]["color"], alpha=0.18, linewidth=0
                )
        axis.set_yscale("log")
        axis.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        axis.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("kept neurons (coreset size)")
        axis.set_ylabel("mean |error| of next layer's pre-activations")
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(
        "LeNet-300-100 on MNIST test queries: one layer pruned (mean; band 10th–90th percentile over seeds)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table(title: str, results: dict[str, dict[int, list[Errors]]], scale: float, seeds: int) -> list[str]:
    lines = [
        f"### {title}",
        "",
        (
            f"Mean |error| over queries and consumer neurons (mean ± std over {seeds} seeds for coreset and uniform); "
            f"in brackets the mean over queries of the largest error over consumer neurons; in parentheses relative to "
            f"this layer's mean contribution to the next pre-activations, mean_x,i |Σ_j w_i(j) ψ_j(x)| = {scale:.4g}."
        ),
        "",
        "| kept | " + " | ".join(METHODS) + " | coreset m (mean draws) | best |",
        "| --- | " + " | ".join("---" for _ in METHODS) + " | --- | --- |",
    ]
    for size in sorted(results["coreset"]):
        cells = []
        means = {}
        for method in METHODS:
            errors = results[method][size]
            mean = np.array([e.mean for e in errors])
            worst = np.array([e.mean_max for e in errors])
            means[method] = mean.mean()
            spread = f" ± {mean.std(ddof=1):.3g}" if mean.size > 1 else ""
            cells.append(f"{mean.mean():.3g}{spread} [{worst.mean():.3g}] ({100 * mean.mean() / scale:.1f}%)")
        draws = [e.draws for e in results["coreset"][size] if e.draws is not None]
        mean_draws = f"{np.mean(draws):.0f}" if draws else "-"
        best = min(means, key=means.get)
        lines.append(f"| {size} | " + " | ".join(cells) + f" | {mean_draws} | {best} |")
    return lines + [""]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, default=LENET300, help="an MLP with [batch, 784] input in [0, 1]"
    )
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1 for coreset and uniform")
    parser.add_argument("--layers", default="1,2", help="which hidden layers (1 = first) to evaluate")
    parser.add_argument("--out", type=Path, default=RESULTS / "fig2_coreset_error.png")
    args = parser.parse_args(argv)
    if args.model == LENET300:
        ensure_lenet300()
    started = time.perf_counter()
    loaded = io.load(args.model)
    chains, _ = find_chains(loaded.model.graph, loaded.store)
    layers = [read_layer(chain, loaded.store) for chain in chains]
    images, _ = load_mnist_test(SHARED)
    queries = images.astype(np.float64) / 255.0
    beta = math.sqrt(images.shape[1])
    seeds = list(range(args.seeds))
    radius, inputs = beta, queries
    panels, lines = [], []
    wanted = {int(v) - 1 for v in args.layers.split(",")}
    checked = check_matches_pipeline(args.model, chains, layers[0], beta)
    for position, (chain, layer) in enumerate(zip(chains, layers)):
        if position in wanted:
            sizes = [s for s in SIZES.get(position, SIZES[1]) if s < layer.size]
            results = run_layer(layer, inputs, radius, position, sizes, seeds)
            scale = float(np.abs(layer.output(inputs)).mean())
            title = f"hidden layer {position + 1} ({chain.name}, {layer.size} neurons, radius {radius:.4g})"
            panels.append((title, results))
            lines += table(title, results, scale, len(seeds))
        # The next layer's queries and radius come from this (unpruned) layer, as in the pipeline.
        radius = bounds.output_radius(layer, radius)
        inputs = layer.hidden(inputs)
        if position + 1 > max(wanted):
            break
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(panels, args.out)
    command = "python tools/fig2_coreset_error.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:])
    )
    header = [
        "# Figure 2: one layer's error against coreset size",
        "",
        (
            f"`{command}` (onnxcoreset {onnxcoreset.__version__}) on `{shown(args.model)}` (sha256 {digest(args.model)}…), queries: the "
            f"{len(queries):,} MNIST test images (x/255), β = √784 = {beta:g}. Each row replaces ONE hidden "
            f"layer by `kept` of its neurons, chosen as `onnxcoreset prune --neurons kept` would choose "
            f"them ({checked}), and measures the error of the next layer's pre-activations. Plot: `{shown(args.out)}`."
        ),
        "",
    ]
    text = "\n".join(header + lines)
    print(text)
    args.out.with_suffix(".md").write_text(text + "\n")
    print(
        f"wrote {args.out} and {args.out.with_suffix('.md')} in {time.perf_counter() - started:.0f} s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
