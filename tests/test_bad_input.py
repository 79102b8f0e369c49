"""Bad input never crashes, nothing is ever lost, and a model cannot reach outside its folder.

Every case runs the real command line in-process (click's CliRunner) and asserts the documented
contract: exit 2 with exactly one line ``onnxcoreset: error: ...`` on stderr for an unusable
input or request, exit 1 with nothing written when validation fails, no traceback ever, no
temporary file ever, and the input model and its external data byte-for-byte unchanged.
Numerical checks: a chain that is skipped is bit-for-bit unchanged; pruned models are compared
with onnx's reference evaluator on the same pruned weights within 1e-5 (float32 sums).
"""

from __future__ import annotations

import builtins
import hashlib
import io as pyio
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import float_input, init, model, weights
from click.testing import CliRunner, Result
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxcoreset
from onnxcoreset import io as oio
from onnxcoreset.cli import main
from onnxcoreset.errors import ResourceError

QUICK = ["--probes", "8", "--chain-probes", "0"]  # validation settings that keep each run well under a second


# --- helpers --------------------------------------------------------------------------------


def invoke(*args) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result: Result, fragment: str, code: int = 2) -> str:
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("onnxcoreset: error: "), lines[0]
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    return lines[0]


def digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) with its SHA-256: what must not change."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
        if not p.is_symlink()
    }


def save(m: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(m.SerializeToString())
    return path


def mlp(rng: np.random.Generator, sizes=(6, 10, 8, 3), names: str = "") -> onnx.ModelProto:
    """Gemm(transB=1)+Relu layers: len(sizes)-2 prunable chains, the last layer feeds the output."""
    nodes, inits, current = [], [], "x"
    for i in range(len(sizes) - 1):
        nodes.append(helper.make_node("Gemm", [current, f"{names}W{i}", f"{names}b{i}"], [f"{names}g{i}"], name=f"{names}fc{i}", transB=1))
        inits += [init(f"{names}W{i}", weights(rng, sizes[i], sizes[i + 1]).T.copy()),
                  init(f"{names}b{i}", (0.1 * rng.standard_normal(sizes[i + 1])).astype(np.float32))]
        current = f"{names}g{i}"
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [current], [f"{names}r{i}"], name=f"{names}relu{i}"))
            current = f"{names}r{i}"
    return model(nodes, [float_input("x", ["batch", sizes[0]])], [float_input(current, ["batch", sizes[-1]])], inits)


def run_ort(m: onnx.ModelProto | Path, feed: dict) -> list[np.ndarray]:
    source = str(m) if isinstance(m, Path) else m.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feed)


def initializers(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


@pytest.fixture
def good(tmp_path: Path) -> Path:
    return save(mlp(np.random.default_rng(0)), tmp_path / "good.onnx")


def save_external(m: onnx.ModelProto, path: Path, location: str | None = None) -> Path:
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location or path.name + ".data", size_threshold=0)
    return path


# --- the file itself ------------------------------------------------------------------------


def _bad_files(folder: Path, good: Path) -> dict[str, tuple[Path, str]]:
    data = good.read_bytes()
    valid = onnx.load(str(good))
    cases: dict[str, tuple[Path, str]] = {"missing": (folder / "missing.onnx", "no such file")}
    (folder / "a_folder.onnx").mkdir()
    cases["directory"] = (folder / "a_folder.onnx", "is a directory")
    cases["empty"] = (folder / "empty.onnx", "the file is empty")
    (folder / "empty.onnx").write_bytes(b"")
    cases["random bytes"] = (folder / "random.onnx", "not an ONNX model")
    (folder / "random.onnx").write_bytes(np.random.default_rng(5).bytes(777))
    cases["truncated"] = (folder / "truncated.onnx", "not an ONNX model")
    (folder / "truncated.onnx").write_bytes(data[: len(data) // 2])
    cases["a TensorProto"] = (save(numpy_helper.from_array(np.ones((4, 4), np.float32), "t"), folder / "tensor.onnx"), "not an ONNX model")
    cases["a GraphProto"] = (folder / "graph.onnx", "not an ONNX model")
    (folder / "graph.onnx").write_bytes(valid.graph.SerializeToString())
    no_graph = onnx.ModelProto()
    no_graph.CopyFrom(valid)
    no_graph.ClearField("graph")
    cases["no graph"] = (save(no_graph, folder / "nograph.onnx"), "it has no graph")
    newer_ir = onnx.ModelProto()
    newer_ir.CopyFrom(valid)
    newer_ir.ir_version = onnx.IR_VERSION + 1
    cases["IR version too new"] = (save(newer_ir, folder / "ir.onnx"), f"IR version {onnx.IR_VERSION + 1}")
    newer_opset = onnx.ModelProto()
    newer_opset.CopyFrom(valid)
    newer_opset.opset_import[0].version = onnx.defs.onnx_opset_version() + 1
    cases["opset too new"] = (save(newer_opset, folder / "opset.onnx"), f"uses opset {onnx.defs.onnx_opset_version() + 1}")
    ml_opset = onnx.ModelProto()
    ml_opset.CopyFrom(valid)
    ml_opset.opset_import.add().CopyFrom(helper.make_opsetid("ai.onnx.ml", 99))
    cases["ai.onnx.ml opset too new"] = (save(ml_opset, folder / "ml.onnx"), "opset 99 of 'ai.onnx.ml'")
    os.mkfifo(folder / "fifo.onnx")  # reading a FIFO nobody writes to would hang forever
    cases["a FIFO"] = (folder / "fifo.onnx", "is not a regular file")
    return cases


BAD_FILES = ["missing", "directory", "empty", "random bytes", "truncated", "a TensorProto", "a GraphProto", "no graph",
             "IR version too new", "opset too new", "ai.onnx.ml opset too new", "a FIFO"]


@pytest.mark.parametrize("case", BAD_FILES)
@pytest.mark.parametrize("command", ["prune", "inspect", "validate"])
def test_unusable_file_exits_2_with_one_line(tmp_path, good, case, command):
    path, fragment = _bad_files(tmp_path, good)[case]
    before = digest(tmp_path)
    if command == "prune":
        result = invoke("prune", path, tmp_path / "out.onnx", "--keep", "0.5")
    elif command == "inspect":
        result = invoke("inspect", path)
    else:
        result = invoke("validate", path, good)
    assert_one_line_error(result, fragment)
    assert digest(tmp_path) == before  # nothing written, nothing left behind


def test_validate_names_the_bad_second_file(tmp_path, good):
    result = invoke("validate", good, tmp_path / "nope.onnx")
    assert_one_line_error(result, "nope.onnx: no such file")


def _mutated(good: Path, edit) -> onnx.ModelProto:
    m = onnx.load(str(good))
    edit(m)
    return m


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda m: m.graph.node[0].input.__setitem__(0, "ghost"), "reads 'ghost', which no input, initializer or node defines"),
        (lambda m: m.graph.node[1].output.__setitem__(0, "g0"), "tensor 'g0' is defined twice"),
        (lambda m: m.graph.node[1].input.pop(), "relu0' (Relu) is malformed"),
        (lambda m: m.graph.node[0].attribute[0].ClearField("type"), "is malformed"),
        (lambda m: m.graph.node[1].ClearField("op_type"), "has no operator type"),
        (lambda m: m.graph.node[0].input.__setitem__(0, "r0"), "cycle"),
        (lambda m: m.graph.output[0].__setattr__("name", "nowhere"), "graph output 'nowhere' is not defined"),
        (lambda m: m.graph.initializer[0].dims.__setitem__(0, 7), "declares shape [7, 6] (168 bytes) but stores 240 bytes"),
        (lambda m: m.graph.initializer[0].__setattr__("data_type", 99), "unknown data type 99"),
        (lambda m: m.graph.initializer[0].dims.__setitem__(0, -10), "negative dimension"),
    ],
    ids=["undefined input", "defined twice", "missing input", "attribute without type", "no op type", "cycle",
         "undefined output", "dims disagree with bytes", "unknown dtype", "negative dim"],
)
@pytest.mark.parametrize("command", ["prune", "inspect"])
def test_malformed_graph_exits_2_with_one_line(tmp_path, good, edit, fragment, command):
    path = save(_mutated(good, edit), tmp_path / "bad.onnx")
    before = digest(tmp_path)
    args = ["prune", path, tmp_path / "out.onnx", "--keep", "0.5"] if command == "prune" else ["inspect", path]
    assert_one_line_error(invoke(*args), fragment)
    assert digest(tmp_path) == before


