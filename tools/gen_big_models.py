"""Generate large benchmark models with random weights, streaming their bytes to disk.

Two families, opset 17 and IR 10, both with a free batch axis ``N``:

* ``vgg_head``: VGG-16's classifier head as PyTorch exports it,
  Gemm(25088→4096, transB=1) → Relu → Gemm(4096→4096) → Relu → Gemm(4096→1000), one file (494 MB);
  smaller widths for quick runs.
* ``ffn_stack``: transformer FFN blocks with a residual stream,
  x ← x + (Relu(x·W1 + b1)·W2 + b2), W1: d×h, W2: h×d, as MatMul + Add; external data.

Weights are N(0, 1/fan_in) in float32. Every tensor is generated and written one at a time, so
generating a 6.4 GB model needs about one tensor of memory, not the model. A JSON file beside
each model records its spec; an existing model with the same spec is reused.

    python tools/gen_big_models.py --out /tmp/onnxcoreset-bench/models ffn_4096x6
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

OPSET = 17
IR_VERSION = 10
_ALIGN = 64


@dataclass(frozen=True)
class ModelSpec:
    """One benchmark model: its family, sizes and storage."""

    name: str
    family: str  # "vgg_head" or "ffn_stack"
    width: int  # input features (d)
    hidden: int  # hidden neurons per block (h)
    blocks: int  # FFN blocks (ffn_stack only)
    external: bool
    classes: int = 1000  # vgg_head only
    seed: int = 0

    @property
    def params(self) -> int:
        if self.family == "vgg_head":
            d, h, c = self.width, self.hidden, self.classes
            return d * h + h + h * h + h + h * c + c
        return self.blocks * (2 * self.width * self.hidden + self.hidden + self.width)

    @property
    def nbytes(self) -> int:
        return 4 * self.params

    def matmul_flops(self, keep: float) -> float:
        """Multiply-adds per sample with every hidden layer kept at ``keep`` (rounded like the tool)."""
        if self.family == "vgg_head":
            k = int(np.floor(keep * self.hidden + 0.5))
            return self.width * k + k * k + k * self.classes
        k = int(np.floor(keep * self.hidden + 0.5))
        return self.blocks * 2 * self.width * k


SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("vgg16_head", "vgg_head", 25088, 4096, 1, external=False),
        ModelSpec("ffn_1024x24", "ffn_stack", 1024, 4096, 24, external=True),
        ModelSpec("ffn_4096x6", "ffn_stack", 4096, 16384, 6, external=True),
        ModelSpec("ffn_4096x12", "ffn_stack", 4096, 16384, 12, external=True),
        # scaling series: the same 1024-4096 block, repeated
        ModelSpec("ffn_1024x3", "ffn_stack", 1024, 4096, 3, external=True),
        ModelSpec("ffn_1024x15", "ffn_stack", 1024, 4096, 15, external=True),
        ModelSpec("ffn_1024x30", "ffn_stack", 1024, 4096, 30, external=True),
        ModelSpec("ffn_1024x90", "ffn_stack", 1024, 4096, 90, external=True),
        # small models for --quick
        ModelSpec("quick_vgg_head", "vgg_head", 4096, 1024, 1, external=False, classes=100),
        ModelSpec("quick_ffn_256x4", "ffn_stack", 256, 1024, 4, external=True),
        ModelSpec("quick_ffn_512x8", "ffn_stack", 512, 2048, 8, external=True),
    )
}


class _TensorWriter:
    """Appends tensors to an external-data file (64-byte aligned) or keeps them inline."""

    def __init__(self, data_path: Path | None) -> None:
        self.data_path = data_path
        self.handle = open(data_path, "wb") if data_path else None  # noqa: SIM115 (closed by close(), after every tensor)
        self.offset = 0

    def tensor(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array, dtype=np.float32)
        proto = TensorProto()
        proto.name = name
        proto.data_type = TensorProto.FLOAT
        proto.dims.extend(array.shape)
        if self.handle is None:
            proto.raw_data = array.tobytes()
            return proto
        pad = (-self.offset) % _ALIGN
        self.handle.write(b"\0" * pad)
        self.offset += pad
        self.handle.write(memoryview(array).cast("B"))
        for key, value in (("location", self.data_path.name), ("offset", str(self.offset)), ("length", str(array.nbytes))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        proto.data_location = TensorProto.EXTERNAL
        self.offset += array.nbytes
        return proto

    def close(self) -> None:
        if self.handle:
            self.handle.close()


def _random(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    array = rng.standard_normal(shape, dtype=np.float32)
    array *= np.float32(1.0 / np.sqrt(fan_in))
    return array


def _vgg_head(spec: ModelSpec, writer: _TensorWriter, rng: np.random.Generator):
    sizes = [spec.width, spec.hidden, spec.hidden, spec.classes]
    nodes, inits = [], []
    current = "input"
    for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        w, b = f"classifier.{3 * layer}.weight", f"classifier.{3 * layer}.bias"
        inits.append(writer.tensor(w, _random(rng, (fan_out, fan_in), fan_in)))  # PyTorch layout [out, in]
        inits.append(writer.tensor(b, _random(rng, (fan_out,), fan_in)))
        out = f"fc{layer}" if layer < 2 else "logits"
        nodes.append(helper.make_node("Gemm", ["input" if layer == 0 else current, w, b], [out], name=f"Gemm_{layer}", transB=1))
        current = out
        if layer < 2:
            nodes.append(helper.make_node("Relu", [out], [f"relu{layer}"], name=f"Relu_{layer}"))
            current = f"relu{layer}"
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", spec.width])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", spec.classes])]
    return nodes, inits, inputs, outputs


def _ffn_stack(spec: ModelSpec, writer: _TensorWriter, rng: np.random.Generator):
    d, h = spec.width, spec.hidden
    nodes, inits = [], []
    x = "input"
    for block in range(spec.blocks):
        p = f"layers.{block}.ffn"
        names = {k: f"{p}.{k}" for k in ("w1", "b1", "w2", "b2")}
        inits.append(writer.tensor(names["w1"], _random(rng, (d, h), d)))
        inits.append(writer.tensor(names["b1"], _random(rng, (h,), d)))
        inits.append(writer.tensor(names["w2"], _random(rng, (h, d), h)))
        inits.append(writer.tensor(names["b2"], _random(rng, (d,), h)))
        t = [f"{p}/{s}" for s in ("mm1", "add1", "relu", "mm2", "add2")]
        nodes += [
            helper.make_node("MatMul", [x, names["w1"]], [t[0]], name=f"{p}/MatMul1"),
            helper.make_node("Add", [t[0], names["b1"]], [t[1]], name=f"{p}/Add1"),
            helper.make_node("Relu", [t[1]], [t[2]], name=f"{p}/Relu"),
            helper.make_node("MatMul", [t[2], names["w2"]], [t[3]], name=f"{p}/MatMul2"),
            helper.make_node("Add", [t[3], names["b2"]], [t[4]], name=f"{p}/Add2"),
        ]
        out = "output" if block == spec.blocks - 1 else f"layers.{block}/residual"
        nodes.append(helper.make_node("Add", [x, t[4]], [out], name=f"{p}/Residual"))
        x = out
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", d])]
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", d])]
    return nodes, inits, inputs, outputs


def model_path(spec: ModelSpec, folder: Path) -> Path:
    return folder / spec.name / f"{spec.name}.onnx"


def generate(spec: ModelSpec, folder: Path, *, force: bool = False) -> Path:
    """Write ``spec``'s model under ``folder/<name>/`` (reusing an identical one) and return its path."""
    path = model_path(spec, folder)
    stamp = path.with_suffix(".json")
    if not force and path.exists() and stamp.exists() and json.loads(stamp.read_text()) == asdict(spec):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in path.parent.iterdir():
        old.unlink()
    writer = _TensorWriter(path.with_name(path.name + ".data") if spec.external else None)
    rng = np.random.default_rng(spec.seed)
    try:
        build = _vgg_head if spec.family == "vgg_head" else _ffn_stack
        nodes, inits, inputs, outputs = build(spec, writer, rng)
    finally:
        writer.close()
    graph = helper.make_graph(nodes, spec.name, inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="onnxcoreset-bench")
    path.write_bytes(model.SerializeToString())
    stamp.write_text(json.dumps(asdict(spec)))
    return path


def files_of(path: Path) -> list[Path]:
    """The model file and its external-data files."""
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(path.name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", default=["vgg16_head", "ffn_1024x24", "ffn_4096x6"], choices=list(SPECS))
    parser.add_argument("--out", type=Path, default=Path("/tmp/onnxcoreset-bench/models"))
    parser.add_argument("--force", action="store_true", help="Regenerate even if an identical model exists.")
    args = parser.parse_args(argv)
    for name in args.names:
        path = generate(SPECS[name], args.out, force=args.force)
        size = sum(p.stat().st_size for p in files_of(path))
        print(f"{name}: {path} ({size / 1e9:.3f} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
