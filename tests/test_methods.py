"""The accuracy methods: coreset-vr, refit consumers (ball-ls, data-ls), data sups, auto and --budget.

Statistical tests use fixed seeds and a tolerance of 4 standard errors of the Monte-Carlo mean.
Models are small MLPs written here with tests/builders.py helpers; pruned models are checked
with onnx.checker and run in onnxruntime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import float_input, init, model
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from onnxcoreset import activations, bounds, compensate, coreset, strategy
from onnxcoreset.calibration import Samples
from onnxcoreset.cli import main
from onnxcoreset.errors import UsageError
from onnxcoreset.neurons import HiddenLayer
from onnxcoreset.pipeline import PruneConfig, prune, prune_file

HEAVY = np.array([9.0, 6.0, 3.0, 1.0, 1.0, 0.8, 0.5, 0.5, 0.4, 0.3, 0.2, 0.2, 0.1, 0.05])


# ---------------------------------------------------------------------------------------------
# coreset-vr


def test_inclusion_probabilities_take_heavy_neurons_for_certain():
    """m = 5 over HEAVY: 9 and 6 have m·pr ≥ 1; then 3 has 3·3/(Σ rest) ≥ 1 on the remainder; the last
    two places are shared by the rest in proportion, and Σπ = 5 exactly."""
    pi = coreset.inclusion_probabilities(HEAVY, 5)
    assert list(np.flatnonzero(pi == 1.0)) == [0, 1, 2]
    rest = HEAVY[3:]
    np.testing.assert_allclose(pi[3:], 2 * rest / rest.sum(), rtol=1e-12)
    assert pi.sum() == pytest.approx(5.0, abs=1e-12)


@pytest.mark.parametrize("scheme", coreset.VR_SCHEMES)
def test_coreset_vr_is_unbiased_and_keeps_exactly_the_target(scheme):
    """E[Σ_{j kept} scale_j·v_j] = Σ_j v_j for any values v (here one consumer's w(j)·ψ_j), over 4,000
    seeded draws: within 4 standard errors. Inclusion frequencies match π within 4 standard errors."""
    rng = np.random.default_rng(11)
    values = rng.standard_normal(HEAVY.size) * HEAVY  # heavy neurons carry large terms, as s(j) says
    target = 6
    pi = coreset.inclusion_probabilities(HEAVY, target)
    draws = 4000
    estimates = np.empty(draws)
    seen = np.zeros(HEAVY.size)
    for t in range(draws):
        selection = coreset.variance_reduced(HEAVY, target, rng, scheme)
        assert selection.size == target and len(set(selection.kept)) == target
        np.testing.assert_allclose(selection.scale[pi[selection.kept] >= 1.0], 1.0)
        estimates[t] = selection.scale @ values[selection.kept]
        seen[selection.kept] += 1
    error = abs(estimates.mean() - values.sum())
    assert error <= 4 * estimates.std() / np.sqrt(draws), (estimates.mean(), values.sum())
    spread = np.sqrt(np.maximum(pi * (1 - pi), 1e-12) / draws)
    assert np.all(np.abs(seen / draws - pi) <= 4 * spread + 1e-12)


def test_coreset_vr_has_less_variance_than_algorithm_2():
    """Same target, same values: the variance-reduced estimate's spread is below the i.i.d. one's."""
    rng = np.random.default_rng(3)
    values = rng.standard_normal(HEAVY.size) * HEAVY
    vr_estimates, iid_estimates = [], []
    for _ in range(2000):
        s = coreset.variance_reduced(HEAVY, 6, rng)
        vr_estimates.append(s.scale @ values[s.kept])
        s = coreset.sample(HEAVY, 6, rng)
        iid_estimates.append(s.scale @ values[s.kept])
    assert np.std(vr_estimates) < 0.5 * np.std(iid_estimates)


def test_coreset_vr_is_selectable_and_keeps_everything_positive_when_few():
    rng = np.random.default_rng(0)
    weights = np.array([0.0, 2.0, 0.0, 1.0])
    selection = coreset.select("coreset-vr", sensitivity=weights, point_norms=weights, target=3, rng=rng)
    assert list(selection.kept) == [1, 3] and np.all(selection.scale == 1.0)


# ---------------------------------------------------------------------------------------------
# Budget allocation


def test_allocate_budget_respects_the_budget_and_finds_the_best_split():
    """Two layers with separable costs: the greedy split equals the brute-force best on this convex case."""
    counts = [np.array([1, 2, 4, 8]), np.array([1, 3, 6])]
    errors = [np.array([8.0, 4.0, 2.0, 1.0]), np.array([9.0, 3.0, 1.0])]

    def cost(k):
        return 10.0 * k[0] + 20.0 * k[1]

    for budget in (30.0, 90.0, 140.0, 200.0):
        chosen = coreset.allocate_budget(counts, errors, cost, budget)
        assert cost(chosen) <= budget
        best = min(
            (errors[0][i] + errors[1][j], (int(a), int(b)))
            for i, a in enumerate(counts[0]) for j, b in enumerate(counts[1]) if cost((a, b)) <= budget
        )
        assert errors[0][list(counts[0]).index(chosen[0])] + errors[1][list(counts[1]).index(chosen[1])] == best[0]


def mlp(rng: np.random.Generator, sizes=(12, 24, 16, 5), bias_after_last: bool = True) -> onnx.ModelProto:
    """x -> Gemm -> Relu -> Gemm -> Relu -> Gemm -> y with torch-style [out, in] weights: two chains."""
    nodes, inits = [], []
    current = "x"
    for i, (d, n) in enumerate(zip(sizes, sizes[1:])):
        w = (rng.standard_normal((n, d)) / np.sqrt(d)).astype(np.float32)
        inputs = [current, f"W{i}"]
        inits.append(init(f"W{i}", w))
        if i < len(sizes) - 2 or bias_after_last:
            inits.append(init(f"b{i}", (0.3 * rng.standard_normal(n)).astype(np.float32)))
            inputs.append(f"b{i}")
        out = "y" if i == len(sizes) - 2 else f"h{i}"
        nodes.append(helper.make_node("Gemm", inputs, [out], name=f"fc{i}", transB=1))
        if out != "y":
            nodes.append(helper.make_node("Relu", [out], [f"a{i}"], name=f"relu{i}"))
            current = f"a{i}"
    return model(nodes, [float_input("x", ["batch", sizes[0]])], [float_input("y", ["batch", sizes[-1]])], inits)


def run(built: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    onnx.checker.check_model(built, full_check=True)
    session = ort.InferenceSession(built.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.astype(np.float32)})[0].astype(np.float64)


def test_budget_respects_the_total_and_spreads_unevenly():
    """--budget 0.4 on a 12-24-16-5 MLP: the chains' tensors keep at most 40% of their parameters in
    all (counted exactly, the shared middle matrix once), and the model still runs."""
    rng = np.random.default_rng(5)
    original = mlp(rng)
    pruned, report = prune(original, PruneConfig(budget=0.4, method="greedy-ls", reweight="ball-ls", beta=3.0))
    sizes = {t.name: int(np.prod(t.dims)) for t in original.graph.initializer}
    after = {t.name: int(np.prod(t.dims)) for t in pruned.graph.initializer}
    chain_tensors = ["W0", "b0", "W1", "b1", "W2"]
    assert sum(after[t] for t in chain_tensors) <= 0.4 * sum(sizes[t] for t in chain_tensors)
    assert all(layer.note.startswith("--budget 0.4 gives this chain") for layer in report.layers)
    assert np.all(np.isfinite(run(pruned, rng.standard_normal((4, 12)))))


# ---------------------------------------------------------------------------------------------
# Refit consumers in the pipeline


def duplicated_mlp(rng: np.random.Generator) -> onnx.ModelProto:
    """8 independent ReLU neurons and 8 positive multiples of them (relu(c·z) = c·relu(z)): any 8
    spanning neurons reproduce the layer exactly after a least-squares refit."""
    d, base, k = 6, 8, 3
    w = rng.standard_normal((base, d)) / np.sqrt(d)
    b = 0.2 * rng.standard_normal(base)
    factors = rng.uniform(0.5, 3.0, base)
    order = rng.permutation(2 * base)
    w1 = np.vstack([w, factors[:, None] * w])[order].astype(np.float32)
    b1 = np.concatenate([b, factors * b])[order].astype(np.float32)
    w2 = (rng.standard_normal((k, 2 * base)) / 4).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        helper.make_node("Gemm", ["a", "W2", "b2"], ["y"], name="fc2", transB=1),
    ]
    inits = [init("W1", w1), init("b1", b1), init("W2", w2), init("b2", rng.standard_normal(k).astype(np.float32))]
    return model(nodes, [float_input("x", ["batch", d])], [float_input("y", ["batch", k])], inits)


@pytest.mark.parametrize("reweight", ["data-ls", "ball-ls"])
def test_refit_is_exact_when_dropped_neurons_are_multiples_of_kept_ones(reweight):
    """Keeping 8 of 16 neurons by greedy-ls, both refits reproduce the original outputs on fresh inputs
    to float32 rounding (1e-4 of the output scale); keeping the weights as they are does not (> 0.1)."""
    rng = np.random.default_rng(2)
    original = duplicated_mlp(rng)
    calibration = {"x": rng.standard_normal((300, 6)).astype(np.float32)}
    pruned, report = prune(original, PruneConfig(keep=0.5, method="greedy-ls", reweight=reweight, beta=3.0),
                           calibration=calibration)
    x = rng.standard_normal((200, 6))
    expected = run(original, x)
    scale = np.abs(expected).max()
    assert np.abs(run(pruned, x) - expected).max() <= 1e-4 * scale
    assert report.layers[0].neurons_after == 8 and report.layers[0].reweight == reweight
    plain, _ = prune(original, PruneConfig(keep=0.5, method="sensitivity", beta=3.0))
    assert np.abs(run(plain, x) - expected).max() > 0.1 * scale


def test_refit_without_consumer_bias_skips_the_correction_and_says_so():
    """The last consumer has no bias (Gemm without C): its refit has δ = 0, the report names it, and
    the bias of the other consumer is shifted (the model still checks and runs)."""
    rng = np.random.default_rng(4)
    original = mlp(rng, bias_after_last=False)
    calibration = {"x": rng.standard_normal((200, 12)).astype(np.float32)}
    pruned, report = prune(original, PruneConfig(keep=0.5, method="sensitivity", reweight="data-ls", beta=3.0),
                           calibration=calibration)
    first, second = report.layers
    assert "bias correction" not in first.choice
    assert "fc2 has no bias" in second.choice and "bias correction is skipped" in second.choice
    assert np.all(np.isfinite(run(pruned, rng.standard_normal((3, 12)))))
    names = {t.name for t in pruned.graph.initializer}
    assert names == {t.name for t in original.graph.initializer}  # no tensor added


def test_refit_lowers_the_error_on_calibration_data():
    """On held-in calibration data the data-ls model is closer to the original than the plain selection."""
    rng = np.random.default_rng(8)
    original = mlp(rng, sizes=(12, 40, 30, 5))
    x = rng.standard_normal((400, 12)).astype(np.float32)
    expected = run(original, x)
    errors = {}
    for reweight in ("none", "data-ls"):
        pruned, _ = prune(original, PruneConfig(keep=0.4, method="sensitivity", reweight=reweight, beta=3.0),
                          calibration={"x": x})
        errors[reweight] = np.mean((run(pruned, x) - expected) ** 2)
    assert errors["data-ls"] < 0.5 * errors["none"]


def test_certified_bound_is_checked_by_validation_after_refit(tmp_path: Path):
    """prune_file validates every checkable chain against its certified bound on 3,000 probes and the
    adversarial points: the refit model passes, with the first chain checked one by one."""
    rng = np.random.default_rng(9)
    source = tmp_path / "mlp.onnx"
    onnx.save(mlp(rng), source)
    report = prune_file(source, tmp_path / "out.onnx", PruneConfig(keep=0.5, method="auto", beta=2.0), chain_probes=3000)
    assert report.validation is not None and report.validation.ok, report.validation
    assert report.validation.chains and report.validation.chains[0].ok


ACTIVATIONS = ["relu", "tanh", "gelu", "sigmoid"]


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), name=st.sampled_from(ACTIVATIONS), keep=st.integers(1, 9))
def test_refit_certificate_is_sound(seed, name, keep):
    """No probe in the ball, nor the gradient search's points, exceeds the certified bound of a random
    refit (arbitrary new weights u and bias shift δ): e_i = Σ_j (w − u)_ij ψ_j − δ_i."""
    rng = np.random.default_rng(seed)
    d, n, k = 5, 10, 3
    layer = HiddenLayer(
        rng.standard_normal((n, d)), rng.standard_normal(n), activations.make(name), np.ones(n), np.zeros(n),
        rng.standard_normal((k, n)),
    )
    kept = np.sort(rng.choice(n, keep, replace=False))
    refit = compensate.Refit(layer.out_weights[:, kept] + 0.3 * rng.standard_normal((k, keep)), 0.5 * rng.standard_normal(k))
    radius = 1.5
    bound = bounds.certified_bound(layer, kept, None, radius, weights=refit.weights, bias_shift=refit.bias_shift)
    points = compensate.ball(20000, d, radius, rng)
    coef = bounds.coefficients(layer.out_weights, kept, refit.weights)
    worst = np.abs(layer.hidden(points) @ coef.T - refit.bias_shift).max()
    assert worst <= bound * (1 + 1e-9)
    # the shift counts: a shift larger than any Σcψ shows up in the bound
    assert bound >= np.abs(refit.bias_shift).max() - np.abs(coef).sum(axis=1).max() * bounds.activation_sup(layer, radius).max()


# ---------------------------------------------------------------------------------------------
# auto


def synthetic_context(rng: np.random.Generator, data: bool) -> strategy.Context:
    d, n, k = 6, 20, 4
    layer = HiddenLayer(
        rng.standard_normal((n, d)) / np.sqrt(d), 0.2 * rng.standard_normal(n), activations.make("relu"),
        np.ones(n), np.zeros(n), rng.standard_normal((k, n)) / np.sqrt(n),
    )

    def samples(count: int, source: str) -> Samples:
        hidden = layer.hidden(rng.standard_normal((count, d)) + (0.5 if source == "data" else 0.0))
        return Samples(hidden, hidden, np.arange(count), source)

    return strategy.Context(layer, 3.0, 7, np.random.default_rng(1), np.ones(k, dtype=bool),
                            samples(600, "data") if data else None, samples(2000, "probes"))


@pytest.mark.parametrize("data", [False, True])
def test_auto_picks_the_lowest_measured_error(data):
    """auto's choice has the smallest held-out error of every applicable pair, each re-measured here."""
    context = synthetic_context(np.random.default_rng(6), data)
    plan = strategy.plan(context, "auto")
    held = context.moments("data" if data else "probes", "holdout")
    seeds = np.random.default_rng(1).integers(0, 2**63 - 1, size=len(strategy.applicable("auto", "none", "ball", data)))
    measured = {}
    for choice, seed in zip(strategy.applicable("auto", "none", "ball", data), seeds):
        selection, _ = strategy._select(choice, context, "fit", np.random.default_rng(int(seed)))
        refit = strategy._refit(choice, context, selection, "fit")
        measured[choice] = strategy.relative_error(held, context.layer.out_weights, selection, refit)
    assert len(measured) == (27 if data else 12)
    assert plan.error == pytest.approx(min(measured.values()), rel=1e-12)
    assert measured[plan.choice] == pytest.approx(plan.error, rel=1e-12)
    assert plan.explanation.startswith(f"auto chose {plan.choice.label}")


def test_auto_breaks_ties_by_the_certified_bound():
    """Keeping everything, every choice is exact (error 0 up to float64 rounding): the bound callback decides."""
    context = synthetic_context(np.random.default_rng(6), False)
    context = strategy.Context(context.layer, context.radius, context.layer.size, context.rng, context.bias, None, context.probes)
    calls = []

    def bound(selection, refit):
        calls.append(selection)
        return float(len(calls))  # the first tied choice has the smallest "bound"

    plan = strategy.plan(context, "auto", bound=bound)
    assert plan.error < strategy.ROUNDOFF and len(calls) > 1 and "smallest certified bound" in plan.explanation


# ---------------------------------------------------------------------------------------------
# Usage errors


def test_data_methods_need_calibration_and_epsilon_needs_plain_methods(tmp_path: Path):
    rng = np.random.default_rng(1)
    path = tmp_path / "m.onnx"
    onnx.save(mlp(rng), path)
    out = tmp_path / "o.onnx"
    runner = CliRunner()
    result = runner.invoke(main, ["prune", str(path), str(out), "--keep", "0.5", "--reweight", "data-ls"])
    assert result.exit_code == 2 and "--reweight data-ls needs calibration data" in result.stderr
    np.savez(tmp_path / "bad.npz", other=np.zeros((4, 12), np.float32))
    result = runner.invoke(main, ["prune", str(path), str(out), "--keep", "0.5", "--sup", "rms", "--calibration", str(tmp_path / "bad.npz")])
    assert result.exit_code == 2 and "lacks model input(s) x" in result.stderr
    with pytest.raises(UsageError, match="--epsilon works with the plain selections"):
        PruneConfig(epsilon=0.1, method="auto")
    with pytest.raises(UsageError, match="--budget replaces"):
        PruneConfig(keep=0.5, budget=0.5)
    with pytest.raises(UsageError, match="--reweight must be one of"):
        PruneConfig(keep=0.5, reweight="magic")


def test_cli_calibrated_auto_reports_its_choice(tmp_path: Path):
    rng = np.random.default_rng(12)
    path = tmp_path / "m.onnx"
    onnx.save(mlp(rng), path)
    np.savez(tmp_path / "cal.npz", x=rng.standard_normal((300, 12)).astype(np.float32))
    result = CliRunner().invoke(main, ["prune", str(path), str(tmp_path / "o.onnx"), "--keep", "0.5", "--method", "auto",
                                       "--calibration", str(tmp_path / "cal.npz"), "--beta", "3", "--chain-probes", "0"])
    assert result.exit_code == 0, result.output
    assert result.output.count("auto chose") == 2 and "on held-out calibration data" in result.output


# ---------------------------------------------------------------------------------------------
# Every registered chain form, refit


FORMS = sorted(__import__("builders").CHAIN_FORMS)


@pytest.mark.parametrize("form", FORMS)
def test_refit_model_is_valid_on_every_chain_form(form):
    """greedy-ls + ball-ls at keep 0.5 on each form of tests/builders.py: the written model passes the
    full checker, runs in onnxruntime with the same output shapes, and stays finite."""
    from builders import CHAIN_FORMS

    built = CHAIN_FORMS[form](np.random.default_rng(1234))
    pruned, report = prune(built.model, PruneConfig(keep=0.5, method="greedy-ls", reweight="ball-ls", beta=2.0))
    onnx.checker.check_model(pruned, full_check=True)
    before = ort.InferenceSession(built.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, built.feed)
    after = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, built.feed)
    assert [a.shape for a in after] == [b.shape for b in before]
    assert all(np.all(np.isfinite(a)) for a in after if np.issubdtype(a.dtype, np.floating))
    assert all(layer.reweight == "ball-ls" for layer in report.layers)