def test_invalid_utf8_in_a_name_is_refused(tmp_path, good):
    data = good.read_bytes().replace(b"fc1", b"f\xdf1", 1)  # same length: the protobuf stays well formed
    path = tmp_path / "utf8.onnx"
    path.write_bytes(data)
    assert_one_line_error(invoke("inspect", path), "is not valid UTF-8")


def test_typed_data_must_match_the_declared_shape(tmp_path, good):
    def edit(m):
        w = m.graph.initializer[0]
        values = numpy_helper.to_array(w).reshape(-1)[:-1]
        w.ClearField("raw_data")
        w.float_data.extend(values.tolist())
    assert_one_line_error(invoke("inspect", save(_mutated(good, edit), tmp_path / "m.onnx")), "(60 values) but stores 59 in float_data")


def test_input_that_fails_the_checker_is_blamed_not_the_output(tmp_path, good):
    """A model onnx's checker refuses cannot be pruned into one it accepts: say it is the input's fault."""
    def edit(m):  # IR 3 requires every initializer to be a graph input as well
        m.ir_version = 3
    path = save(_mutated(good, edit), tmp_path / "old.onnx")
    line = assert_one_line_error(invoke("prune", path, tmp_path / "out.onnx", "--keep", "0.5", *QUICK), "the input model fails onnx.checker")
    assert line.startswith(f"onnxcoreset: error: {path}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.onnx", "old.onnx"]


# --- options --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, fragment",
    [
        (["--keep", "0"], "--keep must be in (0, 1]"),
        (["--keep", "1.5"], "--keep must be in (0, 1]"),
        (["--keep", "-0.25"], "--keep must be in (0, 1]"),
        (["--keep", "nan"], "--keep must be in (0, 1]"),
        (["--neurons", "0"], "--neurons must be at least 1"),
        (["--neurons", "-3"], "--neurons must be at least 1"),
        (["--keep", "0.5", "--neurons", "3"], "exactly one of"),
        ([], "--keep"),
        (["--keep", "abc"], "Invalid value for '--keep'"),
        (["--keep", "0.5", "--bogus"], "No such option '--bogus'"),
        (["--keep", "0.5", "--probes", "0"], "--probes must be at least 1"),
        (["--keep", "0.5", "--max-error", "nan"], "--max-error must be a non-negative number"),
        (["--keep", "0.5", "--max-error", "-1"], "--max-error must be a non-negative number"),
        (["--keep", "0.5", "--beta", "0"], "--beta"),
        (["--keep", "0.5", "--seed", "-1"], "--seed must be non-negative"),
    ],
)
def test_bad_options_exit_2_with_one_line_before_any_work(tmp_path, good, options, fragment):
    before = digest(tmp_path)
    assert_one_line_error(invoke("prune", good, tmp_path / "out.onnx", *options), fragment)
    assert digest(tmp_path) == before


def test_usage_errors_of_click_itself_are_one_line(tmp_path, good):
    assert_one_line_error(invoke("prune", good), "Missing argument 'TARGET'")
    assert_one_line_error(invoke("no-such-command"), "No such command 'no-such-command'")
    assert_one_line_error(invoke("prune", good, tmp_path / "o.onnx", "--keep", "0.5", "--device", "tpu"), "Invalid value for '--device'")


def test_help_still_prints_help():
    result = invoke("--help")
    assert result.exit_code == 0 and "Usage:" in result.stdout


@pytest.mark.parametrize("options, fragment", [(["--probes", "0"], "--probes"), (["--beta", "-1"], "--beta"),
                                               (["--max-error", "inf"], "--max-error")])
def test_validate_command_checks_its_options(good, options, fragment):
    assert_one_line_error(invoke("validate", good, good, *options), fragment)


# --- external data --------------------------------------------------------------------------


def _external_model(folder: Path, location: str = "weights.bin") -> Path:
    """good.onnx with every tensor in one external file; its data file is ``location``."""
    return save_external(mlp(np.random.default_rng(1)), folder / "model.onnx", location)


def _set_ref(path: Path, tensor_index: int = 0, **entries: str) -> None:
    m = onnx.load(str(path), load_external_data=False)
    tensor = m.graph.initializer[tensor_index]
    for key, value in entries.items():
        matching = [e for e in tensor.external_data if e.key == key]
        if matching:
            matching[0].value = value
        else:
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    path.write_bytes(m.SerializeToString())


