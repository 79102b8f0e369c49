"""Validation on onnxruntime: provider choice, chain sub-models, the per-chain gate, the CLI's exit codes.

Tolerances: a sub-model against numpy's float64 forward pass of the same weights, 1e-5 relative
+ 1e-5 absolute (float32 sums of 16 terms); everything else is a pass/fail decision of the gate.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import build_mlp
import onnxcoreset
from builders import CHAIN_FORMS
from onnxcoreset.chains import find_chains
from onnxcoreset.cli import main
from onnxcoreset.errors import UsageError
from onnxcoreset.io import from_proto, load
from onnxcoreset.neurons import read_layer
from onnxcoreset.pipeline import PruneConfig, prune_file
from onnxcoreset.validate import (
    LAYERS_KEY,
    PLAN_KEY,
    decode_plan,
    encode_plan,
    extract,
    extract_fed,
    providers,
    session,
    validate_chains,
)

validation = sys.modules["onnxcoreset.validate"]  # the package exports a function of the same name


@pytest.fixture
def mlp_files(tmp_path):
    """An MLP 12-40-24-5 and its coreset-pruned copy (keep 0.5, β = 3), as files."""
    source, target = tmp_path / "mlp.onnx", tmp_path / "pruned.onnx"
    onnx.save(build_mlp.build(0, (12, 40, 24, 5)), source)
    report = prune_file(source, target, PruneConfig(keep=0.5, beta=3.0), chain_probes=0)
    assert report.outputs
    return source, target, report


def _metadata(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def _rewrite(path, change) -> None:
    proto = onnx.load(str(path))
    change(proto)
    onnx.save(proto, str(path))


# ---------------------------------------------------------------------------------------------
# Providers


def test_auto_picks_cuda_only_where_onnxruntime_has_a_gpu(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "preload_dlls", lambda: None, raising=False)
    monkeypatch.setattr(validation, "_gpu_present", lambda: True)
    assert providers("auto") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert providers("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert providers("cpu") == ["CPUExecutionProvider"]
    monkeypatch.setattr(validation, "_gpu_present", lambda: False)
    assert providers("auto") == ["CPUExecutionProvider"]
    with pytest.raises(UsageError, match="--device cuda: onnxruntime found no usable CUDA GPU"):
        providers("cuda")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(validation, "_gpu_present", lambda: True)
    assert providers("auto") == ["CPUExecutionProvider"]


def test_the_report_names_the_provider_that_ran(mlp_files):
    source, target, _ = mlp_files
    report = onnxcoreset.validate(source, target, device="cpu", chain_probes=64)
    assert report.provider == "CPUExecutionProvider"
    assert report.ok


# ---------------------------------------------------------------------------------------------
# Sub-models and the plan


def test_extracted_chain_computes_the_chain(rng):
    built = CHAIN_FORMS["matmul_add_relu"](rng)
    loaded = from_proto(built.model)
    (chain,), _ = find_chains(loaded.model.graph, loaded.store)
    layer = read_layer(chain, loaded.store)
    outputs = [loaded.model.graph.node[c.node].output[0] for c in chain.consumers]
    sub = extract(loaded.model, loaded.store, chain.producer.input, outputs, 12, onnx.TensorProto.FLOAT)
    onnx.checker.check_model(sub, full_check=True)
    x = rng.standard_normal((64, 12)).astype(np.float32)
    (got,) = session(sub, "cpu").run(None, {chain.producer.input: x})
    np.testing.assert_allclose(got, layer.output(x.astype(np.float64)), rtol=1e-5, atol=1e-5)


def test_plan_round_trips_exactly(rng):
    plan = {"a": (np.array([0, 3, 7]), rng.uniform(0.5, 2, 3)), "b": (np.arange(5), np.ones(5))}
    decoded = decode_plan(encode_plan(plan))
    for name, (kept, scale) in plan.items():
        np.testing.assert_array_equal(decoded[name][0], kept)
        np.testing.assert_array_equal(decoded[name][1], scale)


def test_written_model_records_the_guarantee(mlp_files):
    _, target, report = mlp_files
    meta = _metadata(target)
    assert meta["onnxcoreset.method"] == "coreset" and meta["onnxcoreset.seed"] == "0"
    assert float(meta["onnxcoreset.beta"]) == 3.0 and meta["onnxcoreset.epsilon"] == ""
    assert meta["onnxcoreset.version"] == onnxcoreset.__version__
    layers = json.loads(meta[LAYERS_KEY])
    for entry, layer in zip(layers, report.layers):
        assert entry["certified_bound"] == layer.certified_bound and entry["attained_error"] == layer.attained_error
        assert entry["radius"] == layer.radius and entry["radius_kind"] == "certified"
        assert 0 < layer.attained_error <= layer.certified_bound
    plan = decode_plan(meta[PLAN_KEY])
    for layer in report.layers:
        np.testing.assert_array_equal(plan[layer.name][0], layer.kept)
        np.testing.assert_array_equal(plan[layer.name][1], layer.scale)
    onnx.checker.check_model(str(target), full_check=True)


# ---------------------------------------------------------------------------------------------
# The per-chain gate


def test_weights_fed_at_run_time_compute_the_same_chain(rng):
    """Large weights enter a chain's sub-model as inputs fed from the store: same outputs, no copy."""
    built = CHAIN_FORMS["matmul_add_relu"](rng)
    loaded = from_proto(built.model)
    (chain,), _ = find_chains(loaded.model.graph, loaded.store)
    outputs = [loaded.model.graph.node[c.node].output[0] for c in chain.consumers]
    inline = extract(loaded.model, loaded.store, chain.producer.input, outputs, 12, onnx.TensorProto.FLOAT)
    fed, weights = extract_fed(loaded.model, loaded.store, chain.producer.input, outputs, 12, onnx.TensorProto.FLOAT, 0)
    onnx.checker.check_model(fed, full_check=True)
    assert len(fed.graph.initializer) == 0 and sorted(weights) == sorted(t.name for t in inline.graph.initializer)
    x = rng.standard_normal((64, 12)).astype(np.float32)
    (want,) = session(inline, "cpu").run(None, {chain.producer.input: x})
    (got,) = session(fed, "cpu").run(None, {chain.producer.input: x, **weights})
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)  # float32, same sums, maybe another kernel


