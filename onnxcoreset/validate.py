"""The one module that runs models: onnxruntime sessions (CUDA when present), probes, deviations.

End to end, both models run on the same inputs: points drawn from the β ball (half on its
sphere, half inside) for float inputs, small non-negative integers for integer inputs (token ids,
masks), or a user's data file. Every output is compared by its largest absolute and mean absolute
deviation; shapes must agree and the pruned model must not turn finite values into NaN.

Chain by chain (:func:`validate_chains`), each pruned chain's sub-model (producer input →
consumer outputs) is cut from both graphs and run on points of the chain's input ball, including
the points where a gradient search finds the error largest; its change must stay within the
certified bound the pruned model records (``onnxcoreset.layers``) plus a worst-case rounding
allowance. Probes go through in batches of CHAIN_BATCH rows. With device ``auto`` the CUDA
provider is used where onnxruntime-gpu finds a GPU; every report names the provider that ran.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import attack, bounds
from .errors import ModelError, UsageError

log = logging.getLogger(__name__)

DEFAULT_PROBES = 64
DEFAULT_CHAIN_PROBES = 4096  # random points per pruned chain, besides the adversarial ones
MAX_PROBE_VALUES = 1 << 27  # random values in one batch of probes (1 GiB as float64)


@dataclass(frozen=True)
class OutputDeviation:
    name: str
    max_abs: float
    mean_l1: float
    shape_ok: bool = True


@dataclass(frozen=True)
class ValidationReport:
    provider: str
    probes: int
    outputs: tuple[OutputDeviation, ...]
    max_error: float | None = None
    failures: tuple[str, ...] = field(default_factory=tuple)
    chains: tuple[ChainDeviation, ...] = ()  # each pruned chain against its certified bound
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["ok"] = self.ok
        for entry, chain in zip(data["chains"], self.chains):
            entry["probes_per_second"] = chain.probes_per_second
        return data


def _ort():
    import onnxruntime as ort

    ort.set_default_logger_severity(4)  # its warnings and errors would break our one-line report (errors
    # come back as exceptions, which say the same on that line)
    return ort


def providers(device: str) -> list[str]:
    """The provider list for a device choice: CUDA first where onnxruntime-gpu has a usable GPU."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    ort = _ort()
    if "CUDAExecutionProvider" in ort.get_available_providers() and _gpu_present():
        if hasattr(ort, "preload_dlls"):
            try:
                ort.preload_dlls()
            except Exception:  # missing CUDA libraries show up as CPU fallback below
                log.debug("preload_dlls failed", exc_info=True)
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise UsageError("--device cuda: onnxruntime found no usable CUDA GPU on this machine")
    return ["CPUExecutionProvider"]


def _gpu_present() -> bool:
    return any(Path(p).exists() for p in ("/dev/nvidia0", "/dev/nvidiactl")) or bool(os.environ.get("ONNXCORESET_ASSUME_GPU"))


def session(model: str | Path | onnx.ModelProto | bytes, device: str = "auto"):
    """An InferenceSession, or ModelError with onnxruntime's reason on one line."""
    ort = _ort()
    options = ort.SessionOptions()
    options.log_severity_level = 4
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model) if isinstance(model, Path) else model
    if isinstance(source, str):
        # From a file, onnxruntime maps the weights rather than copying them, unless it prepacks
        # them for its matmul kernels: a second copy of the model, to speed up the few runs
        # validation makes by a little. Without it a 3.2 GB model's session costs its page cache.
        options.add_session_config_entry("session.disable_prepacking", "1")
    wanted = providers(device)
    try:
        sess = ort.InferenceSession(source, options, providers=wanted)
    except Exception as exc:
        raise ModelError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0][:300]}") from None
    if device == "cuda" and sess.get_providers()[0] != "CUDAExecutionProvider":
        raise UsageError("--device cuda: onnxruntime could not start the CUDA provider")
    return sess


