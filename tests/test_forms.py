"""The standard set of tests every registered chain form goes through (see tests/builders.py).

Tolerances: keep-all must be bit-for-bit; onnxruntime against onnx's numpy reference evaluator
on the same pruned weights within 1e-5 relative + 1e-5 absolute (float32 accumulation order);
dropping neurons whose outgoing weights are zero must be exact within 1e-5 (float32 sums).
The MLP forms with a numpy reference (builders.NUMPY_REFERENCES) are also compared with a float64
forward pass of their ORIGINAL weights, sliced and rescaled by the report's kept/scale plan: 1e-5
relative + 1e-5 of the output's largest magnitude.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import CHAIN_FORMS, NUMPY_REFERENCES, constants_of
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxcoreset
from onnxcoreset.chains import find_chains
from onnxcoreset.io import from_proto

FORMS = sorted(CHAIN_FORMS)


def run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.fixture(params=FORMS)
def built(request, rng):
    return CHAIN_FORMS[request.param](rng)


def test_inspect_finds_every_chain(built):
    report = onnxcoreset.inspect(built.model)
    assert len(report.chains) == built.chains, report.skipped
    if built.activations:
        assert tuple(c.activation for c in report.chains) == built.activations


def test_keep_all_is_bit_exact(built):
    pruned, report = onnxcoreset.prune(built.model, keep=1.0)
    assert all(l.neurons_after == l.neurons_before for l in report.layers)
    for name, value in initializers(built.model).items():
        np.testing.assert_array_equal(initializers(pruned)[name], value)
    for a, b in zip(run(built.model, built.feed), run(pruned, built.feed)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("method", ["coreset", "uniform", "percentile"])
def test_pruned_model_is_valid_and_matches_numpy_reference(built, method):
    pruned, report = onnxcoreset.prune(built.model, keep=0.5, method=method, seed=3)
    assert len(report.layers) == built.chains
    assert all(l.neurons_after < l.neurons_before for l in report.layers)
    assert report.params_after < report.params_before
    onnx.checker.check_model(pruned, full_check=True)
    assert pruned.ir_version == built.model.ir_version
    assert [(o.domain, o.version) for o in pruned.opset_import] == [(o.domain, o.version) for o in built.model.opset_import]
    assert [i.name for i in pruned.graph.input] == [i.name for i in built.model.graph.input]
    assert [o.name for o in pruned.graph.output] == [o.name for o in built.model.graph.output]
    outputs = run(pruned, built.feed)
    for got, original in zip(outputs, run(built.model, built.feed)):
        assert got.shape == original.shape
    if not built.notes.get("no_reference"):
        expected = ReferenceEvaluator(pruned).run(None, built.feed)
        for got, want in zip(outputs, expected):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dropping_neurons_without_outgoing_weight_is_exact(built):
    """Zero the consumers' weights of half the neurons of every chain: the coreset drops exactly those."""
    model = onnx.ModelProto()
    model.CopyFrom(built.model)
    loaded = from_proto(model)
    chains, _ = find_chains(loaded.model.graph, loaded.store)
    silent = {}
    for chain in chains:
        dead = np.arange(0, chain.size, 2)
        silent[chain.name] = chain.size - dead.size
        for consumer in chain.consumers:
            value = np.array(loaded.store.read(consumer.weight.tensor))
            index = [slice(None)] * value.ndim
            index[consumer.weight.neuron_axis] = dead
            value[tuple(index)] = 0
            loaded.store.write(consumer.weight.tensor, value)
    loaded.store.materialize()
    zeroed = loaded.model
    if len(chains) > 1:
        pytest.skip("with several chains, later chains' inputs change; covered by single-chain forms")
    pruned, report = onnxcoreset.prune(zeroed, neurons=max(silent.values()))
    assert [l.neurons_after for l in report.layers] == [silent[l.name] for l in report.layers]
    for a, b in zip(run(zeroed, built.feed), run(pruned, built.feed)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


# ---- pruned model against a numpy forward pass of the original weights with the report's plan ----


@pytest.mark.parametrize("method", ["coreset", "uniform", "percentile"])
@pytest.mark.parametrize("name", sorted(NUMPY_REFERENCES))
def test_pruned_model_equals_numpy_forward_of_the_plan(name, method, rng):
    """onnxruntime on the pruned model == float64 numpy on the ORIGINAL weights, sliced and rescaled by hand
    with the kept indices and scales the report lists (so the plan can be replayed).

    Tolerance: 1e-5 relative, plus 1e-5 of the output's largest magnitude for entries near zero
    (float32 inference against float64; the layers here sum at most 30 terms).
    """
    built = CHAIN_FORMS[name](rng)
    pruned, report = onnxcoreset.prune(built.model, keep=0.5, method=method, seed=7)
    assert len(report.layers) == built.chains
    plan = [(np.asarray(l.kept, np.int64), np.asarray(l.scale, np.float64)) for l in report.layers]
    for layer, (kept, scale) in zip(report.layers, plan):
        assert kept.size == scale.size == layer.neurons_after < layer.neurons_before
        assert np.all(np.diff(kept) > 0) and kept[0] >= 0 and kept[-1] < layer.neurons_before
        if method == "percentile":
            assert np.all(scale == 1.0)
        else:  # the sampled methods reweight: a test that ignored the scales could not pass
            assert np.any(np.abs(scale - 1.0) > 1e-3)
    original = constants_of(built.model)
    for got, want in zip(run(pruned, built.feed), NUMPY_REFERENCES[name](original, built.feed, plan), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # the reference itself is the original model when nothing is pruned
    for got, want in zip(run(built.model, built.feed), NUMPY_REFERENCES[name](original, built.feed, []), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