@pytest.mark.parametrize("feed_min_bytes", [None, 0], ids=["inline", "fed"])
def test_every_chain_passes_its_certificate_on_onnxruntime(mlp_files, monkeypatch, feed_min_bytes):
    monkeypatch.setattr(validation, "FEED_MIN_BYTES", feed_min_bytes)
    source, target, report = mlp_files
    chains, failures, notes = validate_chains(source, target, device="cpu", probes=3000)
    assert failures == () and notes == ()
    assert [c.name for c in chains] == [l.name for l in report.layers]
    for chain, layer in zip(chains, report.layers):
        assert chain.ok and 0 < chain.max_abs <= chain.certified_bound + chain.tolerance
        assert chain.certified_bound == layer.certified_bound and chain.radius == layer.radius
        assert chain.probes >= 3000 and chain.probes_per_second > 0
        assert chain.tolerance < 1e-3 * chain.certified_bound  # float32 rounding, not slack


def test_a_wrong_certificate_fails_the_gate(mlp_files):
    source, target, _ = mlp_files

    def shrink(proto):
        entry = next(p for p in proto.metadata_props if p.key == LAYERS_KEY)
        layers = json.loads(entry.value)
        layers[0]["certified_bound"] = 1e-6
        entry.value = json.dumps(layers)

    _rewrite(target, shrink)
    chains, failures, _ = validate_chains(source, target, device="cpu", probes=500)
    assert not chains[0].ok and chains[1].ok
    assert len(failures) == 1 and failures[0].startswith(f"chain {chains[0].name} moved by")


