"""Mutation fuzzer for the command line: every mutant of a valid model must end cleanly.

Seeds are valid models of every supported form (tests/builders.py's CHAIN_FORMS, a few edge
forms defined here, and the MNIST models in ../shared when present). Each mutant flips bytes,
truncates, deletes protobuf fields, changes dims and dtypes, rewires node inputs, reorders
nodes or corrupts external-data references, and then ``prune`` and ``inspect`` run on it
in-process through click's CliRunner. A run passes when it

* ends within the time limit with exit code 0, 1 or 2 (never 3, never an exception);
* prints exactly one line on stderr when it fails, and nothing there when it succeeds;
* leaves the input model and its external data byte-for-byte unchanged;
* leaves no output on failure and no temporary file ever.

Outcomes are counted by command, exit code and message (paths, names and numbers elided).

    python tools/fuzz.py --mutants 5000            # 2 worker processes; prints the outcome table
    python tools/fuzz.py --mutants 200 --in-process  # no workers (what tests/test_fuzz.py does)

Workers are subprocesses so that a hang or a crash inside a native library is caught too:
a mutant that outlives ``--timeout`` or kills its worker is reported as a violation.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
SHARED_MODELS = REPO.parent / "shared" / "models"
sys.path.insert(0, str(REPO / "tests"))

from builders import CHAIN_FORMS, float_input, init, model, weights

MODEL_NAME = "model.onnx"
OUTPUT_NAME = "out.onnx"
DEFAULT_TIMEOUT_S = 60.0
SLOW_TIMEOUT_S = 300.0  # the real MNIST models: their certificates and attacks alone take a minute
SLOW_EVERY = 50  # one mutant in this many starts from a slow seed


# --- seeds ----------------------------------------------------------------------------------


@dataclass
class Seed:
    """A valid model to mutate; ``external`` seeds keep every weight in MODEL_NAME + '.data'."""

    name: str
    model: onnx.ModelProto
    external: bool = False
    slow: bool = False  # a real model: mutated less often, with a longer time limit


def _constant_weights(rng: np.random.Generator) -> onnx.ModelProto:
    """MatMul weights produced by Constant nodes instead of initializers."""
    d, n, k = 6, 10, 3
    nodes = [
        helper.make_node("Constant", [], ["W1"], value=numpy_helper.from_array(weights(rng, d, n), "W1c")),
        helper.make_node("Constant", [], ["W2"], value=numpy_helper.from_array(weights(rng, n, k), "W2c")),
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("Tanh", ["h"], ["a"], name="tanh"),
        helper.make_node("MatMul", ["a", "W2"], ["y"], name="mm2"),
    ]
    return model(nodes, [float_input("x", ["batch", d])], [float_input("y", ["batch", k])], [])


def _if_subgraph(rng: np.random.Generator) -> onnx.ModelProto:
    """A prunable chain, then an If whose branches read an outer-scope weight."""
    d, n, k = 6, 8, 4
    branch_out = [float_input("z", ["batch", k])]
    then_graph = helper.make_graph([helper.make_node("MatMul", ["y", "U"], ["z"])], "then", [], branch_out)
    else_graph = helper.make_graph([helper.make_node("Identity", ["y"], ["z"])], "else", [], branch_out)
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["a"], name="relu"),
        helper.make_node("Gemm", ["a", "W2"], ["y"], name="fc2", transB=1),
        helper.make_node("If", ["cond"], ["out"], name="branch", then_branch=then_graph, else_branch=else_graph),
    ]
    inits = [
        init("W1", weights(rng, d, n).T.copy()),
        init("b1", rng.standard_normal(n).astype(np.float32)),
        init("W2", weights(rng, n, k).T.copy()),
        init("U", weights(rng, k, k)),
    ]
    inputs = [float_input("x", ["batch", d]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])]
    return model(nodes, inputs, [float_input("out", ["batch", k])], inits)


def _three_layers(rng: np.random.Generator) -> onnx.ModelProto:
    """Two chains in a row (the second's input is the first's pruned output)."""
    sizes = [5, 9, 7, 2]
    nodes, inits, current = [], [], "x"
    for i in range(3):
        nodes.append(helper.make_node("Gemm", [current, f"W{i}", f"b{i}"], [f"g{i}"], name=f"fc{i}", transB=1))
        inits += [init(f"W{i}", weights(rng, sizes[i], sizes[i + 1]).T.copy()), init(f"b{i}", np.full(sizes[i + 1], 0.1, np.float32))]
        current = f"g{i}"
        if i < 2:
            nodes.append(helper.make_node("Sigmoid", [current], [f"s{i}"], name=f"act{i}"))
            current = f"s{i}"
    return model(nodes, [float_input("x", ["batch", 5])], [float_input(current, ["batch", 2])], inits)


def seeds(include_shared: bool = True) -> list[Seed]:
    """Every seed model, built deterministically."""
    found = [Seed(f"form:{name}", CHAIN_FORMS[name](np.random.default_rng(7)).model) for name in sorted(CHAIN_FORMS)]
    rng = np.random.default_rng(11)
    found += [
        Seed("constant_weights", _constant_weights(rng)),
        Seed("if_subgraph", _if_subgraph(rng)),
        Seed("three_layers", _three_layers(rng)),
        Seed("external_data", _three_layers(rng), external=True),
    ]
    unsorted = onnx.ModelProto()
    unsorted.CopyFrom(found[0].model)
    reversed_nodes = list(unsorted.graph.node)[::-1]
    unsorted.graph.ClearField("node")
    unsorted.graph.node.extend(reversed_nodes)
    found.append(Seed("unsorted_nodes", unsorted))
    if include_shared and SHARED_MODELS.is_dir():
        for path in sorted(SHARED_MODELS.glob("*.onnx")):
            if path.stat().st_size < (4 << 20):
                found.append(Seed(f"shared:{path.name}", onnx.load(str(path)), slow=True))
    return found


def pick_seed(all_seeds: list[Seed], index: int) -> Seed:
    """Mutant ``index``'s seed: the small forms in turn, a slow seed once every SLOW_EVERY mutants."""
    fast = [s for s in all_seeds if not s.slow]
    slow = [s for s in all_seeds if s.slow]
    if slow and index % SLOW_EVERY == SLOW_EVERY - 1:
        return slow[(index // SLOW_EVERY) % len(slow)]
    return fast[index % len(fast)]


def write_seed(seed: Seed, folder: Path) -> None:
    """The seed as files in ``folder``: MODEL_NAME, plus MODEL_NAME.data for external seeds."""
    if not seed.external:
        (folder / MODEL_NAME).write_bytes(seed.model.SerializeToString())
        return
    copy = onnx.ModelProto()
    copy.CopyFrom(seed.model)
    onnx.save_model(copy, str(folder / MODEL_NAME), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=MODEL_NAME + ".data", size_threshold=0)


# --- mutations ------------------------------------------------------------------------------

Mutation = Callable[[np.random.Generator, Path], str]  # mutates the files in a folder, returns a label


def _repeated(descriptor) -> bool:
    flag = getattr(descriptor, "is_repeated", None)  # protobuf >= 5.28; ``label`` is gone in 7
    return bool(flag) if flag is not None else descriptor.label == descriptor.LABEL_REPEATED


def _all_messages(message, path: str = "") -> Iterator[tuple[object, str]]:
    yield message, path
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None:
            continue
        if _repeated(descriptor):
            for i, item in enumerate(value):
                yield from _all_messages(item, f"{path}.{descriptor.name}[{i}]")
        else:
            yield from _all_messages(value, f"{path}.{descriptor.name}")


def _tensors(m: onnx.ModelProto) -> list[TensorProto]:
    return [msg for msg, _ in _all_messages(m) if isinstance(msg, TensorProto)]


def _names(m: onnx.ModelProto) -> list[str]:
    names = {i.name for i in m.graph.input} | {t.name for t in m.graph.initializer}
    for node in m.graph.node:
        names.update(node.output)
    return sorted(n for n in names if n and isinstance(n, str))  # bytes: a name that is not UTF-8


def _flip_bytes(rng: np.random.Generator, data: bytes) -> bytes:
    array = bytearray(data)
    for _ in range(int(rng.integers(1, 9))):
        array[int(rng.integers(len(array)))] ^= int(rng.integers(1, 256))
    return bytes(array)


def _splice(rng: np.random.Generator, data: bytes) -> bytes:
    a, b = sorted(int(x) for x in rng.integers(0, len(data) + 1, 2))
    choice = int(rng.integers(3))
    if choice == 0:
        return data[:a] + data[b:]  # delete a range
    if choice == 1:
        return data[:b] + data[a:b] + data[b:]  # duplicate a range
    return data[:a] + rng.bytes(int(rng.integers(1, 32))) + data[a:]  # insert noise


def _delete_field(rng: np.random.Generator, m: onnx.ModelProto) -> str:
    candidates = []
    for message, path in _all_messages(m):
        for descriptor, value in message.ListFields():
            if _repeated(descriptor):
                candidates += [(message, descriptor.name, i, f"{path}.{descriptor.name}[{i}]") for i in range(len(value))]
            else:
                candidates.append((message, descriptor.name, None, f"{path}.{descriptor.name}"))
    message, name, index, path = candidates[int(rng.integers(len(candidates)))]
    if index is None:
        message.ClearField(name)
    else:
        del getattr(message, name)[index]
    return f"delete {re.sub(r'[0-9]+', 'N', path)}"


_ODD_DIMS = [0, 1, 2, 3, -1, 2**31, 2**40, 10**12]


def _change_dims(rng: np.random.Generator, m: onnx.ModelProto) -> str:
    if rng.random() < 0.6:
        tensors = [t for t in _tensors(m) if len(t.dims)]
        if tensors:
            tensor = tensors[int(rng.integers(len(tensors)))]
            axis = int(rng.integers(len(tensor.dims)))
            old = tensor.dims[axis]
            tensor.dims[axis] = int(rng.choice(_ODD_DIMS + [old + 1, max(old - 1, 0), 2 * old]))
            if rng.random() < 0.3:
                tensor.dims.append(1)
            return "tensor dims"
    infos = list(m.graph.input) + list(m.graph.output) + list(m.graph.value_info)
    infos = [i for i in infos if i.type.tensor_type.shape.dim]
    if not infos:
        return "no dims"
    dims = infos[int(rng.integers(len(infos)))].type.tensor_type.shape.dim
    dim = dims[int(rng.integers(len(dims)))]
    if rng.random() < 0.3:
        dim.dim_param = "N"
    else:
        dim.dim_value = int(rng.choice(_ODD_DIMS))
    return "value_info dims"


def _change_dtype(rng: np.random.Generator, m: onnx.ModelProto) -> str:
    types = list(TensorProto.DataType.values()) + [99, -3]
    if rng.random() < 0.6:
        tensors = _tensors(m)
        if tensors:
            tensors[int(rng.integers(len(tensors)))].data_type = int(rng.choice(types))
            return "tensor dtype"
    infos = [i for i in list(m.graph.input) + list(m.graph.output) + list(m.graph.value_info) if i.type.HasField("tensor_type")]
    if not infos:
        return "no dtype"
    infos[int(rng.integers(len(infos)))].type.tensor_type.elem_type = int(rng.choice(types))
    return "value_info dtype"


def _rewire(rng: np.random.Generator, m: onnx.ModelProto) -> str:
    nodes = [n for n in m.graph.node if n.input]
    if not nodes:
        return "no inputs"
    node = nodes[int(rng.integers(len(nodes)))]
    index = int(rng.integers(len(node.input)))
    names = _names(m)
    choice = rng.random()
    if choice < 0.7:
        node.input[index] = names[int(rng.integers(len(names)))]
    elif choice < 0.85:
        node.input[index] = ""
    elif choice < 0.95:
        node.input[index] = "no_such_tensor"
    else:
        node.output[0] = names[int(rng.integers(len(names)))]  # two producers, or a cycle
    return "rewire"


def _node_surgery(rng: np.random.Generator, m: onnx.ModelProto) -> str:
    nodes = m.graph.node
    if not nodes:
        return "no nodes"
    index = int(rng.integers(len(nodes)))
    choice = int(rng.integers(6))
    if choice == 0:
        order = list(nodes)
        rng.shuffle(order)
        copies = [onnx.NodeProto() for _ in order]
        for copy, node in zip(copies, order):
            copy.CopyFrom(node)
        m.graph.ClearField("node")
        m.graph.node.extend(copies)
        return "shuffle nodes"
    if choice == 1:
        del nodes[index]
        return "remove node"
    if choice == 2:
        nodes.add().CopyFrom(nodes[index])
        return "duplicate node"
    if choice == 3:
        ops = ["Relu", "Gemm", "MatMul", "Add", "Mul", "Transpose", "Identity", "Gelu", "If", "Loop", "Softmax",
               "QLinearMatMul", "MatMulInteger", "DequantizeLinear", "Conv", "Reshape", "NoSuchOp"]
        nodes[index].op_type = str(rng.choice(ops))
        return "change op"
    if choice == 4:
        nodes[index].domain = str(rng.choice(["com.microsoft", "ai.onnx", "custom", "ai.onnx.ml"]))
        return "change domain"
    node = nodes[index]
    if node.attribute and rng.random() < 0.7:
        attr = node.attribute[int(rng.integers(len(node.attribute)))]
        if attr.type == onnx.AttributeProto.INT:
            attr.i = int(rng.choice([0, 1, -1, 2, 7, 2**40]))
        elif attr.type == onnx.AttributeProto.FLOAT:
            attr.f = float(rng.choice([0.0, -1.0, np.nan, np.inf, 1e30]))
        elif attr.type == onnx.AttributeProto.INTS:
            attr.ints[:] = [int(x) for x in rng.integers(-2, 4, len(attr.ints) + int(rng.integers(-1, 2)))]
        else:
            attr.type = int(rng.choice(list(onnx.AttributeProto.AttributeType.values())))
        return "change attribute"
    node.attribute.append(helper.make_attribute(str(rng.choice(["transB", "transA", "alpha", "axis", "perm"])),
                                                int(rng.integers(0, 3))))
    return "add attribute"


def _weights_values(rng: np.random.Generator, m: onnx.ModelProto) -> str:
    tensors = [t for t in _tensors(m) if t.data_type == TensorProto.FLOAT and t.HasField("raw_data")
               and t.raw_data and len(t.raw_data) % 4 == 0]
    if not tensors:
        return "no float weights"
    tensor = tensors[int(rng.integers(len(tensors)))]
    values = np.frombuffer(tensor.raw_data, dtype="<f4").copy()
    choice = int(rng.integers(4))
    if choice == 0:
        values[int(rng.integers(values.size))] = rng.choice([np.nan, np.inf, -np.inf])
    elif choice == 1:
        values[:] = 0
    elif choice == 2:
        values *= np.float32(rng.choice([1e30, 1e-30, -1]))
    else:
        tensor.raw_data = tensor.raw_data[: int(rng.integers(len(tensor.raw_data)))]
        return "truncate raw_data"
    tensor.raw_data = values.tobytes()
    return "weight values"


_LOCATIONS = ["../escape.bin", "/etc/hostname", "sub/../../x", "", "C:\\w.bin", "..\\w.bin", "a\x00b", ".",
              "missing.bin", "\\\\server\\share\\w", "model.onnx", MODEL_NAME + ".data"]


def _external_refs(rng: np.random.Generator, m: onnx.ModelProto) -> str:
    tensors = [t for t in _tensors(m) if t.external_data]
    if not tensors:
        tensor = _tensors(m)[int(rng.integers(len(_tensors(m))))] if _tensors(m) else None
        if tensor is None:
            return "no tensors"
        tensor.data_location = TensorProto.EXTERNAL
        entry = tensor.external_data.add()
        entry.key, entry.value = "location", str(rng.choice(_LOCATIONS))
        return "make external"
    tensor = tensors[int(rng.integers(len(tensors)))]
    entry = tensor.external_data[int(rng.integers(len(tensor.external_data)))]
    choice = int(rng.integers(4))
    if choice == 0:
        entry.value = str(rng.choice(_LOCATIONS)) if entry.key == "location" else str(rng.choice(["-1", "x", "99999999", "0", "1e3"]))
    elif choice == 1:
        tensor.external_data.add().CopyFrom(entry)  # a key given twice
    elif choice == 2:
        entry.value = str(int(entry.value) + int(rng.integers(-8, 9))) if entry.value.isdigit() else "7"
    else:
        tensor.ClearField("data_location")
    return "external ref"


def _versions(rng: np.random.Generator, m: onnx.ModelProto) -> str:
    if rng.random() < 0.5:
        m.ir_version = int(rng.choice([0, 1, 3, 7, 11, 13, 99]))
        return "ir version"
    if m.opset_import:
        m.opset_import[0].version = int(rng.choice([1, 6, 13, 22, 99]))
    return "opset"


PROTO_MUTATIONS = {
    "delete_field": _delete_field,
    "change_dims": _change_dims,
    "change_dtype": _change_dtype,
    "rewire": _rewire,
    "node_surgery": _node_surgery,
    "weight_values": _weights_values,
    "external_refs": _external_refs,
    "versions": _versions,
}
BYTE_MUTATIONS = ("flip_bytes", "truncate", "splice")


def mutate(folder: Path, rng: np.random.Generator) -> str:
    """Apply one to three mutations to the model file in ``folder`` (its data file sometimes); the labels."""
    path = folder / MODEL_NAME
    labels = []
    for _ in range(int(rng.choice([1, 1, 1, 2, 3]))):
        data = path.read_bytes()
        kind = str(rng.choice(list(PROTO_MUTATIONS) * 2 + list(BYTE_MUTATIONS)))
        if kind in PROTO_MUTATIONS:
            m = onnx.ModelProto()
            try:
                m.ParseFromString(data)
            except Exception:  # noqa: BLE001 (an earlier byte mutation broke it: mutate bytes again)
                kind = "flip_bytes"
            else:
                labels.append(PROTO_MUTATIONS[kind](rng, m))
                path.write_bytes(m.SerializeToString())
                continue
        if kind == "truncate":
            path.write_bytes(data[: int(rng.integers(len(data)))])
        elif kind == "splice":
            path.write_bytes(_splice(rng, data))
        else:
            path.write_bytes(_flip_bytes(rng, data))
        labels.append(kind)
    data_file = folder / (MODEL_NAME + ".data")
    if data_file.exists() and rng.random() < 0.1:
        content = data_file.read_bytes()
        data_file.write_bytes(content[: int(rng.integers(len(content) + 1))])
        labels.append("truncate data file")
    return " + ".join(labels)


# --- running --------------------------------------------------------------------------------


class Hang(BaseException):
    """Raised by the alarm when a command outlives its time limit (BaseException: nothing catches it)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    if threading_is_main() and hasattr(signal, "setitimer"):
        def expire(signum, frame):
            raise Hang()

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    else:
        yield


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _digest(folder: Path, names: list[str]) -> dict[str, str]:
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names if (folder / n).exists()}


def message_template(text: str, folder: Path) -> str:
    """A failure line with paths, quoted names and numbers elided, so that like failures count together."""
    line = text.strip().splitlines()[-1] if text.strip() else ""
    line = line.replace(str(folder), "<dir>")
    line = re.sub(r"'[^']*'", "'…'", line)
    line = re.sub(r"\[[^\]]*\]", "[…]", line)
    line = re.sub(r"-?\d+(\.\d+)?(e[-+]?\d+)?", "N", line)
    return line[:160]


@dataclass
class Outcome:
    command: str
    exit_code: int | str
    message: str
    violations: list[str] = field(default_factory=list)
    seconds: float = 0.0


def commands() -> dict[str, list[str]]:
    """The command lines run on every mutant (fast settings: few probes, no per-layer probes)."""
    from onnxcoreset.cli import prune

    quick = ["--chain-probes", "0"] if any(p.name == "chain_probes" for p in prune.params) else []
    return {
        "prune": ["prune", MODEL_NAME, OUTPUT_NAME, "--keep", "0.5", "--probes", "4", "--device", "cpu"] + quick,
        "inspect": ["inspect", MODEL_NAME],
    }


def run_commands(folder: Path, timeout: float = DEFAULT_TIMEOUT_S) -> list[Outcome]:
    """Run prune and inspect on the model in ``folder`` in-process and check every invariant."""
    from click.testing import CliRunner

    from onnxcoreset.cli import main

    inputs = sorted(p.name for p in folder.iterdir())
    before = _digest(folder, inputs)
    outcomes = []
    for command, args in commands().items():
        args = [str(folder / a) if a in (MODEL_NAME, OUTPUT_NAME) else a for a in args]
        runner = CliRunner()
        start = time.perf_counter()
        violations: list[str] = []
        try:
            with time_limit(timeout):
                result = runner.invoke(main, args, catch_exceptions=True)
        except Hang:
            outcomes.append(Outcome(command, "hang", f"over {timeout:g} s", [f"{command}: no result within {timeout:g} s"], timeout))
            _remove_outputs(folder, inputs)
            continue
        seconds = time.perf_counter() - start
        code, err, out = result.exit_code, result.stderr, result.stdout
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            violations.append(f"{command}: exception {type(result.exception).__name__}: {result.exception}")
            code = "exception"
        if code not in (0, 1, 2):
            violations.append(f"{command}: exit code {code}: {err.strip()[:300]}")
        lines = err.splitlines()
        if code != 0 and (len(lines) != 1 or not lines[0].startswith("onnxcoreset: ")):
            violations.append(f"{command}: exit {code} with {len(lines)} stderr lines: {err[:300]!r}")
        if code == 0 and err.strip():
            violations.append(f"{command}: success with stderr output {err[:300]!r}")
        if "Traceback" in out or "Traceback" in err:
            violations.append(f"{command}: traceback printed")
        after = _digest(folder, inputs)
        if after != before:
            violations.append(f"{command}: input files changed: {sorted(k for k in before if before[k] != after.get(k))}")
        expected = set(inputs) | ({OUTPUT_NAME} | ({OUTPUT_NAME + ".data"} if (folder / (OUTPUT_NAME + ".data")).exists() else set())
                                  if command == "prune" and code == 0 else set())
        present = {p.name for p in folder.iterdir()}
        if present != expected:
            violations.append(f"{command}: files left {sorted(present - expected)}, missing {sorted(expected - present)}")
        message = "ok" if code == 0 else message_template(err, folder)
        outcomes.append(Outcome(command, code, message, violations, seconds))
        _remove_outputs(folder, inputs)
    return outcomes


def _remove_outputs(folder: Path, inputs: list[str]) -> None:
    for path in folder.iterdir():
        if path.name not in inputs:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def mutant_rng(master_seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([master_seed, index])


def run_mutant(all_seeds: list[Seed], master_seed: int, index: int, timeout: float = DEFAULT_TIMEOUT_S,
               keep_failures: Path | None = None) -> dict:
    """Build mutant ``index`` deterministically, run the commands on it, return a JSON-able record.

    With ``keep_failures``, a mutant that violates an invariant is copied to keep_failures/INDEX.
    """
    rng = mutant_rng(master_seed, index)
    seed = pick_seed(all_seeds, index)
    timeout = max(timeout, SLOW_TIMEOUT_S) if seed.slow else timeout
    with tempfile.TemporaryDirectory(prefix="onnxcoreset-fuzz-") as tmp:
        folder = Path(tmp) / "mutant"
        folder.mkdir()
        write_seed(seed, folder)
        label = mutate(folder, rng)
        if keep_failures is not None:
            pristine = Path(tmp) / "pristine"
            shutil.copytree(folder, pristine)
        outcomes = run_commands(folder, timeout)
        if keep_failures is not None and any(o.violations for o in outcomes):
            shutil.copytree(pristine, keep_failures / str(index), dirs_exist_ok=True)
    return {
        "index": index,
        "seed": seed.name,
        "mutation": label,
        "outcomes": [o.__dict__ for o in outcomes],
    }


@dataclass
class Summary:
    mutants: int = 0
    runs: int = 0
    table: collections.Counter = field(default_factory=collections.Counter)
    codes: collections.Counter = field(default_factory=collections.Counter)
    violations: list[str] = field(default_factory=list)
    gate_failures: list[str] = field(default_factory=list)  # exit 1: allowed, but worth a look (which mutant, why)
    slowest: float = 0.0

    def add(self, record: dict) -> None:
        self.mutants += 1
        for outcome in record["outcomes"]:
            self.runs += 1
            self.codes[(outcome["command"], outcome["exit_code"])] += 1
            self.table[(outcome["command"], outcome["exit_code"], outcome["message"])] += 1
            self.slowest = max(self.slowest, outcome["seconds"])
            if outcome["exit_code"] == 1:
                self.gate_failures.append(f"mutant {record['index']} ({record['seed']}; {record['mutation']}): {outcome['command']}")
            for violation in outcome["violations"]:
                self.violations.append(f"mutant {record['index']} ({record['seed']}; {record['mutation']}): {violation}")

    def render(self, top: int = 40) -> str:
        lines = [f"{self.mutants} mutants, {self.runs} runs, slowest run {self.slowest:.2f} s",
                 "runs by command and exit code:"]
        lines += [f"  {command:8s} exit {code}: {count}" for (command, code), count in sorted(self.codes.items(), key=str)]
        lines.append(f"most frequent outcomes (of {len(self.table)} distinct):")
        for (command, code, message), count in self.table.most_common(top):
            lines.append(f"  {count:6d}  {command:8s} {code}  {message}")
        lines.append(f"validation gate failures (exit 1, nothing written): {len(self.gate_failures)}")
        lines += [f"  {g}" for g in self.gate_failures[:20]]
        lines.append(f"violations: {len(self.violations)}")
        lines += [f"  {v}" for v in self.violations[:50]]
        return "\n".join(lines)


def fuzz_in_process(mutants: int, master_seed: int = 0, include_shared: bool = True, timeout: float = DEFAULT_TIMEOUT_S,
                    keep_failures: Path | None = None) -> Summary:
    all_seeds = seeds(include_shared)
    summary = Summary()
    for index in range(mutants):
        summary.add(run_mutant(all_seeds, master_seed, index, timeout, keep_failures))
    return summary


def _worker(master_seed: int, include_shared: bool, timeout: float, keep_failures: Path | None) -> None:
    """Read mutant indices from stdin, write one JSON record per line to stdout."""
    all_seeds = seeds(include_shared)
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # nothing but records on the pipe
    real_stdout.write("ready\n")
    real_stdout.flush()
    for line in sys.stdin:
        try:
            record = run_mutant(all_seeds, master_seed, int(line), timeout, keep_failures)
        except Exception as exc:  # noqa: BLE001 (a bug in the fuzzer itself: report it, do not die silently)
            record = _failure_record(int(line), f"fuzzer error {type(exc).__name__}: {exc}")
            record["failed"] = False
        real_stdout.write(json.dumps(record) + "\n")
        real_stdout.flush()


class _Worker:
    def __init__(self, args: list[str]) -> None:
        self.process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        text=True, bufsize=1)
        self.index: int | None = None
        self.started = 0.0
        assert self.process.stdout.readline().strip() == "ready"

    def send(self, index: int) -> None:
        self.index, self.started = index, time.monotonic()
        self.process.stdin.write(f"{index}\n")
        self.process.stdin.flush()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def fuzz_in_workers(mutants: int, master_seed: int, include_shared: bool, timeout: float, jobs: int,
                    keep_failures: Path | None = None, progress: bool = True) -> Summary:
    """Run mutants in ``jobs`` worker processes; a worker that hangs or dies is recorded and replaced."""
    args = [sys.executable, str(Path(__file__).resolve()), "--worker", "--seed", str(master_seed),
            "--timeout", str(timeout)] + ([] if include_shared else ["--no-shared"])
    args += ["--keep-failures", str(keep_failures)] if keep_failures else []
    summary = Summary()
    pending = iter(range(mutants))
    workers = [_Worker(args) for _ in range(max(1, jobs))]
    for worker in workers:
        index = next(pending, None)
        if index is not None:
            worker.send(index)
    started = time.monotonic()
    while any(w.index is not None for w in workers):
        busy = [w for w in workers if w.index is not None]
        ready, _, _ = select.select([w.process.stdout for w in busy], [], [], 1.0)
        for worker in busy:
            record = None
            if worker.process.stdout in ready:
                line = worker.process.stdout.readline()
                if line:
                    record = json.loads(line)
                else:  # the worker died on this mutant: a crash in native code
                    code = worker.process.wait()
                    record = _failure_record(worker.index, f"worker died with exit code {code}")
            elif time.monotonic() - worker.started > 2 * max(timeout, SLOW_TIMEOUT_S) + 30:
                record = _failure_record(worker.index, "worker hung past the time limit")
            if record is None:
                continue
            summary.add(record)
            if record.get("failed"):
                worker.stop()
                workers[workers.index(worker)] = worker = _Worker(args)
            index = next(pending, None)
            worker.index = None
            if index is not None:
                worker.send(index)
        if progress and summary.mutants and summary.mutants % 500 == 0 and ready:
            rate = summary.mutants / (time.monotonic() - started)
            print(f"  {summary.mutants} mutants ({rate:.1f}/s), {len(summary.violations)} violations", file=sys.stderr)
    for worker in workers:
        worker.process.stdin.close()
        worker.stop()
    return summary


def _failure_record(index: int, why: str) -> dict:
    outcome = {"command": "worker", "exit_code": "crash", "message": why, "violations": [why], "seconds": 0.0}
    return {"index": index, "seed": "?", "mutation": "?", "outcomes": [outcome], "failed": True}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutants", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0, help="master seed: mutant i is a function of (seed, i)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per command")
    parser.add_argument("--no-shared", action="store_true", help="leave out the models in ../shared")
    parser.add_argument("--in-process", action="store_true", help="no worker processes")
    parser.add_argument("--write-mutant", nargs=2, metavar=("INDEX", "FOLDER"),
                        help="write mutant INDEX into FOLDER (to reproduce a failure by hand) and stop")
    parser.add_argument("--keep-failures", type=Path, help="copy every mutant that violates an invariant here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.write_mutant:
        index, folder = int(args.write_mutant[0]), Path(args.write_mutant[1])
        folder.mkdir(parents=True, exist_ok=True)
        write_seed(pick_seed(seeds(not args.no_shared), index), folder)
        print(mutate(folder, mutant_rng(args.seed, index)))
        return 0
    if args.worker:
        _worker(args.seed, not args.no_shared, args.timeout, args.keep_failures)
        return 0
    started = time.monotonic()
    if args.in_process:
        summary = fuzz_in_process(args.mutants, args.seed, not args.no_shared, args.timeout, args.keep_failures)
    else:
        summary = fuzz_in_workers(args.mutants, args.seed, not args.no_shared, args.timeout, args.jobs, args.keep_failures)
    print(summary.render())
    print(f"{time.monotonic() - started:.0f} s with {1 if args.in_process else args.jobs} process(es); "
          f"seeds: {', '.join(s.name for s in seeds(not args.no_shared))}")
    return 1 if summary.violations else 0


if __name__ == "__main__":
    sys.exit(main())