_NUMPY_OF_ORT = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def probe_inputs(
    sess,
    count: int,
    beta: float,
    rng: np.random.Generator,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Feeds of ``count`` samples in total: one batch where the batch axis is free, else several."""
    shapes = dict(shapes or {})
    specs = []
    for arg in sess.get_inputs():
        if arg.type not in _NUMPY_OF_ORT:
            raise UsageError(f"input '{arg.name}' has type {arg.type}, which probes cannot be made for")
        if arg.name in shapes:
            shape = list(shapes[arg.name])
        else:
            shape = [d if isinstance(d, int) and d > 0 else None for d in arg.shape]
            if shape and shape[0] is None:
                shape[0] = -1  # the free batch axis carries all probes at once
            shape = [1 if d is None else d for d in shape]
        specs.append((arg.name, _NUMPY_OF_ORT[arg.type], shape))
    batch = max((s[0] for _, _, s in specs if s and s[0] > 0), default=1)
    free = any(s and s[0] == -1 for _, _, s in specs)
    per_feed = count if free else batch
    values = sum(math.prod(per_feed if d == -1 else d for d in shape) for _, _, shape in specs)
    if values > MAX_PROBE_VALUES:
        raise UsageError(
            f"the model's inputs declare {values:,} values per batch of probes, too many to draw at random; "
            "give --input-shape, --data or fewer --probes"
        )
    feeds = []
    done = 0
    while done < count:
        rows = min(per_feed, count - done) if free else per_feed
        feed = {}
        for name, dtype, shape in specs:
            concrete = [rows if d == -1 else d for d in shape]
            feed[name] = _random(dtype, concrete, beta, rng)
        feeds.append(feed)
        done += rows
    return feeds


def _random(dtype, shape: list[int], beta: float, rng: np.random.Generator) -> np.ndarray:
    if np.issubdtype(dtype, np.floating):
        rows = shape[0] if shape else 1
        flat = rng.standard_normal((rows, int(np.prod(shape[1:], dtype=np.int64)) if shape else 1))
        flat /= np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-30)
        radius = np.where(np.arange(rows) % 2 == 0, 1.0, rng.uniform(0, 1, rows) ** (1.0 / max(flat.shape[1], 1)))
        return (beta * radius[:, None] * flat).reshape(shape).astype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    return rng.integers(0, 2, shape).astype(dtype)


def compare(
    original,
    pruned,
    *,
    device: str = "auto",
    probes: int = DEFAULT_PROBES,
    beta: float = 1.0,
    seed: int = 0,
    shapes: Mapping[str, Sequence[int]] | None = None,
    data: Mapping[str, np.ndarray] | None = None,
    max_error: float | None = None,
    chain_probes: int = DEFAULT_CHAIN_PROBES,
) -> ValidationReport:
    """Run both models on the same inputs and measure how far every output moved.

    With ``chain_probes`` > 0, every chain recorded in the pruned model's metadata is also
    checked on its own against its certified bound (:func:`validate_chains`), on at most
    ``chain_probes`` random points each: fewer on large models (CHAIN_PROBE_WORK, a total over all
    chains), so that validation costs about as much as reading the model.
    """
    # One session at a time: the original's outputs are kept (small), its session freed before the
    # pruned model's is built, so peak memory holds one model, not both.
    reference = session(original, device)
    if data:
        feeds = [{k: np.asarray(v) for k, v in data.items() if k in {i.name for i in reference.get_inputs()}}]
        count = len(next(iter(feeds[0].values()))) if feeds[0] else 0
    else:
        feeds = probe_inputs(reference, probes, beta, np.random.default_rng(seed), shapes)
        count = probes
    names = [o.name for o in reference.get_outputs()]
    expected = [_run(reference, names, feed) for feed in feeds]
    del reference
    candidate = session(pruned, device)
    provider = candidate.get_providers()[0]
    if names != [o.name for o in candidate.get_outputs()]:
        return ValidationReport(provider, count, (), max_error, ("the output names differ",))
    worst = {n: 0.0 for n in names}
    total = {n: 0.0 for n in names}
    elements = {n: 0 for n in names}
    shape_ok = {n: True for n in names}
    failures: list[str] = []
    for feed, before in zip(feeds, expected):
        after = _run(candidate, names, feed)
        for name, a, b in zip(names, before, after):
            a, b = np.asarray(a), np.asarray(b)
            if a.shape != b.shape:
                shape_ok[name] = False
                continue
            if a.dtype.kind not in "fiub":
                continue
            with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: judged just below
                diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            if np.any(np.isfinite(a) & ~np.isfinite(b)):
                failures.append(f"output '{name}' has non-finite values where the original is finite")
            finite = diff[np.isfinite(diff)]
            worst[name] = max(worst[name], float(finite.max(initial=0.0)))
            total[name] += float(finite.sum())
            elements[name] += diff.size
    del candidate
    outputs = tuple(
        OutputDeviation(n, worst[n], total[n] / max(elements[n], 1), shape_ok[n]) for n in names
    )
    for out in outputs:
        if not out.shape_ok:
            failures.append(f"output '{out.name}' changed shape")
        if max_error is not None and out.max_abs > max_error:
            failures.append(f"output '{out.name}' moved by {out.max_abs:.4g} > --max-error {max_error:g}")
    chains: tuple[ChainDeviation, ...] = ()
    notes: tuple[str, ...] = ()
    if chain_probes > 0:
        chains, chain_failures, notes = validate_chains(original, pruned, device=device, probes=chain_probes, seed=seed,
                                                        max_work=CHAIN_PROBE_WORK)
        failures.extend(chain_failures)
    return ValidationReport(provider, count, outputs, max_error, tuple(dict.fromkeys(failures)), chains, notes)


# ---------------------------------------------------------------------------------------------
# Per-chain validation against the certificates, and measured radii

LAYERS_KEY = "onnxcoreset.layers"
PLAN_KEY = "onnxcoreset.plan"
CHAIN_BATCH = 16384  # probe rows per onnxruntime call on a chain sub-model
SEARCHED_MAX_ENTRIES = 1 << 21  # weights of a chain beyond which no adversarial search is run
# Multiply-adds of all chains' original sub-models over their random probes together: past this
# every chain gets fewer probes (MIN_CHAIN_PROBES at least), so that the default check of a
# multi-gigabyte model costs about as much as reading it, not 4096 inferences of every layer.
# MiniLM's six FFNs (384-1536-384) keep their 4096 probes each; 24 1024-4096 blocks get 170.
CHAIN_PROBE_WORK = 1 << 35
MIN_CHAIN_PROBES = 64
_F32_UNIT = 2.0**-24


def encode_plan(plan: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """{chain: (kept, scale)} as compact JSON: little-endian int32 / float64 in base64 (scale null if all 1)."""
    out = {}
    for name, (kept, scale) in plan.items():
        scale = np.asarray(scale, dtype="<f8")
        out[name] = {
            "kept": base64.b64encode(np.asarray(kept, dtype="<i4").tobytes()).decode("ascii"),
            "scale": None if np.all(scale == 1.0) else base64.b64encode(scale.tobytes()).decode("ascii"),
        }
    return json.dumps(out, sort_keys=True)


def decode_plan(text: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    plan = {}
    for name, entry in json.loads(text).items():
        kept = np.frombuffer(base64.b64decode(entry["kept"]), dtype="<i4").astype(np.int64)
        scale = np.ones(kept.size) if entry.get("scale") is None else np.frombuffer(base64.b64decode(entry["scale"]), dtype="<f8").copy()
        plan[name] = (kept, scale)
    return plan


@dataclass(frozen=True)
class ChainDeviation:
    """One pruned chain run on its own: original (as planned) against pruned, on its input ball."""

    name: str
    radius: float
    radius_kind: str
    certified_bound: float
    probes: int  # random points in the ball plus the adversarial points
    max_abs: float  # largest change of a consumer output over all probes
    adversarial_max_abs: float  # … over the adversarial points alone
    tolerance: float  # floating-point rounding allowance added to the certified bound
    seconds: float  # onnxruntime time for both sub-models
    ok: bool
    provider: str = ""  # the execution provider the sub-models ran on

    @property
    def probes_per_second(self) -> float:
        return self.probes / self.seconds if self.seconds > 0 else math.inf


def _metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def extract(model: onnx.ModelProto, store, source: str, outputs: Sequence[str], width: int, elem_type: int) -> onnx.ModelProto:
    """The sub-model computing ``outputs`` from the tensor ``source`` (fed as [rows, width]).

    Every node the outputs depend on back to ``source`` is kept, with the initializers it reads
    (current values from ``store``, so a replayed or pruned state is what runs); value_info is
    dropped so that onnxruntime infers the shapes of the 2-D feed.
    """
    return extract_fed(model, store, source, outputs, width, elem_type, feed_min_bytes=None)[0]


# Weights at least this large go into a chain's sub-model as graph inputs, fed at every run from
# the store (a memory map of the file, where it can be): copying them into a ModelProto and then
# into an onnxruntime session cost 20 s and two copies of the weights per 4096×16384 FFN block,
# for a check that runs the layer a few dozen times.
FEED_MIN_BYTES = 1 << 20
_FEEDABLE = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)}


def subgraph(model: onnx.ModelProto, source: str, outputs: Sequence[str]) -> tuple[list[int], list[str]]:
    """(node indices in topological order, initializer names) that ``outputs`` depend on back to ``source``."""
    graph = model.graph
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    initializers = {t.name for t in graph.initializer}
    needed, seen, nodes, used = list(outputs), set(), set(), []
    while needed:
        name = needed.pop()
        if not name or name in seen or name == source:
            continue
        seen.add(name)
        if name in initializers:
            used.append(name)
            continue
        if name not in producer:
            raise ModelError(f"chain sub-model: '{name}' depends on a model input other than '{source}'")
        nodes.add(producer[name])
        needed.extend(graph.node[producer[name]].input)
    return [i for i in _node_order(graph) if i in nodes], sorted(used)


def extract_fed(
    model: onnx.ModelProto, store, source: str, outputs: Sequence[str], width: int, elem_type: int,
    feed_min_bytes: int | None,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """:func:`extract`, with the weights of at least ``feed_min_bytes`` (None: none) as graph inputs:
    (sub-model, {input name: array to feed with every run})."""
    order, used = subgraph(model, source, outputs)
    inits, fed, declared = [], {}, []
    for name in used:
        value = store.read(name)
        if feed_min_bytes is not None and value.nbytes >= feed_min_bytes and value.dtype in _FEEDABLE:
            fed[name] = np.ascontiguousarray(value)  # a no-op for stored (and memory-mapped) weights
            declared.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape)))
        else:
            inits.append(numpy_helper.from_array(np.asarray(value), name))
    sub = helper.make_graph(
        [model.graph.node[i] for i in order],
        "chain",
        [helper.make_tensor_value_info(source, elem_type, ["rows", width]), *declared],
        [helper.make_tensor_value_info(name, elem_type, ["rows", f"features_{i}"]) for i, name in enumerate(outputs)],
        inits,
    )
    built = helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    built.functions.extend(model.functions)
    return built, fed


def _node_order(graph: onnx.GraphProto) -> list[int]:
    """A topological order of the graph's nodes (the file's own order need not be one)."""
    produced = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    done: set[int] = set()
    order: list[int] = []

    def visit(index: int) -> None:
        stack = [(index, False)]
        while stack:
            current, expanded = stack.pop()
            if current in done:
                continue
            if expanded:
                done.add(current)
                order.append(current)
                continue
            stack.append((current, True))
            for name in graph.node[current].input:
                if name in produced and produced[name] not in done:
                    stack.append((produced[name], False))

    for i in range(len(graph.node)):
        visit(i)
    return order


def _rounding_allowance(layer, radius: float, unit: float = _F32_UNIT) -> float:
    """How far evaluation in floating point (unit roundoff ``unit``, 2⁻²⁴ for float32) may move a
    consumer output, worst case for IEEE rounding in any summation order.

    With γ_m = m·u/(1 − m·u): the sum of n terms is off by ≤ γ_n·Σ|u_ij ψ_j|; each ψ_j by
    ≤ L·γ_{d+2}·(‖w_j‖r + |b_j|) from its dot product and input rounding, plus 4 units of the
    activation's own evaluation. Sums of |terms| use sup|ψ_j| over the ball (bounds.activation_sup).
    """
    n, d = layer.size, layer.weights.shape[1]

    def gamma(m: int) -> float:
        return m * unit / max(1.0 - m * unit, 0.5)

    sup = bounds.activation_sup(layer, radius)
    lipschitz = layer.activation.lipschitz if layer.multiplier_weights is None else math.inf
    if math.isfinite(lipschitz):
        preact = lipschitz * np.abs(layer.post_scale) * (layer.weight_norms * radius + np.abs(layer.bias))
        both = _abs_times(layer.out_weights, np.stack([sup, preact], axis=1))  # one pass over U
        terms, inner = both[:, 0], gamma(d + 2) * both[:, 1]
    else:
        terms = _abs_times(layer.out_weights, sup)
        inner = 1e-4 * terms
    return float(np.max((gamma(n) + 4 * unit) * terms + inner, initial=0.0))


def _abs_times(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """|M| @ v in float64 (v a vector or a few columns), a few MiB of M at a time (M may be a large float32 view)."""
    from .blockwise import float64_blocks, one_blas_thread

    result = np.zeros((matrix.shape[0],) + vector.shape[1:])
    with one_blas_thread():  # many small products: see blockwise.one_blas_thread
        for rows, cols, block in float64_blocks(matrix):
            np.abs(block, out=block)
            result[rows] += block @ vector[cols]
    return result


def validate_chains(
    original,
    pruned,
    *,
    device: str = "auto",
    probes: int = DEFAULT_CHAIN_PROBES,
    seed: int = 0,
    max_work: int | None = None,
) -> tuple[tuple[ChainDeviation, ...], tuple[str, ...], tuple[str, ...]]:
    """Check every pruned chain against its certificate on sub-models: (deviations, failures, notes).

    ``max_work`` (compare passes CHAIN_PROBE_WORK) lowers the random probes per chain so that all
    chains' original sub-models together cost at most that many multiply-adds, MIN_CHAIN_PROBES at
    least; None runs ``probes`` on every chain.

    The reference for chain k is the original model with the recorded selections of the chains
    before it applied (``onnxcoreset.plan``), which is exactly what the certificate was computed
    on; its sub-model runs against the pruned model's on the same probes: ``probes`` points of
    the chain's ball (half on the sphere) and the points where a gradient search finds the error
    largest. A chain fails when its largest change exceeds certified bound + rounding allowance
    (:func:`_rounding_allowance`, for the sub-model's float type).
    """
    from . import surgery
    from .chains import find_chains
    from .coreset import Selection
    from .neurons import read_layer

    after = _loaded(pruned)
    meta = _metadata(after.model)
    if LAYERS_KEY not in meta or PLAN_KEY not in meta:
        return (), (), ("the pruned model has no onnxcoreset plan; chains were not checked one by one",)
    base = _loaded(original)
    layers = {entry["name"]: entry for entry in json.loads(meta[LAYERS_KEY])}
    plan = decode_plan(meta[PLAN_KEY])
    chains, _ = find_chains(base.model.graph, base.store)
    pruned_chains = {c.name: c for c in find_chains(after.model.graph, after.store)[0]}
    planned = [c for c in chains if c.name in plan]
    failures, notes, results = [], [], []
    missing = sorted(set(plan) - {c.name for c in planned} | set(plan) - set(pruned_chains))
    for name in missing:
        failures.append(f"chain {name} is in the plan but not found in both models")
    later_rows = {c.producer.node: plan[c.name][0] for c in planned}
    refit_consumers = {  # consumers rewritten by a least-squares refit: not replayable from the plan
        c.node: c_chain.name for c_chain in planned for c in c_chain.consumers
        if layers.get(c_chain.name, {}).get("reweight") not in (None, "", "none")
    }
    types = _elem_types(base.model, [c.producer.input for c in planned])
    each = _bounded(probes, sum(_weight_count(c, base.store) for c in planned), max_work)
    pending: list = []  # earlier chains whose selections have not been replayed on base.store yet
    for position, chain in enumerate(planned):
        entry = layers.get(chain.name)
        outputs = [_consumer_output(base.model.graph, c.node) for c in chain.consumers]
        # Replay the earlier selections only as far as one touches this chain's sub-model (in an
        # MLP each chain's producer is the previous chain's consumer; FFN blocks touch nothing of
        # each other): replaying slices whole weights, seconds per gigabyte.
        reads = set(subgraph(base.model, chain.producer.input, outputs)[1])
        last = max((i for i, (earlier, _) in enumerate(pending) if reads & set(surgery.touched(earlier))), default=-1)
        for earlier, selection in pending[: last + 1]:
            surgery.apply(earlier, selection, base.store)
        del pending[: last + 1]
        if chain.producer.node in refit_consumers:
            notes.append(f"chain {chain.name}: its producer was refit by chain {refit_consumers[chain.producer.node]}, "
                         "which the plan cannot replay; it is checked end to end only")
        elif chain.name in pruned_chains and entry is not None and entry.get("certified_bound") is not None:
            reference = read_layer(chain, base.store)
            dtype = types.get(chain.producer.input, onnx.TensorProto.FLOAT)
            width = reference.weights.shape[1]
            ref_sub = extract_fed(base.model, base.store, chain.producer.input, outputs, width, dtype, FEED_MIN_BYTES)
            other = pruned_chains[chain.name]
            new_sub = extract_fed(after.model, after.store, other.producer.input, outputs, width, dtype, FEED_MIN_BYTES)
            rows = [later_rows.get(c.node) for c in chain.consumers]  # a later chain's producer lost rows
            result = _check_chain(
                chain.name, entry, reference, read_layer(other, after.store), ref_sub, new_sub, rows,
                device=device, probes=each, rng=np.random.default_rng([seed, position]),
            )
            results.append(result)
            if not result.ok:
                failures.append(
                    f"chain {chain.name} moved by {result.max_abs:.6g} > its certified bound "
                    f"{result.certified_bound:.6g} (+ {result.tolerance:.2g} rounding allowance)"
                )
        pending.append((chain, Selection(*plan[chain.name])))
    return tuple(results), tuple(failures), tuple(notes)


def _consumer_output(graph: onnx.GraphProto, index: int) -> str:
    """A consumer's output, after the Add of a stored bias when one follows (a refit may shift it)."""
    out = graph.node[index].output[0]
    readers = [node for node in graph.node if out in node.input]
    stored = {t.name for t in graph.initializer}
    if len(readers) == 1 and readers[0].op_type == "Add" and out not in {o.name for o in graph.output}:
        others = [name for name in readers[0].input if name != out]
        if len(others) == 1 and others[0] in stored:
            return readers[0].output[0]
    return out


def _loaded(model):
    from . import io

    if isinstance(model, onnx.ModelProto):
        return io.from_proto(model)
    if isinstance(model, (bytes, bytearray)):
        return io.from_proto(io.parse(bytes(model)))
    return io.load(model)


def _select_rows(matrix: np.ndarray, blocks: Sequence[int], rows: Sequence[np.ndarray | None], axis: int) -> np.ndarray:
    """Keep, in each consumer's block of ``axis``, the rows a later chain kept."""
    parts, start = [], 0
    for size, keep in zip(blocks, rows):
        index = [slice(None)] * matrix.ndim
        index[axis] = slice(start, start + size)
        block = matrix[tuple(index)]  # a view: np.take would copy the whole (possibly mapped) matrix
        parts.append(block if keep is None else np.take(block, keep, axis=axis))
        start += size
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)