def masked_model(rng: np.random.Generator) -> onnx.ModelProto:
    """x [batch, sequence, 6] -> MatMul-Add-Relu-MatMul-Add, times the attention mask [batch, sequence]."""
    d, n, k = 6, 10, 4
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["h"], name="add1"),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        helper.make_node("MatMul", ["a", "W2"], ["m2"], name="mm2"),
        helper.make_node("Add", ["m2", "b2"], ["raw"], name="add2"),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axes"], ["mask3"]),
        helper.make_node("Mul", ["raw", "mask3"], ["y"]),
    ]
    inits = [init("W1", rng.standard_normal((d, n)).astype(np.float32)), init("b1", rng.standard_normal(n).astype(np.float32)),
             init("W2", rng.standard_normal((n, k)).astype(np.float32)), init("b2", rng.standard_normal(k).astype(np.float32)),
             init("axes", np.array([-1], dtype=np.int64))]
    inputs = [float_input("x", ["batch", "sequence", d]),
              helper.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64, ["batch", "sequence"])]
    return model(nodes, inputs, [float_input("y", ["batch", "sequence", k])], inits)


def test_calibration_rows_leave_padding_out():
    """Padded positions (mask 0) hold huge values here: none reaches the chain's samples, whose rows
    are exactly the real tokens, grouped by sentence."""
    from onnxcoreset import calibration, io
    from onnxcoreset.chains import find_chains
    from onnxcoreset.neurons import read_layer

    rng = np.random.default_rng(3)
    original = masked_model(rng)
    mask = (np.arange(7)[None, :] < rng.integers(2, 8, size=(20, 1))).astype(np.int64)
    x = rng.standard_normal((20, 7, 6)).astype(np.float32)
    x[mask == 0] = 1e4
    loaded = io.from_proto(original)
    chains, _ = find_chains(loaded.model.graph, loaded.store)
    sources = calibration.Sources(loaded, chains, beta=3.0, data={"x": x, "attention_mask": mask}, probes=False)
    data, probes = sources.samples(chains[0], read_layer(chains[0], loaded.store), 3.0, np.random.default_rng(0))
    assert probes is None and data.rows == int(mask.sum())
    np.testing.assert_array_equal(np.bincount(data.group), mask.sum(axis=1))
    assert np.abs(data.original).max() < 1e3  # relu(W·1e4) would be ~1e4
    pruned, report = prune(original, PruneConfig(keep=0.5, method="greedy-ls", reweight="data-ls", beta=3.0),
                           calibration={"x": x, "attention_mask": mask})
    assert report.layers[0].measured_error < 0.5


