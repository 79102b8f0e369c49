"""Train LeNet-300-100 (784-300-100-10, ReLU) on 5k MNIST images; export it with both torch exporters.

Why: tests and benchmarks need a trained fully connected model whose accuracy drop under
pruning means something, in the two graph forms PyTorch writes for ``nn.Linear``:
the legacy exporter (``Gemm(transB=1)``) and the dynamo exporter (needs ``pip install onnxscript``).

Inputs are pixels scaled to [0, 1] (``x / 255``), nothing else. Training uses random
shifts of up to 2 pixels, since 5,000 images alone leave the MLP at ~94.5%; with them it
reaches ~97% on the official test set in well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from mnist_data import DEFAULT_SHARED, load_mnist_test, load_mnist_train_5k

BUILD_DIR = Path(__file__).resolve().parent / "build"
LEGACY_NAME = "lenet300_mnist.onnx"
DYNAMO_NAME = "lenet300_mnist_dynamo.onnx"
METRICS_NAME = "lenet300_mnist.json"
OPSET = 17
ORT_MAX_IR = 10  # the newest IR version onnxruntime 1.31 loads
BATCH_SIZE = 64
MAX_SHIFT = 2


def lenet300() -> torch.nn.Sequential:
    """LeNet-300-100: two ReLU hidden layers of 300 and 100 neurons, 10 logits."""
    return torch.nn.Sequential(
        torch.nn.Linear(784, 300),
        torch.nn.ReLU(),
        torch.nn.Linear(300, 100),
        torch.nn.ReLU(),
        torch.nn.Linear(100, 10),
    )


def random_shift(
    images: torch.Tensor, generator: torch.Generator, max_shift: int = MAX_SHIFT
) -> torch.Tensor:
    """Translate each flat 28x28 image by up to ``max_shift`` pixels each way (zero fill)."""
    count = len(images)
    padded = torch.nn.functional.pad(images.view(count, 28, 28), (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (count,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (count,), generator=generator)
    rows = (dy[:, None] + torch.arange(28))[:, :, None]
    cols = (dx[:, None] + torch.arange(28))[:, None, :]
    return padded[torch.arange(count)[:, None, None], rows, cols].reshape(count, 784)


def train(epochs: int, seed: int) -> torch.nn.Sequential:
    """Train with Adam under a one-cycle learning-rate schedule; returns the model in eval mode."""
    # One thread: the matrices are small, and on a busy 2-core machine torch's second thread
    # made training ~9x slower (spin-waiting), not faster. It also pins the summation order.
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = load_mnist_train_5k()
    inputs, targets = torch.from_numpy(images / 255.0).float(), torch.from_numpy(labels)
    model = lenet300()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps_per_epoch = (len(inputs) + BATCH_SIZE - 1) // BATCH_SIZE
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=2e-3, total_steps=epochs * steps_per_epoch
    )
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(inputs), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(
                model(random_shift(inputs[batch], generator)), targets[batch]
            )
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def export_legacy(model: torch.nn.Module, path: Path) -> None:
    """TorchScript-based exporter: opset 17, dynamic batch axis."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # we want the legacy form on purpose
        torch.onnx.export(
            model,
            (torch.zeros(1, 784),),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )


def export_dynamo(model: torch.nn.Module, path: Path) -> None:
    """torch.export-based exporter (requires onnxscript) at its default opset; batch dimension dynamic."""
    program = torch.onnx.export(
        model,
        (torch.zeros(2, 784),),
        dynamo=True,
        verbose=False,
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    program.save(str(path))
    proto = onnx.load(path)
    if proto.ir_version > ORT_MAX_IR:
        # onnxruntime 1.31 refuses newer IR versions; the graph uses nothing newer than IR 10.
        print(
            f"{path.name}: exporter wrote IR {proto.ir_version}, onnxruntime needs <= {ORT_MAX_IR}: rewriting"
        )
        proto.ir_version = ORT_MAX_IR
        onnx.save(proto, path)


def onnx_accuracy(path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    """Test accuracy of an exported model through onnxruntime (CPU); images already scaled to [0, 1]."""
    onnx.checker.check_model(onnx.load(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": images})[0]
    return float((logits.argmax(axis=1) == labels).mean())


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: train, export both forms, measure torch and onnxruntime accuracy, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out-dir", type=Path, default=BUILD_DIR, help="directory for the .onnx and .json files"
    )
    parser.add_argument(
        "--shared", type=Path, default=DEFAULT_SHARED, help="the shared/ directory with data/mnist"
    )
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    model = train(args.epochs, args.seed)
    train_seconds = time.perf_counter() - started
    test_images, test_labels = load_mnist_test(args.shared)
    test_inputs = (test_images / 255.0).astype(np.float32)
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(test_inputs)).numpy()
    metrics: dict[str, object] = {
        "epochs": args.epochs,
        "seed": args.seed,
        "train_images": 5000,
        "input_scaling": "x / 255",
        "torch_test_accuracy": float((torch_logits.argmax(axis=1) == test_labels).mean()),
    }
    print(f"torch test accuracy: {metrics['torch_test_accuracy']:.4f} (trained in {train_seconds:.1f} s)")

    for name, export, key in (
        (LEGACY_NAME, export_legacy, "onnx_test_accuracy"),
        (DYNAMO_NAME, export_dynamo, "onnx_dynamo_test_accuracy"),
    ):
        path = args.out_dir / name
        export(model, path)
        metrics[key] = onnx_accuracy(path, test_inputs, test_labels)
        proto = onnx.load(path)
        opset = next(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))
        print(
            f"wrote {path} (IR {proto.ir_version}, opset {opset}); "
            f"onnxruntime test accuracy: {metrics[key]:.4f}"
        )

    metrics_path = args.out_dir / METRICS_NAME
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"wrote {metrics_path}")


if __name__ == "__main__":
    main()
