"""STS Benchmark evaluation of a MiniLM ONNX export: Spearman x100 of cosine similarities against gold scores.

Why: the honest quality figure for a pruned sentence encoder. all-MiniLM-L6-v2 scores 82.03
on sts-test (the shared/ README's reference). Usage: ``python models/stsb.py MODEL.onnx [--split dev]``.
"""

from __future__ import annotations

import argparse
import csv
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from minilm_tokenize import embed

DEFAULT_SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
SCORE_COLUMN, FIRST_SENTENCE_COLUMN, SECOND_SENTENCE_COLUMN = 4, 5, 6


def load_stsb(
    split: str = "test", shared_dir: Path = DEFAULT_SHARED
) -> tuple[list[str], list[str], np.ndarray]:
    """Return (first sentences, second sentences, gold scores 0..5) of ``sts-{split}.csv``.

    QUOTE_NONE because sentences contain unbalanced quotes; extra trailing fields are ignored.
    """
    firsts, seconds, scores = [], [], []
    with open(
        Path(shared_dir) / "data" / "stsb" / f"sts-{split}.csv", encoding="utf-8", newline=""
    ) as handle:
        for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            scores.append(float(row[SCORE_COLUMN]))
            firsts.append(row[FIRST_SENTENCE_COLUMN])
            seconds.append(row[SECOND_SENTENCE_COLUMN])
    return firsts, seconds, np.array(scores)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as scipy.stats.rankdata does)."""
    ranks = np.empty(len(values))
    ranks[np.argsort(values, kind="stable")] = np.arange(1, len(values) + 1)
    _, group, counts = np.unique(values, return_inverse=True, return_counts=True)
    return (np.bincount(group, weights=ranks) / counts)[group]


def spearman(first: np.ndarray, second: np.ndarray) -> float:
    """Spearman rank correlation: Pearson correlation of the average ranks."""
    return float(np.corrcoef(_average_ranks(first), _average_ranks(second))[0, 1])


def evaluate_stsb(model_path: str | Path, split: str = "test", shared_dir: Path = DEFAULT_SHARED) -> float:
    """Spearman x100 of the cosine similarities of mean-pooled, normalised embeddings (onnxruntime, CPU)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    firsts, seconds, gold = load_stsb(split, shared_dir)
    vectors = embed(session, firsts + seconds)
    cosines = (vectors[: len(firsts)] * vectors[len(firsts) :]).sum(axis=1)  # both sides have unit norm
    return 100.0 * spearman(cosines, gold)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: print the STS-B Spearman x100 of one model and how long it took."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a MiniLM export with output last_hidden_state")
    parser.add_argument("--split", default="test", choices=("train", "dev", "test"))
    parser.add_argument(
        "--shared", type=Path, default=DEFAULT_SHARED, help="the shared/ directory with data/stsb"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    score = evaluate_stsb(args.model, args.split, args.shared)
    seconds = time.perf_counter() - started
    print(f"{args.model}: STS-B {args.split} Spearman x100 = {score:.2f} ({seconds:.1f} s)")


if __name__ == "__main__":
    main()
