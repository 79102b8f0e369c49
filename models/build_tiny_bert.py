"""Build a tiny BERT-shaped encoder (2 layers, hidden 32, 2 heads, FFN 32-128-32) with onnx.helper and numpy.

Why: CI needs a transformer in the exporters' graph forms that builds and runs in milliseconds.
Random weights (seeded). Inputs ``input_ids`` and ``attention_mask`` (int64, ``[batch, sequence]``,
both dynamic); output ``last_hidden_state`` ``[batch, sequence, 32]``. Each layer:
MatMul/Add/Reshape/Transpose attention with a Softmax over masked scores, residual +
LayerNormalization, then the FFN ``MatMul -> Add -> GELU -> MatMul -> Add``, residual + LayerNormalization.
Biases are the second Add operand. ``--gelu`` picks the GELU form:

- ``erf`` (opset 17), as PyTorch's legacy exporter writes it, constants per layer as initializers:
  ``x -> Div(sqrt 2) -> Erf -> Add(1) -> Mul(x, .) -> Mul(., 0.5)``
- ``erf-dynamo`` (opset 17), as the dynamo exporter writes it, one set of constants shared by all layers:
  ``x -> Div(sqrt 2) -> Erf -> Add(1) -> Mul(0.5, .) -> Mul(x, .)``
- ``op`` (opset 20): one ``Gelu`` node.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BUILD_DIR = Path(__file__).resolve().parent / "build"
GELU_FORMS = ("erf", "erf-dynamo", "op")
IR_VERSION = 10  # onnx 1.23 defaults to IR 14, which onnxruntime 1.31 refuses
MASKED_SCORE = -10000.0  # added to the scores of padding positions, as BERT did before float-min masks


@dataclass
class _Graph:
    """Nodes and initializers being collected, with the random generator for weights."""

    rng: np.random.Generator
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)

    def constant(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def weight(self, name: str, shape: tuple[int, ...], scale: float) -> str:
        return self.constant(name, (self.rng.standard_normal(shape) * scale).astype(np.float32))

    def node(self, op_type: str, inputs: Sequence[str], name: str, **attributes: object) -> str:
        """Add a one-output node; its output is named after the node."""
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=name, **attributes))
        return name


def _linear(graph: _Graph, x: str, prefix: str, fan_in: int, fan_out: int) -> str:
    """MatMul with a ``[in, out]`` weight, then Add with the bias as second operand."""
    weight = graph.weight(f"{prefix}.weight", (fan_in, fan_out), 1.0 / np.sqrt(fan_in))
    bias = graph.weight(f"{prefix}.bias", (fan_out,), 0.1)
    product = graph.node("MatMul", [x, weight], f"{prefix}/MatMul")
    return graph.node("Add", [product, bias], f"{prefix}/Add")


def _layer_norm(graph: _Graph, x: str, prefix: str, hidden: int) -> str:
    """LayerNormalization over the hidden axis, with a scale near 1 and a small shift."""
    scale = graph.constant(
        f"{prefix}.weight", (1 + 0.1 * graph.rng.standard_normal(hidden)).astype(np.float32)
    )
    bias = graph.weight(f"{prefix}.bias", (hidden,), 0.1)
    return graph.node("LayerNormalization", [x, scale, bias], f"{prefix}/LayerNorm", axis=-1, epsilon=1e-12)


def _gelu(graph: _Graph, x: str, prefix: str, form: str) -> str:
    """GELU(x) = 0.5 * x * (1 + erf(x / sqrt 2)) in the chosen exporter form."""
    if form == "op":
        return graph.node("Gelu", [x], f"{prefix}/Gelu")
    # The dynamo exporter writes each scalar once and every layer reads it; the legacy one per layer.
    owner = "gelu" if form == "erf-dynamo" else f"{prefix}.gelu"
    existing = {tensor.name for tensor in graph.initializers}
    for suffix, value in (("sqrt2", np.sqrt(2.0)), ("one", 1.0), ("half", 0.5)):
        if f"{owner}.{suffix}" not in existing:
            graph.constant(f"{owner}.{suffix}", np.array(value, dtype=np.float32))
    scaled = graph.node("Div", [x, f"{owner}.sqrt2"], f"{prefix}/Div")
    erf = graph.node("Erf", [scaled], f"{prefix}/Erf")
    one_plus = graph.node("Add", [erf, f"{owner}.one"], f"{prefix}/Add")
    if form == "erf":  # (x * (1 + erf)) * 0.5
        x_times = graph.node("Mul", [x, one_plus], f"{prefix}/Mul")
        return graph.node("Mul", [x_times, f"{owner}.half"], f"{prefix}/Mul_1")
    half_times = graph.node("Mul", [f"{owner}.half", one_plus], f"{prefix}/Mul")  # x * (0.5 * (1 + erf))
    return graph.node("Mul", [x, half_times], f"{prefix}/Mul_1")


def _attention(graph: _Graph, x: str, mask: str, prefix: str, hidden: int, heads: int) -> str:
    """Multi-head self-attention: project, split heads, softmax(QK^T / sqrt(d) + mask) V, merge, project."""
    head_dim = hidden // heads
    split_shape = graph.constant(f"{prefix}.split_shape", np.array([0, 0, heads, head_dim], dtype=np.int64))
    merge_shape = graph.constant(f"{prefix}.merge_shape", np.array([0, 0, hidden], dtype=np.int64))
    scale = graph.constant(f"{prefix}.scale", np.array(np.sqrt(head_dim), dtype=np.float32))

    def heads_of(name: str, perm: list[int]) -> str:
        projected = _linear(graph, x, f"{prefix}.{name}", hidden, hidden)
        split = graph.node("Reshape", [projected, split_shape], f"{prefix}.{name}/Reshape")
        return graph.node("Transpose", [split], f"{prefix}.{name}/Transpose", perm=perm)

    query = heads_of("query", [0, 2, 1, 3])  # [batch, heads, sequence, head_dim]
    key = heads_of("key", [0, 2, 3, 1])  # [batch, heads, head_dim, sequence]
    value = heads_of("value", [0, 2, 1, 3])
    raw_scores = graph.node("MatMul", [query, key], f"{prefix}/MatMul_qk")
    scores = graph.node("Div", [raw_scores, scale], f"{prefix}/Div")
    masked = graph.node("Add", [scores, mask], f"{prefix}/Add_mask")
    probabilities = graph.node("Softmax", [masked], f"{prefix}/Softmax", axis=-1)
    context = graph.node("MatMul", [probabilities, value], f"{prefix}/MatMul_v")
    heads_last = graph.node("Transpose", [context], f"{prefix}/Transpose", perm=[0, 2, 1, 3])
    merged = graph.node("Reshape", [heads_last, merge_shape], f"{prefix}/Reshape")
    return _linear(graph, merged, f"{prefix}.output", hidden, hidden)


def _embeddings(graph: _Graph, vocab: int, hidden: int, max_positions: int) -> str:
    """Word + position embeddings, then LayerNormalization (no token types: one segment only)."""
    words = graph.weight("embeddings.word", (vocab, hidden), 0.5)
    word_vectors = graph.node("Gather", [words, "input_ids"], "embeddings/Gather_word")
    shape = graph.node("Shape", ["input_ids"], "embeddings/Shape")
    one = graph.constant("embeddings.one", np.array(1, dtype=np.int64))
    zero = graph.constant("embeddings.zero", np.array(0, dtype=np.int64))
    sequence_length = graph.node("Gather", [shape, one], "embeddings/Gather_length", axis=0)
    positions = graph.node("Range", [zero, sequence_length, one], "embeddings/Range")
    position_table = graph.weight("embeddings.position", (max_positions, hidden), 0.5)
    position_vectors = graph.node("Gather", [position_table, positions], "embeddings/Gather_position")
    summed = graph.node("Add", [word_vectors, position_vectors], "embeddings/Add")
    return _layer_norm(graph, summed, "embeddings.norm", hidden)


def _additive_mask(graph: _Graph) -> str:
    """Padding mask as a score bias ``[batch, 1, 1, sequence]``: 0 for tokens, MASKED_SCORE for padding."""
    mask_float = graph.node("Cast", ["attention_mask"], "mask/Cast", to=TensorProto.FLOAT)
    one = graph.constant("mask.one", np.array(1.0, dtype=np.float32))
    inverted = graph.node("Sub", [one, mask_float], "mask/Sub")
    masked_score = graph.constant("mask.value", np.array(MASKED_SCORE, dtype=np.float32))
    bias = graph.node("Mul", [inverted, masked_score], "mask/Mul")
    axes = graph.constant("mask.axes", np.array([1, 2], dtype=np.int64))
    return graph.node("Unsqueeze", [bias, axes], "mask/Unsqueeze")


def _encoder_layer(
    graph: _Graph, x: str, mask: str, prefix: str, hidden: int, heads: int, ffn: int, gelu: str
) -> str:
    """Attention and FFN blocks, each followed by residual Add + LayerNormalization (post-norm, as BERT)."""
    attended = _attention(graph, x, mask, f"{prefix}.attention", hidden, heads)
    residual = graph.node("Add", [attended, x], f"{prefix}.attention/Add_residual")
    x = _layer_norm(graph, residual, f"{prefix}.attention.norm", hidden)
    expanded = _linear(graph, x, f"{prefix}.intermediate", hidden, ffn)
    activated = _gelu(graph, expanded, f"{prefix}.intermediate.gelu", gelu)
    projected = _linear(graph, activated, f"{prefix}.output", ffn, hidden)
    residual = graph.node("Add", [projected, x], f"{prefix}.output/Add_residual")
    return _layer_norm(graph, residual, f"{prefix}.output.norm", hidden)


def build(
    gelu: str = "erf",
    seed: int = 0,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 2,
    ffn: int = 128,
    vocab: int = 1000,
    max_positions: int = 64,
) -> onnx.ModelProto:
    """Return the encoder; ``gelu`` is one of ``GELU_FORMS``; sequences up to ``max_positions`` long."""
    if gelu not in GELU_FORMS:
        raise ValueError(f"gelu must be one of {GELU_FORMS}, not {gelu!r}")
    graph = _Graph(np.random.default_rng(seed))
    x = _embeddings(graph, vocab, hidden, max_positions)
    mask = _additive_mask(graph)
    for index in range(layers):
        x = _encoder_layer(graph, x, mask, f"layer{index}", hidden, heads, ffn, gelu)
    graph.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="output/Identity"))

    onnx_graph = helper.make_graph(
        graph.nodes,
        f"tiny_bert_{gelu.replace('-', '_')}",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
        ],
        [
            helper.make_tensor_value_info(
                "last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", hidden]
            )
        ],
        graph.initializers,
    )
    opset = 20 if gelu == "op" else 17
    model = helper.make_model(
        onnx_graph,
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=IR_VERSION,
        producer_name="onnxcoreset.models",
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: write one tiny BERT with the chosen GELU form."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gelu", choices=GELU_FORMS, default="erf")
    parser.add_argument(
        "--out", type=Path, default=None, help="default: models/build/tiny_bert_gelu_<form>.onnx"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = args.out or BUILD_DIR / f"tiny_bert_gelu_{args.gelu.replace('-', '_')}.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(build(args.gelu, args.seed), out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