@pytest.mark.parametrize("feed_min_bytes", [None, 0], ids=["inline", "fed"])
def test_tampered_weights_fail_the_gate(mlp_files, monkeypatch, feed_min_bytes):
    monkeypatch.setattr(validation, "FEED_MIN_BYTES", feed_min_bytes)
    source, target, report = mlp_files
    weight = "fc3.weight"  # the last chain's consumer

    def triple(proto):
        tensor = next(t for t in proto.graph.initializer if t.name == weight)
        tensor.CopyFrom(onnx.numpy_helper.from_array(3 * onnx.numpy_helper.to_array(tensor), weight))

    _rewrite(target, triple)
    chains, failures, _ = validate_chains(source, target, device="cpu", probes=500)
    assert [c.ok for c in chains] == [True, False]


def test_earlier_selections_are_replayed_only_where_a_later_chain_reads_them(tmp_path, monkeypatch):
    """An MLP's second chain reads the first chain's consumer: replayed. FFN blocks share nothing: never."""
    from onnxcoreset import surgery

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import gen_big_models as gen

    replayed = []
    real_apply = surgery.apply
    monkeypatch.setattr(surgery, "apply", lambda chain, *rest: (replayed.append(chain.name), real_apply(chain, *rest))[1])
    mlp, mlp_out = tmp_path / "mlp.onnx", tmp_path / "mlp_pruned.onnx"
    onnx.save(build_mlp.build(0, (12, 40, 24, 16, 5)), mlp)
    prune_file(mlp, mlp_out, PruneConfig(keep=0.5, beta=3.0), validate=False)
    replayed.clear()
    chains, failures, _ = validate_chains(mlp, mlp_out, device="cpu", probes=200)
    assert len(chains) == 3 and failures == () and replayed == [chains[0].name, chains[1].name]

    ffn = gen.generate(gen.SPECS["quick_ffn_256x4"], tmp_path / "ffn")
    ffn_out = tmp_path / "ffn_pruned.onnx"
    prune_file(ffn, ffn_out, PruneConfig(keep=0.5), validate=False)
    replayed.clear()
    chains, failures, _ = validate_chains(ffn, ffn_out, device="cpu", probes=64)
    assert len(chains) == 4 and failures == () and replayed == []

    # The fed weights of external data are the memory map itself, not a copy.
    loaded = load(ffn)
    chain = find_chains(loaded.model.graph, loaded.store)[0][0]
    outputs = [loaded.model.graph.node[c.node].output[0] for c in chain.consumers]
    _, weights = extract_fed(loaded.model, loaded.store, chain.producer.input, outputs, 256, onnx.TensorProto.FLOAT,
                             validation.FEED_MIN_BYTES)
    assert weights and all(isinstance(w, np.memmap) or isinstance(w.base, np.memmap) for w in weights.values())