class ReadSpy:
    """Records every path opened for reading (builtins.open, io.open, os.open, numpy.memmap)."""

    def __init__(self, monkeypatch) -> None:
        self.paths: list[str] = []
        real_open, real_io_open, real_os_open, real_memmap = builtins.open, pyio.open, os.open, np.memmap

        def spy(real):
            def opener(file, *args, **kwargs):
                if isinstance(file, (str, bytes, os.PathLike)):
                    self.paths.append(os.path.realpath(os.fsdecode(file)))
                return real(file, *args, **kwargs)
            return opener

        class SpyMemmap(np.memmap):
            def __new__(cls, filename, *args, **kwargs):
                self.paths.append(os.path.realpath(os.fspath(filename)))
                return real_memmap.__new__(real_memmap, filename, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", spy(real_open))
        monkeypatch.setattr(pyio, "open", spy(real_io_open))
        monkeypatch.setattr(os, "open", spy(real_os_open))
        monkeypatch.setattr(np, "memmap", SpyMemmap)

    def touched(self, path: Path) -> bool:
        return os.path.realpath(path) in self.paths


def test_read_spy_sees_external_data_being_read(tmp_path, monkeypatch):
    """The spy behind the 'refused before reading' tests does see a read when one happens."""
    folder = tmp_path / "model"
    folder.mkdir()
    path = _external_model(folder)
    spy = ReadSpy(monkeypatch)
    result = invoke("prune", path, tmp_path / "out.onnx", "--keep", "0.5", "--no-validate")
    assert result.exit_code == 0, result.output
    assert spy.touched(folder / "weights.bin")


def _outside_secret(tmp_path: Path, size: int) -> Path:
    secret_folder = tmp_path / "elsewhere"
    secret_folder.mkdir()
    secret = secret_folder / "secret.bin"
    secret.write_bytes(b"\x01" * size)
    secret.chmod(0)  # unreadable (for a non-root user): a refusal must not depend on a failed read
    return secret


@pytest.mark.parametrize(
    "location, fragment",
    [
        ("/etc/hostname", "is absolute"),
        ("{secret}", "is absolute"),
        ("../elsewhere/secret.bin", "contains '..'"),
        ("sub/../../elsewhere/secret.bin", "contains '..'"),
        ("C:\\weights.bin", "is absolute"),
        ("C:weights.bin", "is absolute"),
        ("\\\\server\\share\\weights.bin", "is absolute"),
        ("\\weights.bin", "is absolute"),
        ("..\\elsewhere\\secret.bin", "contains '..'"),
        ("weights\x00.bin", "control characters"),
        ("weights\n.bin", "control characters"),
        ("", "without a location"),
    ],
    ids=["absolute", "absolute secret", "dotdot", "dotdot inside", "windows drive", "windows drive relative", "unc",
         "windows root", "windows dotdot", "nul", "newline", "empty"],
)
@pytest.mark.parametrize("command", ["prune", "inspect"])
def test_unsafe_external_location_is_refused_before_reading(tmp_path, monkeypatch, location, fragment, command):
    folder = tmp_path / "model"
    folder.mkdir()
    path = _external_model(folder)
    secret = _outside_secret(tmp_path, 10_000)
    _set_ref(path, location=location.replace("{secret}", str(secret)))
    before = digest(tmp_path)
    spy = ReadSpy(monkeypatch)
    args = ["prune", path, folder / "out.onnx", "--keep", "0.5"] if command == "prune" else ["inspect", path]
    assert_one_line_error(invoke(*args), fragment)
    assert not spy.touched(secret) and not spy.touched(Path("/etc/hostname"))
    assert not spy.touched(folder / "weights.bin")  # no weight byte is read before every reference is checked
    monkeypatch.undo()
    assert digest(tmp_path) == before


def test_symlink_leaving_the_folder_is_refused_before_reading(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    path = _external_model(folder)
    data = (folder / "weights.bin").read_bytes()
    secret = _outside_secret(tmp_path, len(data))
    (folder / "innocent.bin").symlink_to(secret)
    _set_ref(path, location="innocent.bin")
    spy = ReadSpy(monkeypatch)
    assert_one_line_error(invoke("inspect", path), "resolves outside the model's folder")
    assert_one_line_error(invoke("prune", path, folder / "o.onnx", "--keep", "0.5"), "resolves outside the model's folder")
    assert not spy.touched(secret)


def test_symlinked_folder_leaving_the_model_folder_is_refused(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    path = _external_model(folder)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(folder / "weights.bin", outside / "weights.bin")
    (folder / "sub").symlink_to(outside, target_is_directory=True)
    _set_ref(path, location="sub/weights.bin")
    assert_one_line_error(invoke("inspect", path), "resolves outside the model's folder")


def test_symlink_inside_the_folder_is_followed(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    path = _external_model(folder)
    (folder / "data").mkdir()
    shutil.move(folder / "weights.bin", folder / "data" / "real.bin")
    (folder / "weights.bin").symlink_to(folder / "data" / "real.bin")
    before = digest(folder)
    result = invoke("prune", path, tmp_path / "out.onnx", "--keep", "0.5", *QUICK)
    assert result.exit_code == 0, result.output
    assert digest(folder) == before
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)


@pytest.mark.parametrize(
    "setup, fragment",
    [
        (lambda f, p: (f / "weights.bin").unlink(), "external data file 'weights.bin' is missing"),
        (lambda f, p: ((f / "weights.bin").unlink(), (f / "weights.bin").mkdir()), "is not a regular file"),
        (lambda f, p: os.truncate(f / "weights.bin", 100), "lies past the end of 'weights.bin' (100 bytes)"),
        (lambda f, p: _set_ref(p, offset="999999"), "lies past the end"),
        (lambda f, p: _set_ref(p, length="999999"), "lies past the end"),
        (lambda f, p: _set_ref(p, length="8"), "external data holds 8 bytes, its shape needs 240"),
        (lambda f, p: _set_ref(p, offset="-4"), "offset '-4' is not a non-negative integer"),
        (lambda f, p: _set_ref(p, offset="1e3"), "offset '1e3' is not a non-negative integer"),
        (lambda f, p: _add_duplicate_key(p, "location", "../elsewhere/secret.bin"), "gives the key 'location' twice"),
        (lambda f, p: _add_duplicate_key(p, "offset", "0"), "gives the key 'offset' twice"),
        (lambda f, p: _with_inline_data(p), "both inline data and external data"),
    ],
    ids=["missing file", "a directory", "file too short", "offset past end", "length past end", "length mismatch",
         "negative offset", "float offset", "duplicate location", "duplicate offset", "inline and external"],
)
def test_broken_external_data_exits_2_with_one_line(tmp_path, setup, fragment):
    folder = tmp_path / "model"
    folder.mkdir()
    path = _external_model(folder)
    setup(folder, path)
    before = digest(tmp_path)
    assert_one_line_error(invoke("inspect", path), fragment)
    assert_one_line_error(invoke("prune", path, folder / "out.onnx", "--keep", "0.5"), fragment)
    assert digest(tmp_path) == before


def _add_duplicate_key(path: Path, key: str, value: str) -> None:
    m = onnx.load(str(path), load_external_data=False)
    entry = m.graph.initializer[0].external_data.add()
    entry.key, entry.value = key, value
    path.write_bytes(m.SerializeToString())


def _with_inline_data(path: Path) -> None:
    m = onnx.load(str(path), load_external_data=False)
    m.graph.initializer[0].raw_data = b"\0" * 240
    path.write_bytes(m.SerializeToString())


def test_check_external_ref_accepts_a_plain_subfolder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.bin").write_bytes(b"\0" * 64)
    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4, 4])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "sub/w.bin"), ("offset", "0"), ("length", "64")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    ref = oio.check_external_ref(tensor, tmp_path)
    assert ref == oio.ExternalRef((tmp_path / "sub" / "w.bin").resolve(), 0, 64)


