"""Mutation fuzzing of the command line (the engine is tools/fuzz.py).

Every mutant of every registered chain form (and of a few edge forms: Constant weights, If
subgraphs, external data, unsorted nodes) goes through ``prune`` and ``inspect`` in-process. Each
run must end within its time limit with exit 0, 1 or 2, one line on stderr when it fails and
none when it succeeds, no traceback, no leftover or partial file, and the input unchanged.

The default run takes a few hundred mutants (about 20 s); ``pytest -m slow`` runs thousands in
worker processes, with the MNIST models of ../shared as seeds too when they are present.
Set ONNXCORESET_FUZZ_SEED to explore other mutants than the fixed default ones.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MUTANTS = 300
MASTER_SEED = int(os.environ.get("ONNXCORESET_FUZZ_SEED", "0"))


def _load_fuzz():
    spec = importlib.util.spec_from_file_location("onnxcoreset_fuzz", REPO / "tools" / "fuzz.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


fuzz = _load_fuzz()


def test_mutants_end_cleanly_with_a_documented_exit_code():
    summary = fuzz.fuzz_in_process(MUTANTS, master_seed=MASTER_SEED, include_shared=False, timeout=30.0)
    report = summary.render()
    assert summary.mutants == MUTANTS and summary.runs == 2 * MUTANTS
    assert summary.violations == [], report
    assert {code for _, code in summary.codes} <= {0, 1, 2}, report
    # the mutants must reach every stage: refused at load, refused later, and pruned for real
    for command in ("prune", "inspect"):
        assert summary.codes[(command, 0)] >= 10, report
        assert summary.codes[(command, 2)] >= 10, report
    assert sum(1 for (_, code, _) in summary.table if code == 2) >= 20, report  # many distinct reasons


def test_every_extra_seed_is_valid_and_prunes_cleanly(tmp_path):
    """Unmutated, every seed must pass, or its mutants prove nothing (the chain forms' own tests cover theirs)."""
    for seed in [s for s in fuzz.seeds(include_shared=False) if not s.name.startswith("form:")]:
        folder = tmp_path / seed.name.replace(":", "_")
        folder.mkdir()
        fuzz.write_seed(seed, folder)
        outcomes = fuzz.run_commands(folder, timeout=60.0)
        assert [(o.command, o.exit_code) for o in outcomes] == [("prune", 0), ("inspect", 0)], (seed.name, outcomes)
        assert all(not o.violations for o in outcomes), (seed.name, outcomes)


def test_mutants_are_reproducible(tmp_path):
    seeds = fuzz.seeds(include_shared=False)
    contents = []
    for run in ("a", "b"):
        folder = tmp_path / run
        folder.mkdir()
        fuzz.write_seed(fuzz.pick_seed(seeds, 41), folder)
        label = fuzz.mutate(folder, fuzz.mutant_rng(3, 41))
        contents.append((label, {p.name: p.read_bytes() for p in folder.iterdir()}))
    assert contents[0] == contents[1]


def test_the_checks_catch_a_violation(tmp_path, monkeypatch):
    """A command that crashes, leaves a temporary file and touches its input is reported three times over."""
    from onnxcoreset import cli

    seed = fuzz.seeds(include_shared=False)[0]
    fuzz.write_seed(seed, tmp_path)

    def misbehaving(loaded, target, *args, **kwargs):
        (tmp_path / ".out.onnx.tmp").write_bytes(b"half")
        with open(tmp_path / fuzz.MODEL_NAME, "ab") as handle:
            handle.write(b"\0")
        raise RuntimeError("boom")

    monkeypatch.setattr("onnxcoreset.io.stage", misbehaving)
    outcomes = {o.command: o for o in fuzz.run_commands(tmp_path, timeout=30.0)}
    violations = " | ".join(outcomes["prune"].violations)
    assert outcomes["prune"].exit_code == 3
    assert "exit code 3" in violations and "files left ['.out.onnx.tmp']" in violations and "input files changed" in violations
    assert cli.EXIT_INTERNAL == 3


def test_hangs_are_cut_off(tmp_path, monkeypatch):
    import time

    fuzz.write_seed(fuzz.seeds(include_shared=False)[0], tmp_path)
    monkeypatch.setattr("onnxcoreset.pipeline.find_chains", lambda *a, **k: time.sleep(30))
    started = time.perf_counter()
    outcomes = fuzz.run_commands(tmp_path, timeout=0.5)
    assert time.perf_counter() - started < 5
    assert [o.exit_code for o in outcomes] == ["hang", "hang"]


def test_message_template_groups_like_failures():
    folder = Path("/tmp/x")
    a = fuzz.message_template("onnxcoreset: error: /tmp/x/model.onnx: tensor 'W1' declares shape [3, 4] (48 bytes) but stores 12 bytes\n", folder)
    b = fuzz.message_template("onnxcoreset: error: /tmp/x/model.onnx: tensor 'fc.weight' declares shape [9] (36 bytes) but stores 0 bytes", folder)
    assert a == b == "onnxcoreset: error: <dir>/model.onnx: tensor '…' declares shape […] (N bytes) but stores N bytes"


@pytest.mark.slow
def test_long_fuzz_run():
    """Thousands of mutants in worker processes (a native crash or hang is caught there too)."""
    summary = fuzz.fuzz_in_workers(5000, MASTER_SEED, include_shared=True, timeout=fuzz.DEFAULT_TIMEOUT_S,
                                   jobs=os.cpu_count() or 1, progress=False)
    assert summary.mutants == 5000
    assert summary.violations == [], summary.render()


def test_summary_lists_validation_gate_failures_by_mutant():
    """Exit 1 is allowed (the gate refused a pruned mutant), but the summary names each one for a look."""
    summary = fuzz.Summary()
    outcome = {"command": "prune", "exit_code": 1, "message": "m", "violations": [], "seconds": 0.1}
    summary.add({"index": 7, "seed": "form:x", "mutation": "rewire", "outcomes": [outcome, dict(outcome, command="inspect", exit_code=0)]})
    assert summary.gate_failures == ["mutant 7 (form:x; rewire): prune"]
    assert "validation gate failures (exit 1, nothing written): 1\n  mutant 7 (form:x; rewire): prune" in summary.render()