def test_default_chain_probes_share_one_budget_of_work(tmp_path, monkeypatch):
    """compare gives every chain the same random probes: CHAIN_PROBE_WORK over all chains' weights."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import gen_big_models as gen

    ffn = gen.generate(gen.SPECS["quick_ffn_256x4"], tmp_path / "ffn")  # 4 chains of 2 × 256×1024 weights
    pruned = tmp_path / "pruned.onnx"
    prune_file(ffn, pruned, PruneConfig(keep=0.5), validate=False)
    counts = {}
    for work in (1 << 28, 1 << 30):
        monkeypatch.setattr(validation, "CHAIN_PROBE_WORK", work)
        report = validation.compare(ffn, pruned, device="cpu", probes=4)
        assert report.ok and len(report.chains) == 4
        counts[work] = [c.probes for c in report.chains]  # random probes + the (same) adversarial points
    assert (1 << 28) // (4 * 2 * 256 * 1024) == 128 and (1 << 30) // (4 * 2 * 256 * 1024) == 512
    assert [b - a for a, b in zip(counts[1 << 28], counts[1 << 30])] == [512 - 128] * 4


def test_sessions_from_files_skip_prepacking_and_compare_holds_one_model_at_a_time(mlp_files, monkeypatch):
    """Prepacking would copy every matmul weight of a mapped model; two live sessions, both models."""
    import gc
    import weakref

    source, target, _ = mlp_files
    assert session(source, "cpu").get_session_options().get_session_config_entry("session.disable_prepacking") == "1"
    real_session, alive_at_creation, made = validation.session, [], []

    def tracked(model, device="auto"):
        gc.collect()
        alive_at_creation.append(sum(ref() is not None for ref in made))
        sess = real_session(model, device)
        made.append(weakref.ref(sess))
        return sess

    monkeypatch.setattr(validation, "session", tracked)
    report = validation.compare(source, target, device="cpu", probes=8, chain_probes=0)
    assert report.ok and alive_at_creation == [0, 0]


def test_models_without_a_plan_are_checked_end_to_end_only(tmp_path):
    source = tmp_path / "a.onnx"
    onnx.save(build_mlp.build(0, (6, 8, 3)), source)
    report = onnxcoreset.validate(source, source, device="cpu")
    assert report.ok and report.chains == () and "no onnxcoreset plan" in report.notes[0]


REPRESENTATIVE_FORMS = [
    "act_prelu_per_neuron_slope", "affine_constants_before_and_after", "bf16_cast_weights_relu",
    "fanout_two_consumers", "fp16_tanh_gelu", "gated_swiglu", "mlp_deep_3_chains", "mlp_gemm_alpha_beta",
    "mlp_matmul_3d_input", "ms_fast_gelu_with_bias", "sub_binary_step", "sub_erf_gelu_legacy_initializers",
]


def _gate_passes_for(name, tmp_path):
    built = CHAIN_FORMS[name](np.random.default_rng(7))
    source = tmp_path / f"{name}.onnx"
    onnx.save(built.model, source)
    report = prune_file(source, tmp_path / f"{name}_pruned.onnx", PruneConfig(keep=0.5, beta=2.0), device="cpu",
                        chain_probes=1000)
    assert report.validation.ok, report.validation.failures
    assert len(report.validation.chains) == len(report.layers) == built.chains
    for chain in report.validation.chains:
        assert chain.max_abs <= chain.certified_bound + chain.tolerance


@pytest.mark.parametrize("name", [n for n in REPRESENTATIVE_FORMS if n in CHAIN_FORMS])
def test_gate_passes_on_representative_chain_forms(name, tmp_path):
    _gate_passes_for(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CHAIN_FORMS))
def test_gate_passes_on_every_chain_form(name, tmp_path):
    _gate_passes_for(name, tmp_path)


def test_hundred_thousand_probes_of_a_wide_gelu_chain(tmp_path):
    """Batched probes: 100,000 points of a 96-384-96 GELU chain go through (speed is measured by tools/eval_bounds.py)."""
    from builders import float_input, init, model
    from onnx import helper

    rng = np.random.default_rng(0)
    d, n = 96, 384
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["m1"], name="up"),
        helper.make_node("Add", ["m1", "b1"], ["h"], name="up_bias"),
        helper.make_node("Gelu", ["h"], ["a"], name="gelu", domain="com.microsoft"),
        helper.make_node("MatMul", ["a", "W2"], ["y"], name="down"),
    ]
    inits = [init("W1", (rng.standard_normal((d, n)) / np.sqrt(d)).astype(np.float32)),
             init("b1", rng.standard_normal(n).astype(np.float32) * 0.1),
             init("W2", (rng.standard_normal((n, d)) / np.sqrt(n)).astype(np.float32))]
    proto = model(nodes, [float_input("x", ["batch", d])], [float_input("y", ["batch", d])], inits,
                  extra_opsets={"com.microsoft": 1})
    source, target = tmp_path / "ffn.onnx", tmp_path / "ffn_pruned.onnx"
    onnx.save(proto, source)
    prune_file(source, target, PruneConfig(keep=0.25, beta=10.0), chain_probes=0)
    (chain,), failures, _ = validate_chains(source, target, device="cpu", probes=100_000)
    assert failures == () and chain.ok and chain.probes >= 100_000 and chain.seconds > 0


# ---------------------------------------------------------------------------------------------
# The CLI's exit codes, end to end


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_prune_gate_exit_codes(tmp_path):
    source = tmp_path / "mlp.onnx"
    onnx.save(build_mlp.build(0, (12, 40, 24, 5)), source)
    ok = tmp_path / "ok.onnx"
    result = _cli("prune", source, ok, "--keep", "0.5", "--beta", "3", "--max-error", "1e9", "--chain-probes", "500")
    assert result.exit_code == 0, result.output
    assert ok.exists() and "validation passed" in result.output and "certified" in result.output
    refused = tmp_path / "refused.onnx"
    result = _cli("prune", source, refused, "--keep", "0.5", "--beta", "3", "--max-error", "1e-9", "--chain-probes", "100")
    assert result.exit_code == 1 and not refused.exists()
    assert f"validation failed; {refused} was not written" in result.output
    forced = tmp_path / "forced.onnx"
    result = _cli("prune", source, forced, "--keep", "0.5", "--beta", "3", "--max-error", "1e-9", "--force",
                  "--chain-probes", "100")
    assert result.exit_code == 1 and forced.exists()


def test_validate_exit_codes(mlp_files, tmp_path):
    source, target, _ = mlp_files
    result = _cli("validate", source, target, "--chain-probes", "500", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "layer fc1: max abs" in result.output and "passed" in result.output
    result = _cli("validate", source, target, "--max-error", "1e-9", "--chain-probes", "0")
    assert result.exit_code == 1 and "--max-error" in result.output
    _rewrite(target, lambda proto: next(
        t.CopyFrom(onnx.numpy_helper.from_array(3 * onnx.numpy_helper.to_array(t), t.name))
        for t in proto.graph.initializer if t.name == "fc3.weight"))
    result = _cli("validate", source, target, "--chain-probes", "200")
    assert result.exit_code == 1 and "EXCEEDED" in result.output and "its certified bound" in result.output
    result = _cli("validate", source, tmp_path / "missing.onnx")
    assert result.exit_code == 2


def test_cli_epsilon_beta_from_and_report(tmp_path, rng):
    source, target, report_path = tmp_path / "mlp.onnx", tmp_path / "eps.onnx", tmp_path / "report.json"
    onnx.save(build_mlp.build(0, (12, 40, 24, 5)), source)
    data = tmp_path / "inputs.npz"
    inputs = rng.uniform(0, 1, (200, 12)).astype(np.float32)
    np.savez(data, input=inputs)
    result = _cli("prune", source, target, "--epsilon", "3", "--beta-from", data, "--report", report_path,
                  "--chain-probes", "300")
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["beta"] == pytest.approx(float(np.max(np.linalg.norm(inputs.astype(np.float64), axis=1))), rel=1e-6)
    assert report["beta_source"] == f"measured on {data}" and report["epsilon"] == 3.0
    for layer in report["layers"]:
        assert layer["certified_bound"] <= 3.0 and layer["radius_kind"] == "certified"
        assert set(layer) >= {"radius", "certified_bound", "attained_error", "tightness", "theorem7_sample_size"}
    assert all(c["probes_per_second"] > 0 for c in report["validation"]["chains"])
    shown = _cli("inspect", target)
    assert "onnxcoreset.epsilon = 3.0" in shown.output and "attained_error" in shown.output
