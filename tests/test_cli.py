"""The command-line contract pipelines script against: options, exit codes, the JSON report, determinism.

Exit codes: 0 ok, 1 validation failed (nothing written), 2 bad usage or unusable model (one line on
stderr, never a traceback). Everything runs in-process with click's CliRunner on tmp_path, plus one
run of the installed ``onnxcoreset`` console script.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import CHAIN_FORMS
from click.testing import CliRunner, Result
from onnx import numpy_helper

from onnxcoreset.cli import main


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result: Result, code: int, fragment: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("onnxcoreset: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


@pytest.fixture
def deep(tmp_path: Path) -> Path:
    """The 20-30-24-12-5 MLP: three prunable chains and a skipped last layer (its output is the graph's)."""
    path = tmp_path / "deep.onnx"
    onnx.save(CHAIN_FORMS["mlp_deep_3_chains"](np.random.default_rng(0)).model, path)
    return path


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    """A [batch, seq, 12] token-wise FFN: two dynamic dimensions."""
    path = tmp_path / "ffn3d.onnx"
    onnx.save(CHAIN_FORMS["mlp_matmul_3d_input"](np.random.default_rng(0)).model, path)
    return path


def test_prune_writes_a_smaller_model_and_the_report(deep, tmp_path):
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    result = invoke("prune", deep, out, "--keep", "0.5", "--report", report_path, "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert {"params_before", "params_after", "seed", "method", "layers", "skipped"} <= set(report)
    assert (report["seed"], report["method"]) == (0, "coreset")
    assert report["params_before"] == 20 * 30 + 30 + 30 * 24 + 24 + 24 * 12 + 12 + 12 * 5 + 5
    assert report["params_after"] == 20 * 15 + 15 + 15 * 12 + 12 + 12 * 6 + 6 + 6 * 5 + 5
    assert [(l["name"], l["activation"], l["neurons_before"], l["neurons_after"]) for l in report["layers"]] == [
        ("fc0", "relu", 30, 15),
        ("fc1", "relu", 24, 12),
        ("fc2", "relu", 12, 6),
    ]
    assert [(s["name"], s["reason"]) for s in report["skipped"]] == [("fc3", "tensor 'y' is a graph output")]
    for layer in report["layers"]:  # the plan, replayable: kept indices, their scales, and m
        assert len(layer["kept"]) == len(layer["scale"]) == layer["neurons_after"]
        assert layer["draws"] >= layer["neurons_after"]
    assert report["validation"]["ok"] is True
    assert [o["name"] for o in report["validation"]["outputs"]] == ["y"]
    # the terminal table: layers, parameters, skipped, and the per-output deviations
    assert "fc0" in result.stdout and "30 -> 15" in result.stdout
    assert "skipped fc3: tensor 'y' is a graph output" in result.stdout
    assert "max abs" in result.stdout and "mean L1" in result.stdout
    pruned = onnx.load(out)
    onnx.checker.check_model(pruned, full_check=True)
    assert numpy_helper.to_array(next(t for t in pruned.graph.initializer if t.name == "W0")).shape == (15, 20)


def test_neurons_keeps_that_many_per_layer(deep, tmp_path):
    report_path = tmp_path / "r.json"
    result = invoke("prune", deep, tmp_path / "out.onnx", "--neurons", "4", "--no-validate", "--report", report_path)
    assert result.exit_code == 0, result.output
    assert [l["neurons_after"] for l in json.loads(report_path.read_text())["layers"]] == [4, 4, 4]


@pytest.mark.parametrize("method", ["uniform", "percentile"])
def test_method_and_seed_are_recorded(deep, tmp_path, method):
    report_path = tmp_path / "r.json"
    result = invoke("prune", deep, tmp_path / "o.onnx", "--keep", "0.3", "--method", method, "--seed", "9", "--no-validate",
                    "--report", report_path)
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert (report["method"], report["seed"]) == (method, 9)
    metadata = {p.key: p.value for p in onnx.load(tmp_path / "o.onnx").metadata_props}
    assert (metadata["onnxcoreset.method"], metadata["onnxcoreset.seed"]) == (method, "9")


def test_no_validate_skips_onnxruntime(deep, tmp_path):
    report_path = tmp_path / "r.json"
    result = invoke("prune", deep, tmp_path / "o.onnx", "--keep", "0.5", "--no-validate", "--report", report_path)
    assert result.exit_code == 0, result.output
    assert json.loads(report_path.read_text())["validation"] is None
    assert "validation" not in result.stdout and (tmp_path / "o.onnx").exists()


def test_max_error_failing_validation_exits_1_and_writes_nothing(deep, tmp_path):
    out = tmp_path / "o.onnx"
    result = invoke("prune", deep, out, "--keep", "0.2", "--max-error", "1e-9", "--device", "cpu")
    assert_one_line_error(result, 1, "validation failed")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep.onnx"]  # no staging leftovers either


def test_generous_max_error_passes(deep, tmp_path):
    result = invoke("prune", deep, tmp_path / "o.onnx", "--keep", "1.0", "--max-error", "0", "--device", "cpu")
    assert result.exit_code == 0, result.output  # keeping everything moves nothing: 0 is met exactly


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (["--keep", "0"], "--keep must be in (0, 1]"),
        (["--keep", "-0.5"], "--keep must be in (0, 1]"),
        (["--keep", "1.5"], "--keep must be in (0, 1]"),
        (["--keep", "nan"], "--keep must be in (0, 1]"),
        (["--neurons", "0"], "--neurons must be at least 1"),
        (["--keep", "0.5", "--neurons", "3"], "one of --keep and --neurons"),
        ([], "give --keep"),
        (["--keep", "0.5", "--method", "random"], "--method must be one of"),
        (["--keep", "0.5", "--beta", "0"], "--beta must be a positive number"),
        (["--keep", "0.5", "--input-shape", "x:0x12"], "--input-shape expects NAME:DxDx"),
        (["--keep", "0.5", "--input-shape", "nonsense"], "--input-shape expects NAME:DxDx"),
        (["--keep", "abc"], "abc"),
    ],
)
def test_bad_options_exit_2_with_one_line(deep, tmp_path, options, fragment):
    out = tmp_path / "o.onnx"
    result = invoke("prune", deep, out, *options)
    assert_one_line_error(result, 2, fragment)
    assert not out.exists()


