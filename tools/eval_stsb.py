"""STS-B Spearman of all-MiniLM-L6-v2 before and after pruning every FFN, per method and keep fraction.

For each export variant in models/build (``minilm_l6_opset{17,20}_{legacy,dynamo}.onnx``, written by
``python models/export_minilm.py``) the FFN chains the package finds are counted and the dense
model is scored. Then, on the chosen variant(s), every FFN is pruned with the public API
(``onnxcoreset.prune``) at each keep fraction and method, and the pruned model is scored on the
STS-B test set (../shared/data/stsb, 1,379 pairs): Spearman ×100 of the cosine similarity of
mean-pooled, L2-normalised embeddings against the gold scores (models/stsb.py). The dense model
scores 82.03.

The radius: an FFN reads the attention block's LayerNormalization output, whose rows have norm at
most max|γ|·√384 + ‖β_LN‖; the package propagates exactly that (a certified radius), so ``--beta``
(the radius of the graph *input*, here token ids) does not enter the FFN sensitivities at all. The
radius each chain used is printed.

Usage: python tools/eval_stsb.py [--variants opset17_legacy] [--keeps 0.75 0.5 0.25]
                                 [--methods coreset percentile uniform] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import onnx

import onnxcoreset

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "models"))

from stsb import DEFAULT_SHARED, evaluate_stsb

BUILD = REPO / "models" / "build"
VARIANTS = ("opset17_legacy", "opset17_dynamo", "opset20_legacy", "opset20_dynamo")
DENSE_REFERENCE = 82.03


def variant_path(variant: str, build: Path = BUILD) -> Path:
    return build / f"minilm_l6_{variant}.onnx"


def count_chains(path: Path) -> tuple[int, int, str]:
    """(FFN chains found, layers skipped, activation forms) of one export."""
    report = onnxcoreset.inspect(path)
    activations = ",".join(sorted({c.activation for c in report.chains}))
    return len(report.chains), len(report.skipped), activations


def prune_and_score(path: Path, keep: float, method: str, seed: int, beta: float, shared: Path) -> tuple[float, onnxcoreset.PruneReport, float]:
    """Spearman ×100 of the pruned model, its report, and the seconds pruning took."""
    started = time.perf_counter()
    pruned, report = onnxcoreset.prune(path, keep=keep, method=method, seed=seed, beta=beta)
    seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "pruned.onnx"
        onnx.save(pruned, target)
        return evaluate_stsb(target, "test", shared), report, seconds


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([line(header), "| " + " | ".join("-" * w for w in widths) + " |", *map(line, rows)])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["opset17_legacy"], choices=VARIANTS,
                        help="exports to prune and score (all four are counted and scored dense)")
    parser.add_argument("--keeps", nargs="+", type=float, default=[0.75, 0.5, 0.25])
    parser.add_argument("--methods", nargs="+", default=["coreset", "percentile", "uniform"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--beta", type=float, default=1.0, help="graph-input radius; unused by the FFNs (see above)")
    parser.add_argument("--build", type=Path, default=BUILD, help="folder with the exports")
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="the shared/ folder with data/stsb")
    args = parser.parse_args(argv)

    present = [v for v in VARIANTS if variant_path(v, args.build).exists()]
    if not present:
        raise SystemExit(f"no MiniLM export in {args.build}: run python models/export_minilm.py first")
    rows, dense = [], {}
    for variant in present:
        path = variant_path(variant, args.build)
        chains, skipped, activations = count_chains(path)
        dense[variant] = evaluate_stsb(path, "test", args.shared)
        rows.append([variant, str(chains), activations, str(skipped), f"{dense[variant]:.2f}"])
        print(f"{variant}: {chains} FFN chains ({activations}), {skipped} skipped, dense {dense[variant]:.2f}", flush=True)
    print("\nFFN chains per export variant (STS-B test Spearman ×100 of the dense export; reference 82.03)\n")
    print(_table(["variant", "FFN chains", "activation", "skipped", "dense"], rows))

    for variant in args.variants:
        if variant not in present:
            print(f"\n{variant}: not built, skipped")
            continue
        path = variant_path(variant, args.build)
        scores: dict[tuple[str, float], float] = {}
        radii: list[str] = []
        for method in args.methods:
            for keep in args.keeps:
                score, report, seconds = prune_and_score(path, keep, method, args.seed, args.beta, args.shared)
                scores[method, keep] = score
                kept = "/".join(str(l.neurons_after) for l in report.layers)
                print(f"{variant} {method} keep {keep}: {score:.2f} (neurons {kept} of 1536 per FFN, "
                      f"params {report.params_before:,} -> {report.params_after:,}, pruned in {seconds:.0f} s)", flush=True)
                if not radii:
                    radii = [f"{l.radius:.2f}{'' if l.radius_certified else ' (assumed)'}" for l in report.layers]
        print(f"\nSTS-B test Spearman ×100, {variant}, every FFN pruned (dense {dense[variant]:.2f}; seed {args.seed})\n")
        header = ["method"] + [f"keep {k:g}" for k in args.keeps]
        print(_table(header, [[m] + [f"{scores[m, k]:.2f}" for k in args.keeps] for m in args.methods]))
        print(f"\nFFN input radius per layer (LayerNormalization output, certified): {', '.join(radii)}")


if __name__ == "__main__":
    main()
