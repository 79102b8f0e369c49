"""Build a LeNet-300-100-shaped MLP (784-300-100-10) as ONNX with random He-initialised weights.

Why: tests and the README demo need a realistic fully connected model that builds in
milliseconds without torch. The graph is the form PyTorch's legacy exporter writes for
``nn.Linear``: ``Gemm(transB=1)`` with weight ``[out, in]``, followed by ``Relu``.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DEFAULT_OUT = Path(__file__).resolve().parent / "build" / "mlp_784_300_100_10.onnx"
LAYER_SIZES = (784, 300, 100, 10)
IR_VERSION = 10  # onnx 1.23 defaults to IR 14, which onnxruntime 1.31 refuses
OPSET = 17


def build(seed: int = 0, layer_sizes: Sequence[int] = LAYER_SIZES) -> onnx.ModelProto:
    """Return the MLP: Gemm(transB=1)+Relu per hidden layer, a plain Gemm for the logits."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    current = "input"
    last = len(layer_sizes) - 2
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(layer_sizes)):
        # He initialisation keeps ReLU activations at a similar scale layer after layer.
        weight = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(fan_out, fan_in)).astype(np.float32)
        bias = rng.normal(0.0, 0.05, size=fan_out).astype(np.float32)
        weight_name, bias_name = f"fc{index + 1}.weight", f"fc{index + 1}.bias"
        initializers += [
            numpy_helper.from_array(weight, weight_name),
            numpy_helper.from_array(bias, bias_name),
        ]
        gemm_out = "logits" if index == last else f"fc{index + 1}_out"
        nodes.append(
            helper.make_node(
                "Gemm", [current, weight_name, bias_name], [gemm_out], name=f"fc{index + 1}", transB=1
            )
        )
        current = gemm_out
        if index != last:
            relu_out = f"relu{index + 1}_out"
            nodes.append(helper.make_node("Relu", [current], [relu_out], name=f"relu{index + 1}"))
            current = relu_out
    graph = helper.make_graph(
        nodes,
        "mlp_" + "_".join(str(size) for size in layer_sizes),
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", layer_sizes[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", layer_sizes[-1]])],
        initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="onnxcoreset.models",
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: write the MLP to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the .onnx file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(build(args.seed), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