def test_unusable_models_exit_2(tmp_path):
    missing = invoke("prune", tmp_path / "missing.onnx", tmp_path / "o.onnx", "--keep", "0.5")
    assert_one_line_error(missing, 2, "no such file")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07not an onnx model at all\xff\xff")
    assert_one_line_error(invoke("prune", garbage, tmp_path / "o.onnx", "--keep", "0.5"), 2, "garbage.onnx")
    assert_one_line_error(invoke("inspect", garbage), 2, "garbage.onnx")


def test_output_equal_to_input_is_refused_without_force(deep):
    before = deep.read_bytes()
    result = invoke("prune", deep, deep, "--keep", "0.5")
    assert_one_line_error(result, 2, "--force")
    assert deep.read_bytes() == before
    forced = invoke("prune", deep, deep, "--keep", "0.5", "--force", "--no-validate")
    assert forced.exit_code == 0, forced.output
    assert len(deep.read_bytes()) < len(before)


def test_input_shape_fixes_dynamic_dimensions(tokens, tmp_path):
    report_path = tmp_path / "r.json"
    ok = invoke("prune", tokens, tmp_path / "o.onnx", "--keep", "0.5", "--input-shape", "x:2x7x12", "--probes", "6",
                "--device", "cpu", "--report", report_path)
    assert ok.exit_code == 0, ok.output
    assert json.loads(report_path.read_text())["validation"]["ok"] is True
    # the shape is really used: a wrong feature size makes onnxruntime refuse the probes (exit 2, one line)
    wrong = invoke("prune", tokens, tmp_path / "p.onnx", "--keep", "0.5", "--input-shape", "x:2x7x11", "--device", "cpu")
    assert_one_line_error(wrong, 2, "onnxruntime")
    assert not (tmp_path / "p.onnx").exists()