# --- weights --------------------------------------------------------------------------------


def _report(m: onnx.ModelProto, tmp_path: Path, *extra) -> tuple[Result, Path]:
    path = save(m, tmp_path / "in.onnx")
    out = tmp_path / "out.onnx"
    result = invoke("prune", path, out, "--keep", "0.5", "--report", tmp_path / "report.json", *QUICK, *extra)
    return result, out


def _skipped(tmp_path: Path) -> dict[str, str]:
    import json

    report = json.loads((tmp_path / "report.json").read_text())
    return {s["name"]: s["reason"] for s in report["skipped"]}


def _assert_unchanged(original: onnx.ModelProto, out: Path, names: list[str]) -> None:
    pruned = initializers(onnx.load(str(out)))
    for name, value in initializers(original).items():
        if name in names:
            assert pruned[name].dtype == value.dtype
            np.testing.assert_array_equal(pruned[name], value)


def test_weight_that_is_a_graph_input_is_skipped_with_reason(tmp_path):
    m = mlp(np.random.default_rng(2))
    m.graph.input.append(helper.make_tensor_value_info("W0", TensorProto.FLOAT, [10, 6]))
    result, out = _report(m, tmp_path)
    assert result.exit_code == 0, result.output
    assert "weight 'W0' is a graph input" in _skipped(tmp_path)["fc0"]
    _assert_unchanged(m, out, ["W0", "b0"])
    assert initializers(onnx.load(str(out)))["W1"].shape == (4, 10)  # fc1 pruned its rows, not fc0's columns


def test_weights_from_constant_nodes_are_pruned(tmp_path):
    rng = np.random.default_rng(3)
    d, n, k = 6, 12, 4
    w1, w2 = weights(rng, d, n), weights(rng, n, k)
    nodes = [
        helper.make_node("Constant", [], ["W1"], value=numpy_helper.from_array(w1, "W1")),
        helper.make_node("Constant", [], ["W2"], value=numpy_helper.from_array(w2, "W2")),
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("Tanh", ["h"], ["a"], name="tanh"),
        helper.make_node("MatMul", ["a", "W2"], ["y"], name="mm2"),
    ]
    m = model(nodes, [float_input("x", ["batch", d])], [float_input("y", ["batch", k])], [])
    result, out = _report(m, tmp_path)
    assert result.exit_code == 0, result.output
    pruned = onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in pruned.graph.node if n.op_type == "Constant"}
    assert constants["W1"].shape == (d, n // 2) and constants["W2"].shape == (n // 2, k)
    feed = {"x": rng.standard_normal((5, d)).astype(np.float32)}
    np.testing.assert_allclose(run_ort(pruned, feed)[0], ReferenceEvaluator(pruned).run(None, feed)[0], rtol=1e-5, atol=1e-5)


def test_weight_shared_by_two_nodes_is_skipped_with_reason(tmp_path):
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("Gemm", ["x", "W", "b"], ["h1"], name="fc_a", transB=1),
        helper.make_node("Gemm", ["x", "W", "b"], ["h2"], name="fc_b", transB=1),
        helper.make_node("Relu", ["h1"], ["a1"], name="relu_a"),
        helper.make_node("Relu", ["h2"], ["a2"], name="relu_b"),
        helper.make_node("Gemm", ["a1", "U1"], ["y1"], name="out_a", transB=1),
        helper.make_node("Gemm", ["a2", "U2"], ["y2"], name="out_b", transB=1),
    ]
    inits = [init("W", weights(rng, 6, 8).T.copy()), init("b", np.zeros(8, np.float32)),
             init("U1", weights(rng, 8, 3).T.copy()), init("U2", weights(rng, 8, 3).T.copy())]
    m = model(nodes, [float_input("x", ["batch", 6])], [float_input("y1", ["batch", 3]), float_input("y2", ["batch", 3])], inits)
    result, out = _report(m, tmp_path)
    assert result.exit_code == 0, result.output
    reasons = _skipped(tmp_path)
    assert "weight initializer 'W' is also read by fc_b" in reasons["fc_a"]
    assert "weight initializer 'W' is also read by fc_a" in reasons["fc_b"]
    _assert_unchanged(m, out, ["W", "b", "U1", "U2"])


def test_weight_read_twice_by_its_own_node_is_skipped_with_reason(tmp_path):
    """Gemm(W, W, b) (found by the fuzzer): slicing W's rows would also cut the Gemm's input rows."""
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("Gemm", ["W", "W", "b"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["a"], name="relu"),
        helper.make_node("Gemm", ["a", "U"], ["y"], name="fc2", transB=1),
    ]
    inits = [init("W", weights(rng, 6, 8).T.copy()), init("b", np.zeros(8, np.float32)), init("U", weights(rng, 8, 3).T.copy())]
    m = model(nodes, [float_input("x", ["batch", 6])], [float_input("y", [8, 3])], inits)
    result, out = _report(m, tmp_path)
    assert result.exit_code == 0, result.output
    assert "weight initializer 'W' is read more than once by fc1" in _skipped(tmp_path)["fc1"]
    _assert_unchanged(m, out, ["W", "b", "U"])


