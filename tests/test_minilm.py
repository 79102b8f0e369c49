"""all-MiniLM-L6-v2 as the four exports of models/export_minilm.py write it (slow: run with -m slow).

Pinned for every variant (opset 17 Erf-GELU subgraph / opset 20 Gelu op × legacy / dynamo exporter):
* the 6 FFN chains (384 -> 1536 GELU -> 384) are found, and the other 30 MatMuls are skipped for
  the stated reasons: Q/K/V are reshaped into heads (18), the attention output and FFN down
  projections feed a residual Add (12);
* keep 1.0 changes neither a weight nor an output bit;
* the pruned model runs in onnxruntime with dynamic batch and sequence length.
Skips when the exports are not built (``python models/export_minilm.py``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import onnxcoreset

BUILD = Path(__file__).resolve().parent.parent / "models" / "build"
VARIANTS = ("opset17_legacy", "opset17_dynamo", "opset20_legacy", "opset20_dynamo")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=VARIANTS)
def export(request) -> Path:
    path = BUILD / f"minilm_l6_{request.param}.onnx"
    if not path.exists():
        pytest.skip(f"{path.name} is not built: run python models/export_minilm.py")
    return path


def _run(model: onnx.ModelProto | Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(["last_hidden_state"], {i.name: feed[i.name] for i in session.get_inputs()})[0]


def _tokens(rng: np.random.Generator, batch: int, length: int) -> dict[str, np.ndarray]:
    ids = rng.integers(1000, 30000, (batch, length))
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    mask = np.ones((batch, length), dtype=np.int64)
    if batch > 1:
        mask[1, length - 2 :] = 0  # a padded second sentence
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros((batch, length), dtype=np.int64)}


def test_every_ffn_chain_is_found(export):
    report = onnxcoreset.inspect(export)
    assert [(c.activation, c.hidden_size, c.params) for c in report.chains] == [("gelu", 1536, 384 * 1536 * 2 + 1536)] * 6
    reasons = [s.reason for s in report.skipped]
    assert len(reasons) == 30
    assert sum("before any consumer: its features are regrouped" in r and "(Reshape)" in r for r in reasons) == 18
    assert sum("(a residual connection)" in r for r in reasons) == 12


def test_keep_all_changes_nothing(export):
    original = onnx.load(export)
    pruned, report = onnxcoreset.prune(original, keep=1.0)
    assert [l.neurons_after for l in report.layers] == [1536] * 6
    before = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    for tensor in pruned.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), before[tensor.name])
    feed = _tokens(np.random.default_rng(0), 2, 9)
    np.testing.assert_array_equal(_run(pruned, feed), _run(export, feed))


def test_pruned_model_runs_with_dynamic_batch_and_sequence(export):
    pruned, report = onnxcoreset.prune(export, keep=0.5, method="percentile")
    assert [l.neurons_after for l in report.layers] == [768] * 6
    assert all(l.radius_certified for l in report.layers)  # LayerNormalization output: certified radius
    rng = np.random.default_rng(1)
    for batch, length in ((2, 7), (1, 3)):
        feed = _tokens(rng, batch, length)
        got, want = _run(pruned, feed), _run(export, feed)
        assert got.shape == want.shape == (batch, length, 384)
        assert np.all(np.isfinite(got))
        cosine = np.sum(got * want, axis=-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
        assert np.median(cosine) > 0.5  # half of every FFN removed: changed, but still the same model