def _weight_count(chain, store) -> int:
    """Multiply-adds of one probe through the chain: its producer's and consumers' weights."""
    tensors = [chain.producer.weight.tensor] + [c.weight.tensor for c in chain.consumers]
    tensors += [chain.multiplier.weight.tensor] if chain.multiplier is not None else []
    return sum(int(np.prod(store.shape(t), dtype=np.int64)) for t in tensors)


def _bounded(probes: int, per_probe: int, max_work: int | None) -> int:
    """``probes`` per chain, lowered so that they cost at most ``max_work`` multiply-adds (None: as asked)."""
    if max_work is None:
        return probes
    return min(probes, max(MIN_CHAIN_PROBES, max_work // max(per_probe, 1)))


def _check_chain(name, entry, reference, pruned_layer, ref_sub, new_sub, rows, *, device, probes, rng) -> ChainDeviation:
    """One chain's sub-models (each with the weights fed to it, :func:`extract_fed`) on its ball:
    random points and the adversarial ones, in batches."""
    radius = float(entry["radius"])
    bound = float(entry["certified_bound"])
    (ref_model, ref_weights), (new_model, new_weights) = ref_sub, new_sub
    ref_sess, new_sess = session(ref_model, device), session(new_model, device)
    width = reference.weights.shape[1]
    feed_name, new_feed_name = ref_model.graph.input[0].name, new_model.graph.input[0].name
    # Consumer output sizes of the reference, in stacking order, from a one-row run.
    probe = np.zeros((1, width), dtype=_input_dtype(ref_sess))
    blocks = [int(np.asarray(o).shape[-1]) for o in ref_sess.run(None, {feed_name: probe, **ref_weights})]
    ref_rows = _select_rows(reference.out_weights, blocks, rows, axis=0)
    if reference.weights.size + reference.out_weights.size <= SEARCHED_MAX_ENTRIES:
        terms = [attack.Term(reference, ref_rows), attack.Term(pruned_layer, -pruned_layer.out_weights)]
        found = attack.search(terms, radius, rng, steps=60, starts=12, random_points=1024)
        adversarial = found.points
    else:  # the search costs minutes on layers this size; random probes only
        adversarial = np.zeros((0, width))
    dtype = _input_dtype(ref_sess)
    unit = float(np.finfo(dtype).eps) / 2
    allowance = _rounding_allowance(reference, radius, unit) + _rounding_allowance(pruned_layer, radius, unit)
    worst, worst_adversarial, seconds = 0.0, 0.0, 0.0
    total = probes + len(adversarial)
    for start in range(0, total, CHAIN_BATCH):
        count = min(CHAIN_BATCH, total - start)
        if start < len(adversarial):
            head = adversarial[start : start + count]
            batch = np.vstack([head, attack.ball_points(count - len(head), width, radius, rng)]) if count > len(head) else head
        else:
            head = adversarial[:0]
            batch = attack.ball_points(count, width, radius, rng)
        batch = batch.astype(dtype)  # the rounding allowance covers this rounding of the probes
        begin = time.perf_counter()
        try:
            before = ref_sess.run(None, {feed_name: batch, **ref_weights})
            after = new_sess.run(None, {new_feed_name: batch, **new_weights})
        except Exception as exc:
            raise ModelError(f"onnxruntime failed on chain {name}: {str(exc).splitlines()[0][:300]}") from None
        seconds += time.perf_counter() - begin
        expected = _select_rows(np.concatenate([np.asarray(b, np.float64).reshape(count, -1) for b in before], axis=1), blocks, rows, axis=1)
        got = np.concatenate([np.asarray(a, np.float64).reshape(count, -1) for a in after], axis=1)
        if expected.shape != got.shape:
            raise ModelError(f"chain {name}: the pruned sub-model has {got.shape[1]} outputs, the plan says {expected.shape[1]}")
        diff = np.abs(expected - got)
        diff = np.where(np.isfinite(diff), diff, np.inf)
        worst = max(worst, float(diff.max(initial=0.0)))
        if len(head):
            worst_adversarial = max(worst_adversarial, float(diff[: len(head)].max(initial=0.0)))
    return ChainDeviation(
        name, radius, str(entry.get("radius_kind", "certified" if entry.get("radius_certified") else "assumed")),
        bound, total, worst, worst_adversarial, allowance, seconds, worst <= bound + allowance,
        new_sess.get_providers()[0],
    )


def _run(sess, names: Sequence[str], feed: Mapping[str, np.ndarray]) -> list:
    try:
        return sess.run(list(names), dict(feed))
    except Exception as exc:
        raise ModelError(f"onnxruntime failed while validating: {str(exc).splitlines()[0][:300]}") from None


def _input_dtype(sess) -> type:
    """The numpy type of the probes: the sub-model's first input (the chain's input; weights follow)."""
    return _NUMPY_OF_ORT.get(sess.get_inputs()[0].type, np.float32)


def measure_row_norms(model, tensors: Sequence[str], data: Mapping[str, np.ndarray], device: str = "auto") -> dict[str, float]:
    """The largest L2 norm of a last-axis row of each tensor when the model runs on ``data``.

    The tensors are exposed as extra graph outputs of a copy of the model; rows of all-zero
    padding count like any other.
    """
    from . import io

    copy = io.finish(_loaded(model))
    existing = {o.name for o in copy.graph.output}
    wanted = [t for t in dict.fromkeys(tensors) if t and t not in existing]
    types = _elem_types(copy, wanted)
    for name in wanted:
        copy.graph.output.append(helper.make_tensor_value_info(name, types[name], None))
    sess = session(copy, device)
    inputs = {i.name for i in sess.get_inputs()}
    feed = {k: np.asarray(v) for k, v in data.items() if k in inputs}
    if set(feed) != inputs:
        raise UsageError(f"the data file lacks model input(s) {', '.join(sorted(inputs - set(feed)))}")
    names = [t for t in tensors if t]
    try:
        values = sess.run(names, feed)
    except Exception as exc:
        raise ModelError(f"onnxruntime failed while measuring radii: {str(exc).splitlines()[0][:300]}") from None
    return {name: float(np.max(np.linalg.norm(np.asarray(v, np.float64).reshape(-1, np.shape(v)[-1] if np.ndim(v) else 1), axis=1), initial=0.0))
            for name, v in zip(names, values)}


def capture(model: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]], names: Sequence[str],
            device: str = "auto") -> dict[str, list[np.ndarray]]:
    """Run ``model`` on every feed and return the named tensors, one array per feed.

    The model runs with exactly these tensors as its outputs (its own outputs are put back
    afterwards), so onnxruntime computes only what they need. Names that are graph inputs are
    taken from the feeds.
    """
    inputs = {i.name for i in model.graph.input}
    wanted = [n for n in dict.fromkeys(names) if n not in inputs]
    results: dict[str, list[np.ndarray]] = {n: [] for n in dict.fromkeys(names)}
    if wanted:
        saved = list(model.graph.output)
        types = _elem_types(model, wanted)
        del model.graph.output[:]
        model.graph.output.extend(helper.make_tensor_value_info(n, types[n], None) for n in wanted)
        try:
            sess = session(model, device)
        finally:
            del model.graph.output[:]
            model.graph.output.extend(saved)
        declared = {i.name for i in sess.get_inputs()}
    for feed in feeds:
        if wanted:
            try:
                values = sess.run(wanted, {k: v for k, v in feed.items() if k in declared})
            except Exception as exc:
                raise ModelError(f"onnxruntime failed on the calibration data: {str(exc).splitlines()[0][:300]}") from None
            for name, value in zip(wanted, values):
                results[name].append(np.asarray(value))
        for name in results:
            if name in inputs:
                results[name].append(np.asarray(feed[name]))
    return results


def _elem_types(model: onnx.ModelProto, names: Sequence[str]) -> dict[str, int]:
    """Element types of tensors, from declared value_info, else shape inference, else float."""
    infos = list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
    types = {i.name: i.type.tensor_type.elem_type for i in infos if i.type.HasField("tensor_type")}
    if any(name not in types for name in names):
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
            types.update({i.name: i.type.tensor_type.elem_type for i in inferred.graph.value_info
                          if i.type.HasField("tensor_type") and i.type.tensor_type.elem_type})
        except Exception:  # inference is a convenience here; float is the common case
            pass
    return {name: types.get(name) or onnx.TensorProto.FLOAT for name in names}