def test_reshape_with_a_float_shape_is_refused_cleanly(tmp_path):
    """A Reshape whose shape constant is float NaN (found by the fuzzer) gave an internal error in radius propagation."""
    rng = np.random.default_rng(6)
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "W", "b"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["a"], name="relu"),
        helper.make_node("Gemm", ["a", "U"], ["y"], name="fc2", transB=1),
    ]
    inits = [init("shape", np.array([np.nan, -1.0])), init("W", weights(rng, 8, 8).T.copy()),
             init("b", np.zeros(8, np.float32)), init("U", weights(rng, 8, 3).T.copy())]
    graph = helper.make_graph(nodes, "g", [float_input("x", ["batch", 4, 2])], [float_input("y", ["batch", 3])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)  # invalid: no checker here
    path = tmp_path / "m.onnx"
    path.write_bytes(m.SerializeToString())
    before = digest(tmp_path)
    assert_one_line_error(invoke("prune", path, tmp_path / "o.onnx", "--keep", "0.5", *QUICK), "Reshape")
    assert digest(tmp_path) == before


def _quantized_models(rng: np.random.Generator) -> dict[str, onnx.ModelProto]:
    d, n, k = 6, 8, 3
    x = [float_input("x", ["batch", d])]
    q8 = lambda a: np.clip(np.round(a * 50), -127, 127).astype(np.int8)
    scalar = lambda name, v, dt=np.float32: init(name, np.array(v, dt))
    models = {}
    # DequantizeLinear(W_q) -> MatMul -> Relu -> MatMul
    nodes = [
        helper.make_node("DequantizeLinear", ["Wq", "s", "z"], ["W"], name="dq"),
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["a"], name="relu"),
        helper.make_node("MatMul", ["a", "U"], ["y"], name="mm2"),
    ]
    inits = [init("Wq", q8(weights(rng, d, n))), scalar("s", 0.02), scalar("z", 0, np.int8), init("U", weights(rng, n, k))]
    models["DequantizeLinear"] = model(nodes, x, [float_input("y", ["batch", k])], inits)
    # QuantizeLinear(x) -> MatMulInteger(W_q) -> Cast -> Mul(scale) -> Relu -> MatMul
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
        helper.make_node("MatMulInteger", ["xq", "Wq"], ["hi"], name="mmi"),
        helper.make_node("Cast", ["hi"], ["hf"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Relu", ["hf"], ["a"], name="relu"),
        helper.make_node("MatMul", ["a", "U"], ["y"], name="mm2"),
    ]
    inits = [init("Wq", q8(weights(rng, d, n))), scalar("s", 0.02), scalar("z", 0, np.int8), init("U", weights(rng, n, k))]
    models["MatMulInteger"] = model(nodes, x, [float_input("y", ["batch", k])], inits)
    # QLinearMatMul(x_q, W_q) -> DequantizeLinear -> Relu -> MatMul
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
        helper.make_node("QLinearMatMul", ["xq", "s", "z", "Wq", "s", "z", "s", "z"], ["hq"], name="qmm"),
        helper.make_node("DequantizeLinear", ["hq", "s", "z"], ["hf"], name="dq"),
        helper.make_node("Relu", ["hf"], ["a"], name="relu"),
        helper.make_node("MatMul", ["a", "U"], ["y"], name="mm2"),
    ]
    inits = [init("Wq", q8(weights(rng, d, n))), scalar("s", 0.02), scalar("z", 0, np.int8), init("U", weights(rng, n, k))]
    models["QLinearMatMul"] = model(nodes, x, [float_input("y", ["batch", k])], inits)
    return models


@pytest.mark.parametrize("pattern, node, fragment", [
    ("DequantizeLinear", "mm1", "weight 'W' is quantized (DequantizeLinear)"),
    ("MatMulInteger", "mmi", "MatMulInteger is quantized"),
    ("QLinearMatMul", "qmm", "QLinearMatMul is quantized"),
])
def test_quantized_weights_are_skipped_with_reason(tmp_path, pattern, node, fragment):
    m = _quantized_models(np.random.default_rng(5))[pattern]
    path = save(m, tmp_path / "q.onnx")
    inspected = onnxcoreset.inspect(path)
    assert inspected.chains == ()
    assert fragment in {s.name: s.reason for s in inspected.skipped}[node]
    result, out = _report(m, tmp_path)
    assert result.exit_code == 0, result.output
    assert fragment in _skipped(tmp_path)[node]
    _assert_unchanged(m, out, [t.name for t in m.graph.initializer])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["W0", "b0", "W1"])
def test_nan_or_inf_weights_skip_their_chain_without_nan_elsewhere(tmp_path, bad, where):
    """A non-finite weight skips the chains it touches (bit-for-bit unchanged); the others are pruned."""
    rng = np.random.default_rng(6)
    m = mlp(rng, sizes=(6, 10, 9, 8, 3))  # chains fc0, fc1, fc2
    tensor = next(t for t in m.graph.initializer if t.name == where)
    value = numpy_helper.to_array(tensor).copy()
    value.reshape(-1)[3] = bad
    tensor.CopyFrom(numpy_helper.from_array(value, where))
    result, out = _report(m, tmp_path, "--no-validate")
    assert result.exit_code == 0, result.output
    reasons = _skipped(tmp_path)
    assert "NaN or Inf" in reasons["fc0"] or "not finite" in reasons["fc0"], reasons
    _assert_unchanged(m, out, ["W0", "b0", "W1"])
    pruned = onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    for name, value in initializers(pruned).items():  # pruning itself never creates NaN or Inf
        if name not in ("W0", "b0", "W1"):
            assert np.all(np.isfinite(value)), name


def test_nan_weights_through_validation_never_produce_new_nan(tmp_path):
    m = mlp(np.random.default_rng(7), sizes=(6, 10, 9, 8, 3))
    tensor = m.graph.initializer[2]  # W1: the output is NaN for every input, before and after pruning
    value = numpy_helper.to_array(tensor).copy()
    value[0, 0] = np.nan
    tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
    result, _ = _report(m, tmp_path)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # no RuntimeWarning leaks onto stderr
    assert "validation passed" in result.stdout


# --- the graph: control flow and order --------------------------------------------------------


