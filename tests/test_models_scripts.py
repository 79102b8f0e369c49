"""Smoke tests of the fast model-building scripts in models/: run them as a user would, prune what they write.

Each script runs in a subprocess into tmp_path; its output must pass the full checker, show the
expected prunable chains, and prune at keep 0.5 to a smaller model that validates in onnxruntime.
A script that does not exist (yet) is skipped, not failed. Pruning every variant is marked slow.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

import onnxcoreset
from onnxcoreset.pipeline import PruneConfig, prune_file

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


def run_script(name: str, *args: str) -> None:
    path = MODELS_DIR / name
    if not path.is_file():
        pytest.skip(f"models/{name} does not exist")
    done = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr


def check_and_prune(path: Path, expected: list[tuple[int, str]], tmp_path: Path, prune: bool = True) -> None:
    """``expected``: (hidden size, activation) of each prunable chain, in order."""
    assert path.is_file()
    onnx.checker.check_model(str(path), full_check=True)
    listing = onnxcoreset.inspect(path)
    assert [(c.hidden_size, c.activation) for c in listing.chains] == expected, listing.skipped
    if not prune:
        return
    out = tmp_path / f"{path.stem}.pruned.onnx"
    report = prune_file(path, out, PruneConfig(keep=0.5), device="cpu", probes=8, chain_probes=0)
    assert report.validation is not None and report.validation.ok, report.validation
    assert [l.neurons_after for l in report.layers] == [(size + 1) // 2 for size, _ in expected]
    assert report.params_after < report.params_before
    original, pruned = onnx.load(str(path)), onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    assert (pruned.ir_version, list(pruned.opset_import)) == (original.ir_version, list(original.opset_import))


def test_build_mlp(tmp_path):
    out = tmp_path / "mlp.onnx"
    run_script("build_mlp.py", "--out", str(out), "--seed", "1")
    sizes = importlib.import_module("build_mlp").LAYER_SIZES
    check_and_prune(out, [(size, "relu") for size in sizes[1:-1]], tmp_path)


@pytest.mark.parametrize(
    "variant", ["keras_style_mlp.onnx", pytest.param("keras_style_mlp_bias_first.onnx", marks=pytest.mark.slow)]
)
def test_build_keras_style(tmp_path, variant):
    run_script("build_keras_style.py", "--out-dir", str(tmp_path))
    sizes = importlib.import_module("build_keras_style").LAYER_SIZES
    check_and_prune(tmp_path / variant, [(size, "relu") for size in sizes[1:-1]], tmp_path)


@pytest.mark.parametrize("gelu", ["erf", pytest.param("erf-dynamo", marks=pytest.mark.slow), pytest.param("op", marks=pytest.mark.slow)])
def test_build_tiny_bert(tmp_path, gelu):
    out = tmp_path / f"tiny_bert_{gelu}.onnx"
    run_script("build_tiny_bert.py", "--gelu", gelu, "--out", str(out))
    # two encoder layers, each with one FFN 32-128-32 whose GELU (any exporter form) is recognised
    check_and_prune(out, [(128, "gelu"), (128, "gelu")], tmp_path)


@pytest.mark.parametrize("gelu", ["erf-dynamo", "op"])
def test_build_tiny_bert_other_gelu_forms_are_found(tmp_path, gelu):
    """The cheap half of the slow variants above: every GELU form yields both FFN chains."""
    out = tmp_path / f"tiny_bert_{gelu}.onnx"
    run_script("build_tiny_bert.py", "--gelu", gelu, "--out", str(out))
    check_and_prune(out, [(128, "gelu"), (128, "gelu")], tmp_path, prune=False)