def test_same_run_twice_gives_byte_identical_files(deep, tmp_path):
    outputs = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        result = invoke("prune", deep, folder / "out.onnx", "--keep", "0.5", "--seed", "3", "--no-validate")
        assert result.exit_code == 0, result.output
        outputs.append((folder / "out.onnx").read_bytes())
    assert outputs[0] == outputs[1]
    other = tmp_path / "c.onnx"
    assert invoke("prune", deep, other, "--keep", "0.5", "--seed", "4", "--no-validate").exit_code == 0
    assert other.read_bytes() != outputs[0]  # and the seed matters


def test_same_run_twice_with_external_data_is_byte_identical(tmp_path):
    source = tmp_path / "ext.onnx"
    onnx.save_model(CHAIN_FORMS["mlp_deep_3_chains"](np.random.default_rng(0)).model, source,
                    save_as_external_data=True, location="ext.weights", size_threshold=0)
    files = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        result = invoke("prune", source, folder / "out.onnx", "--keep", "0.7", "--device", "cpu")
        assert result.exit_code == 0, result.output
        files.append({p.name: p.read_bytes() for p in folder.iterdir()})
    assert files[0] == files[1]
    assert set(files[0]) == {"out.onnx", "out.onnx.data"}


def test_inspect_json_lists_chains_and_skipped(deep):
    result = invoke("inspect", deep, "--json")
    assert result.exit_code == 0, result.output
    listing = json.loads(result.stdout)
    assert [(c["name"], c["producer"], c["activation"], c["consumers"], c["hidden_size"]) for c in listing["chains"]] == [
        ("fc0", "Gemm", "relu", ["fc1"], 30),
        ("fc1", "Gemm", "relu", ["fc2"], 24),
        ("fc2", "Gemm", "relu", ["fc3"], 12),
    ]
    assert listing["chains"][0]["params"] == 30 * 20 + 30 + 24 * 30
    assert listing["skipped"] == [{"name": "fc3", "reason": "tensor 'y' is a graph output"}]
    table = invoke("inspect", deep)
    assert table.exit_code == 0 and "3 prunable chain(s)" in table.stdout and "fc3: tensor 'y' is a graph output" in table.stdout


def test_inspect_shows_the_metadata_of_a_pruned_model(deep, tmp_path):
    out = tmp_path / "o.onnx"
    assert invoke("prune", deep, out, "--keep", "0.5", "--seed", "5", "--no-validate").exit_code == 0
    listing = json.loads(invoke("inspect", out, "--json").stdout)
    assert listing["metadata"]["onnxcoreset.seed"] == "5"
    assert [c["hidden_size"] for c in listing["chains"]] == [15, 12, 6]


def test_console_script_end_to_end(deep, tmp_path):
    """The installed entry point, as a CI job would call it."""
    executable = shutil.which("onnxcoreset")
    if executable is None:
        pytest.skip("the onnxcoreset console script is not installed (pip install -e .)")
    out, report_path = tmp_path / "o.onnx", tmp_path / "r.json"
    done = subprocess.run(
        [executable, "prune", str(deep), str(out), "--keep", "0.5", "--report", str(report_path), "--device", "cpu"],
        capture_output=True, text=True, check=False, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(report_path.read_text())["params_after"] < json.loads(report_path.read_text())["params_before"]
    bad = subprocess.run([executable, "prune", str(deep), str(out), "--keep", "2"], capture_output=True, text=True,
                         check=False, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr


def test_device_cuda_without_a_gpu_exits_2(deep, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers() and Path("/dev/nvidia0").exists():
        pytest.skip("this machine has a CUDA GPU")
    out = tmp_path / "o.onnx"
    result = invoke("prune", deep, out, "--keep", "0.5", "--device", "cuda")
    assert_one_line_error(result, 2, "--device cuda")
    assert not out.exists()
    assert invoke("prune", deep, out, "--keep", "0.5", "--device", "auto", "--probes", "4").exit_code == 0