def _control_flow_model(rng: np.random.Generator, kind: str) -> onnx.ModelProto:
    """Chain A (fcA0 → relu → fcA1) is outside everything and prunable; chain B's consumer weight
    UB is read inside the subgraph from the outer scope; the subgraph holds an MLP of its own."""
    d, n, k = 6, 10, 4
    source = "row2d" if kind == "Scan" else "yA"
    inner_nodes = [
        helper.make_node("Gemm", [source, "V0"], ["v0"], name="inner_fc0", transB=1),
        helper.make_node("Relu", ["v0"], ["v1"], name="inner_relu"),
        helper.make_node("Gemm", ["v1", "V1"], ["v2"], name="inner_fc1", transB=1),
        helper.make_node("MatMul", ["v2", "UB"], ["z"], name="inner_reads_outer"),
    ]
    inner_inits = [init("V0", weights(rng, k, 8).T.copy()), init("V1", weights(rng, 8, n).T.copy())]
    nodes = [
        helper.make_node("Gemm", ["x", "WA0", "bA0"], ["hA"], name="fcA0", transB=1),
        helper.make_node("Relu", ["hA"], ["aA"], name="reluA"),
        helper.make_node("Gemm", ["aA", "WA1"], ["yA"], name="fcA1", transB=1),
        helper.make_node("MatMul", ["x", "WB0"], ["hB"], name="mmB0"),
        helper.make_node("Tanh", ["hB"], ["aB"], name="tanhB"),
        helper.make_node("MatMul", ["aB", "UB"], ["yB"], name="mmB1"),
    ]
    inits = [init("WA0", weights(rng, d, n).T.copy()), init("bA0", np.zeros(n, np.float32)), init("WA1", weights(rng, n, k).T.copy()),
             init("WB0", weights(rng, d, n)), init("UB", weights(rng, n, k))]
    inputs = [float_input("x", ["batch", d])]
    z_info = float_input("z", [1, k] if kind == "Scan" else ["batch", k])
    if kind == "If":
        then_graph = helper.make_graph(inner_nodes, "then", [], [z_info], inner_inits)
        else_graph = helper.make_graph([helper.make_node("Identity", ["yA"], ["z"])], "else", [], [z_info])
        nodes.append(helper.make_node("If", ["cond"], ["out"], name="branch", then_branch=then_graph, else_branch=else_graph))
        inputs.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    elif kind == "Loop":
        body_inputs = [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("c", TensorProto.BOOL, [])]
        body_nodes = inner_nodes + [helper.make_node("Identity", ["c"], ["c_out"])]
        body = helper.make_graph(body_nodes, "body", body_inputs,
                                 [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []), z_info], inner_inits)
        nodes.append(helper.make_node("Loop", ["trips", ""], ["out"], name="loop", body=body))
        inputs.append(helper.make_tensor_value_info("trips", TensorProto.INT64, []))
    else:  # Scan over the rows of yA, one at a time
        body_nodes = [helper.make_node("Unsqueeze", ["row", "axis0"], ["row2d"])] + inner_nodes + [
            helper.make_node("Squeeze", ["z", "axis0"], ["zrow"])]
        body = helper.make_graph(body_nodes, "body", [float_input("row", [k])], [float_input("zrow", [k])],
                                 inner_inits + [init("axis0", np.array([0], np.int64))])
        nodes.append(helper.make_node("Scan", ["yA"], ["out"], name="scan", body=body, num_scan_inputs=1))
    out_shape = {"If": ["batch", k], "Loop": ["iterations", "batch", k], "Scan": ["batch", k]}[kind]
    outputs = [float_input("out", out_shape), float_input("yB", ["batch", k])]
    return model(nodes, inputs, outputs, inits)


@pytest.mark.parametrize("kind", ["If", "Loop", "Scan"])
def test_control_flow_prunes_outside_and_skips_inside(tmp_path, kind):
    m = _control_flow_model(np.random.default_rng(8), kind)
    result, out = _report(m, tmp_path)
    assert result.exit_code == 0, result.output
    reasons = _skipped(tmp_path)
    assert "inner_fc0" in reasons and "control-flow bodies are not pruned" in reasons["inner_fc0"]
    assert "mmB0" in reasons, reasons  # its consumer weight UB is read from inside the subgraph
    assert "fcA0" not in reasons
    pruned = onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    assert initializers(pruned)["WA0"].shape == (5, 6)
    _assert_unchanged(m, out, ["WB0", "UB"])
    sub = next(a.g if a.type == onnx.AttributeProto.GRAPH else None for n in pruned.graph.node for a in n.attribute
               if a.type == onnx.AttributeProto.GRAPH)
    original_sub = next(a.g for n in m.graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH)
    assert sub.SerializeToString() == original_sub.SerializeToString()  # bodies are untouched


def test_hidden_tensor_read_by_a_subgraph_is_not_pruned(tmp_path):
    rng = np.random.default_rng(9)
    m = mlp(rng)
    z = float_input("z", ["batch", 10])
    then_graph = helper.make_graph([helper.make_node("Identity", ["r0"], ["z"])], "then", [], [z])  # reads hidden r0
    else_graph = helper.make_graph([helper.make_node("Identity", ["r0"], ["z"])], "else", [], [z])
    m.graph.node.append(helper.make_node("If", ["cond"], ["peek"], name="peek", then_branch=then_graph, else_branch=else_graph))
    m.graph.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    m.graph.output.append(float_input("peek", ["batch", 10]))
    onnx.checker.check_model(m, full_check=True)
    result, out = _report(m, tmp_path)
    assert result.exit_code == 0, result.output
    assert "hidden tensor" in _skipped(tmp_path)["fc0"] or "read by" in _skipped(tmp_path)["fc0"], _skipped(tmp_path)
    _assert_unchanged(m, out, ["W0", "b0"])
    assert initializers(onnx.load(str(out)))["W1"].shape == (4, 10)