def test_calibration_files_are_checked_and_cast(tmp_path: Path):
    """NaN in a calibration file is a usage error; float64 samples for a float32 input are cast; a budget
    below the smallest share the layers can take says so."""
    from onnxcoreset import calibration

    rng = np.random.default_rng(2)
    np.savez(tmp_path / "nan.npz", x=np.full((4, 12), np.nan))
    with pytest.raises(UsageError, match="holds NaN or Inf"):
        calibration.load(tmp_path / "nan.npz")
    original = mlp(rng)
    pruned, report = prune(original, PruneConfig(keep=0.5, reweight="data-ls", method="sensitivity", beta=3.0),
                           calibration={"x": rng.standard_normal((100, 12))})  # float64
    assert report.layers[0].measured_error is not None
    with pytest.raises(UsageError, match="input 'x' is float32, the file holds int64"):
        prune(original, PruneConfig(keep=0.5, reweight="data-ls", beta=3.0), calibration={"x": np.zeros((10, 12), np.int64)})
    with pytest.raises(UsageError, match="below the smallest share"):
        prune(original, PruneConfig(budget=0.01, beta=3.0))


def test_budget_error_curves_never_rise_with_more_neurons():
    context = synthetic_context(np.random.default_rng(6), True)
    counts = strategy.budget_counts([context.layer.size])[0]
    curve = strategy.error_curve(context, "auto", "none", "ball", counts)
    assert curve.shape == counts.shape and np.all(np.diff(curve) <= 0) and curve[-1] <= 1e-9
