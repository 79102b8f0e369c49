"""Build an MLP in the graph form tf2onnx writes for a Keras Dense model (MatMul + Add + Relu, Softmax).

This does NOT run tensorflow or tf2onnx (neither is installed); it mimics their output with
onnx.helper so the pruner is exercised on that form: ``MatMul(x, W[in, out])`` with ``W`` an
initializer, then ``Add(x, b)`` with the bias as the second operand (tf2onnx's order), ``Relu``,
and a final ``Softmax``. The input is ``dense_input`` with tf2onnx's symbolic batch name
``unk__0``. IR 8 / opset 13 are tf2onnx's common choices, so IR and opset preservation are
exercised too. ``--bias-first`` writes ``Add(b, x)`` instead, to test operand-order handling.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BUILD_DIR = Path(__file__).resolve().parent / "build"
LAYER_SIZES = (784, 256, 128, 10)
IR_VERSION = 8
OPSET = 13


def build(
    seed: int = 0, bias_first: bool = False, layer_sizes: Sequence[int] = LAYER_SIZES
) -> onnx.ModelProto:
    """Return the Keras-style MLP; ``bias_first`` puts the bias as the first Add operand."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    current = "dense_input"
    last = len(layer_sizes) - 2
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(layer_sizes)):
        # Keras names Dense layers dense, dense_1, ...; tf2onnx keeps them in the tensor names.
        layer = "dense" if index == 0 else f"dense_{index}"
        # Glorot uniform is Keras' default kernel initializer.
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        kernel = rng.uniform(-limit, limit, size=(fan_in, fan_out)).astype(np.float32)
        bias = rng.normal(0.0, 0.05, size=fan_out).astype(np.float32)
        kernel_name = f"sequential/{layer}/MatMul/ReadVariableOp:0"
        bias_name = f"sequential/{layer}/BiasAdd/ReadVariableOp:0"
        initializers += [
            numpy_helper.from_array(kernel, kernel_name),
            numpy_helper.from_array(bias, bias_name),
        ]
        matmul_out, add_out = f"sequential/{layer}/MatMul:0", f"sequential/{layer}/BiasAdd:0"
        nodes.append(
            helper.make_node(
                "MatMul", [current, kernel_name], [matmul_out], name=f"sequential/{layer}/MatMul"
            )
        )
        add_inputs = [bias_name, matmul_out] if bias_first else [matmul_out, bias_name]
        nodes.append(helper.make_node("Add", add_inputs, [add_out], name=f"sequential/{layer}/BiasAdd"))
        if index == last:
            nodes.append(
                helper.make_node("Softmax", [add_out], [layer], name=f"sequential/{layer}/Softmax", axis=-1)
            )
        else:
            relu_out = f"sequential/{layer}/Relu:0"
            nodes.append(helper.make_node("Relu", [add_out], [relu_out], name=f"sequential/{layer}/Relu"))
            current = relu_out
    output_name = "dense" if last == 0 else f"dense_{last}"
    graph = helper.make_graph(
        nodes,
        "tf2onnx",
        [helper.make_tensor_value_info("dense_input", TensorProto.FLOAT, ["unk__0", layer_sizes[0]])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["unk__0", layer_sizes[-1]])],
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
    """CLI: write the bias-second (tf2onnx order) and bias-first variants to ``--out-dir``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=BUILD_DIR, help="directory for the .onnx files")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for bias_first, file_name in ((False, "keras_style_mlp.onnx"), (True, "keras_style_mlp_bias_first.onnx")):
        path = args.out_dir / file_name
        onnx.save(build(args.seed, bias_first=bias_first), path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