def _unsorted(m: onnx.ModelProto, order: list[int]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(m)
    nodes = [copy.graph.node[i] for i in order]
    moved = [onnx.NodeProto() for _ in nodes]
    for target, node in zip(moved, nodes):
        target.CopyFrom(node)
    copy.graph.ClearField("node")
    copy.graph.node.extend(moved)
    return copy


def test_unsorted_nodes_are_pruned_and_written_sorted(tmp_path):
    sorted_model = mlp(np.random.default_rng(10), sizes=(6, 10, 9, 3))
    shuffled = _unsorted(sorted_model, [4, 2, 0, 3, 1])  # fc2, fc1, fc0, relu1, relu0
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(shuffled)
    result, out = _report(shuffled, tmp_path)
    assert result.exit_code == 0, result.output
    pruned = onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    assert [n.name for n in pruned.graph.node] == ["fc0", "relu0", "fc1", "relu1", "fc2"]
    from_sorted, _ = onnxcoreset.prune(sorted_model, keep=0.5)
    for name, value in initializers(from_sorted).items():
        np.testing.assert_array_equal(initializers(pruned)[name], value)


def test_sorted_input_keeps_its_own_node_order(tmp_path):
    m = mlp(np.random.default_rng(11), sizes=(6, 10, 9, 3))
    # side nodes that a sort by dependencies alone could place anywhere: they must stay where they are
    m.graph.node.insert(0, helper.make_node("Identity", ["x"], ["x_copy"], name="side"))
    m.graph.output.append(float_input("x_copy", ["batch", 6]))
    m.graph.node.append(helper.make_node("Identity", ["x"], ["x_copy2"], name="late_side"))
    m.graph.output.append(float_input("x_copy2", ["batch", 6]))
    result, out = _report(m, tmp_path)
    assert result.exit_code == 0, result.output
    assert [n.name for n in onnx.load(str(out)).graph.node] == [n.name for n in m.graph.node]


def test_sort_nodes_keeps_constant_protos_live():
    """Sorting reorders the node messages in place, so the store's references still point into the graph."""
    m = mlp(np.random.default_rng(12))
    graph = _unsorted(m, [4, 3, 2, 1, 0]).graph
    first_output = {n.output[0]: n for n in graph.node}
    assert oio.sort_nodes(graph)
    assert [n.name for n in graph.node] == ["fc0", "relu0", "fc1", "relu1", "fc2"]
    assert all(first_output[n.output[0]] is n for n in graph.node)
    assert not oio.sort_nodes(graph)


# --- the output -----------------------------------------------------------------------------


def test_output_equal_to_input_is_refused_unless_force(tmp_path, good):
    before = digest(tmp_path)
    assert_one_line_error(invoke("prune", good, good, "--keep", "0.5"), "would overwrite the input")
    assert digest(tmp_path) == before
    result = invoke("prune", good, good, "--keep", "0.5", "--force", *QUICK)
    assert result.exit_code == 0, result.output
    onnx.checker.check_model(str(good), full_check=True)
    assert initializers(onnx.load(str(good)))["W0"].shape == (5, 6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.onnx"]


def test_output_that_is_a_hard_link_to_the_input_is_refused(tmp_path, good):
    os.link(good, tmp_path / "alias.onnx")
    before = digest(tmp_path)
    assert_one_line_error(invoke("prune", good, tmp_path / "alias.onnx", "--keep", "0.5", *QUICK), "would overwrite the input")
    assert digest(tmp_path) == before


def test_output_that_would_replace_the_inputs_external_data_is_refused(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    path = _external_model(folder, location="out.onnx.data")  # the output's data file name
    before = digest(tmp_path)
    line = assert_one_line_error(invoke("prune", path, folder / "out.onnx", "--keep", "0.5", *QUICK), "external data 'out.onnx.data'")
    assert "--force" in line
    assert digest(tmp_path) == before
    line = assert_one_line_error(invoke("prune", path, folder / "out.onnx.data", "--keep", "0.5", *QUICK), "would overwrite")
    assert digest(tmp_path) == before


def test_missing_output_folder_exits_2_and_writes_nothing(tmp_path, good):
    before = digest(tmp_path)
    assert_one_line_error(invoke("prune", good, tmp_path / "no" / "such" / "out.onnx", "--keep", "0.5"), "does not exist")
    assert_one_line_error(invoke("prune", good, tmp_path / "good.onnx" / "out.onnx", "--keep", "0.5"), "does not exist")
    assert_one_line_error(invoke("prune", good, tmp_path, "--keep", "0.5", *QUICK), "is a directory")
    assert_one_line_error(invoke("prune", good, tmp_path / "o.onnx", "--keep", "0.5", "--report", tmp_path / "no" / "r.json"), "does not exist")
    assert digest(tmp_path) == before


def test_unusable_output_folder_is_refused_before_the_model_is_read(tmp_path, good, monkeypatch):
    """A multi-gigabyte model should not be loaded and pruned only to fail at the write."""
    from onnxcoreset import io

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was read before the output folder was checked")

    monkeypatch.setattr(io, "load", no_loading)
    assert_one_line_error(invoke("prune", good, tmp_path / "no" / "out.onnx", "--keep", "0.5"), "does not exist")


@pytest.fixture
def read_only_folder(tmp_path: Path):
    """A folder nobody can create files in: chmod for a normal user, the immutable flag for root."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = False
    if os.geteuid() == 0 and shutil.which("chattr"):
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False).returncode == 0
    try:
        (folder / "probe").touch()
    except OSError:
        yield folder
    else:
        (folder / "probe").unlink()
        pytest.skip("cannot make a read-only folder here (root without chattr +i)")
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=False)
        folder.chmod(0o755)


def test_unwritable_output_folder_exits_2_and_writes_nothing(read_only_folder, good):
    result = invoke("prune", good, read_only_folder / "out.onnx", "--keep", "0.5", *QUICK)
    assert_one_line_error(result, "out.onnx")
    assert list(read_only_folder.iterdir()) == []


def test_failing_validation_gate_leaves_nothing(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    path = _external_model(folder)
    before = digest(tmp_path)
    result = invoke("prune", path, folder / "out.onnx", "--keep", "0.3", "--max-error", "0", *QUICK)
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines() == [f"onnxcoreset: validation failed; {folder / 'out.onnx'} was not written"]
    assert "FAILED" in result.stdout
    assert digest(tmp_path) == before  # no output, no data file, no staging folder, input untouched


def test_interrupt_and_termination_leave_nothing(tmp_path, good, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the run")

    before = digest(tmp_path)
    monkeypatch.setattr("onnxcoreset.pipeline.compare", interrupted)
    result = invoke("prune", good, tmp_path / "out.onnx", "--keep", "0.5", *QUICK)
    assert result.exit_code == 130 and result.stderr.splitlines() == ["onnxcoreset: interrupted; temporary files were removed"]
    assert digest(tmp_path) == before
    monkeypatch.setattr("onnxcoreset.pipeline.compare", terminated)
    result = invoke("prune", good, tmp_path / "out.onnx", "--keep", "0.5", *QUICK)
    assert result.exit_code == 143 and result.stderr.splitlines() == ["onnxcoreset: terminated; temporary files were removed"]
    assert digest(tmp_path) == before
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back


def test_internal_error_is_one_line_exit_3(tmp_path, good, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("onnxcoreset.pipeline.compare", broken)
    before = digest(tmp_path)
    result = invoke("prune", good, tmp_path / "out.onnx", "--keep", "0.5", *QUICK)
    assert result.exit_code == 3
    assert result.stderr.splitlines() == ["onnxcoreset: internal error: ZeroDivisionError: a bug (rerun with --debug)"]
    assert digest(tmp_path) == before
    with pytest.raises(ZeroDivisionError):
        CliRunner().invoke(main, ["--debug", "prune", str(good), str(tmp_path / "o.onnx"), "--keep", "0.5"], catch_exceptions=False)


def test_input_and_external_data_are_never_modified_and_output_is_deterministic(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    path = _external_model(folder)
    before = digest(folder)
    outputs = []
    for run in ("a", "b"):
        out_folder = tmp_path / run
        out_folder.mkdir()
        result = invoke("prune", path, out_folder / "out.onnx", "--keep", "0.5", "--seed", "7", *QUICK)
        assert result.exit_code == 0, result.output
        assert digest(folder) == before
        outputs.append(digest(out_folder))
    assert outputs[0] == outputs[1] and set(outputs[0]) == {"out.onnx", "out.onnx.data"}


def test_report_is_written_atomically_next_to_nothing_else(tmp_path, good):
    result = invoke("prune", good, tmp_path / "out.onnx", "--keep", "0.5", "--report", tmp_path / "r.json", *QUICK)
    assert result.exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.onnx", "out.onnx", "r.json"]


# --- resources ------------------------------------------------------------------------------


def test_memory_budget_is_positive():
    assert oio.memory_budget() > 0


def test_tensor_declaring_more_than_memory_is_refused_before_allocation(tmp_path, good, monkeypatch):
    def edit(m):
        w = m.graph.initializer[0]
        w.ClearField("raw_data")
        del w.dims[:]
        w.dims.extend([10**12, 10**3])
    path = save(_mutated(good, edit), tmp_path / "huge.onnx")
    allocations = []
    monkeypatch.setattr(np, "zeros", lambda *a, **k: allocations.append(a))
    line = assert_one_line_error(invoke("inspect", path), "declares shape [1000000000000, 1000] (3.6 PiB), more than this machine's")
    assert line.endswith("of memory; refused")
    assert allocations == []
    assert_one_line_error(invoke("prune", path, tmp_path / "o.onnx", "--keep", "0.5"), "of memory; refused")


def test_total_declared_size_counts_against_memory(good, monkeypatch):
    monkeypatch.setattr(oio, "memory_budget", lambda: 400)  # each tensor fits, all together do not
    with pytest.raises(ResourceError, match=r"its tensors declare .* or more, more than this machine's 400 bytes"):
        oio.load(good)


def test_sparse_external_file_declaring_more_than_memory_is_refused_unread(tmp_path, monkeypatch):
    folder = tmp_path / "m"
    folder.mkdir()
    path = _external_model(folder)
    huge = 2 * oio.memory_budget()
    rows = huge // (4 * 6) + 1
    try:
        os.truncate(folder / "big.bin", 0) if False else (folder / "big.bin").touch()
        os.truncate(folder / "big.bin", rows * 6 * 4)
    except OSError:
        pytest.skip("this file system has no sparse files that large")
    m = onnx.load(str(path), load_external_data=False)
    w = m.graph.initializer[0]
    del w.dims[:]
    w.dims.extend([rows, 6])
    for entry in w.external_data:
        if entry.key == "location":
            entry.value = "big.bin"
        elif entry.key in ("offset", "length"):
            entry.value = "0" if entry.key == "offset" else str(rows * 24)
    path.write_bytes(m.SerializeToString())
    spy = ReadSpy(monkeypatch)
    assert_one_line_error(invoke("inspect", path), "more than this machine's")
    assert not spy.touched(folder / "big.bin")


def test_oversized_model_file_is_refused_without_reading(tmp_path, monkeypatch):
    path = tmp_path / "big.onnx"
    path.touch()
    try:
        os.truncate(path, oio.PROTOBUF_LIMIT + 1)
    except OSError:
        pytest.skip("no sparse files on this file system")
    spy = ReadSpy(monkeypatch)
    assert_one_line_error(invoke("inspect", path), "more than a protobuf can hold")
    assert not spy.touched(path)


def test_huge_declared_input_is_refused_before_drawing_probes(tmp_path, good):
    def edit(m):
        m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 10**12
    path = save(_mutated(good, edit), tmp_path / "wide.onnx")
    before = digest(tmp_path)
    assert_one_line_error(invoke("prune", path, tmp_path / "o.onnx", "--keep", "0.5", *QUICK), "too many to draw at random")
    assert digest(tmp_path) == before


def _deep_mlp(layers: int, width: int = 12) -> onnx.ModelProto:
    return mlp(np.random.default_rng(13), sizes=(width,) * (layers + 1) + (4,))


def test_pruning_never_copies_the_whole_model(monkeypatch):
    """Work per chain is independent of the model's size: each weight is decoded a bounded number of
    times, and neither the model nor its graph is copied or serialised while chains are pruned."""
    from onnxcoreset import pipeline

    def measure(layers: int) -> tuple[int, int]:
        loaded = oio.from_proto(_deep_mlp(layers))
        decodes: dict[str, int] = {}
        real_decode = oio._decode

        def counting_decode(tensor, name):
            decodes[name] = decodes.get(name, 0) + 1
            return real_decode(tensor, name)

        copies = []
        monkeypatch.setattr(oio, "_decode", counting_decode)
        for cls in (onnx.ModelProto, onnx.GraphProto):
            monkeypatch.setattr(cls, "CopyFrom", lambda self, other, _c=copies: _c.append(type(self).__name__))
            monkeypatch.setattr(cls, "SerializeToString", lambda self, *a, _c=copies, **k: _c.append(type(self).__name__) or b"")
        pipeline.prune_loaded(loaded, pipeline.PruneConfig(keep=0.5))
        monkeypatch.undo()
        assert copies == []
        return max(decodes.values()), len(decodes)

    small_max, small_count = measure(2)
    large_max, large_count = measure(6)
    assert large_count > small_count
    assert large_max == small_max  # the decodes of one tensor do not grow with the number of chains


def test_onnxruntime_errors_reach_the_real_stderr_as_one_line(tmp_path, good):
    """Native code writes to file descriptor 2 directly, past CliRunner: check a real process."""
    m = onnx.load(str(good))
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "features"  # probes get 1 feature: Gemm fails at run time
    path = save(m, tmp_path / "dynamic.onnx")
    done = subprocess.run([sys.executable, "-m", "onnxcoreset.cli", "prune", str(path), str(tmp_path / "out.onnx"),
                           "--keep", "0.5", *QUICK], capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [done.stderr.strip()] and done.stderr.startswith("onnxcoreset: error: onnxruntime failed"), done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dynamic.onnx", "good.onnx"]
