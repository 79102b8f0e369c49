"""The one module that runs models: onnxruntime sessions (CUDA when present), probes, deviations.

Both models run on the same inputs: points drawn from the β ball (half on its sphere, half
inside) for float inputs, small non-negative integers for integer inputs (token ids, masks), or
a user's data file. Every output is compared by its largest absolute and mean absolute
deviation; shapes must agree and the pruned model must not turn finite values into NaN.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx

from .errors import ModelError, UsageError

log = logging.getLogger(__name__)

DEFAULT_PROBES = 64


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

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["ok"] = self.ok
        return data


def _ort():
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # its provider-fallback warnings would drown our one-line report
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
    options.log_severity_level = 3
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model) if isinstance(model, Path) else model
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
) -> ValidationReport:
    """Run both models on the same inputs and measure how far every output moved."""
    reference = session(original, device)
    candidate = session(pruned, device)
    if data:
        feeds = [{k: np.asarray(v) for k, v in data.items() if k in {i.name for i in reference.get_inputs()}}]
        count = len(next(iter(feeds[0].values()))) if feeds[0] else 0
    else:
        feeds = probe_inputs(reference, probes, beta, np.random.default_rng(seed), shapes)
        count = probes
    names = [o.name for o in reference.get_outputs()]
    if names != [o.name for o in candidate.get_outputs()]:
        return ValidationReport(candidate.get_providers()[0], count, (), max_error, ("the output names differ",))
    worst = {n: 0.0 for n in names}
    total = {n: 0.0 for n in names}
    elements = {n: 0 for n in names}
    shape_ok = {n: True for n in names}
    failures: list[str] = []
    for feed in feeds:
        try:
            before = reference.run(names, feed)
            after = candidate.run(names, feed)
        except Exception as exc:
            raise ModelError(f"onnxruntime failed while validating: {str(exc).splitlines()[0][:300]}") from None
        for name, a, b in zip(names, before, after):
            a, b = np.asarray(a), np.asarray(b)
            if a.shape != b.shape:
                shape_ok[name] = False
                continue
            if a.dtype.kind not in "fiub":
                continue
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            if np.any(np.isfinite(a) & ~np.isfinite(b)):
                failures.append(f"output '{name}' has non-finite values where the original is finite")
            finite = diff[np.isfinite(diff)]
            worst[name] = max(worst[name], float(finite.max(initial=0.0)))
            total[name] += float(finite.sum())
            elements[name] += diff.size
    outputs = tuple(
        OutputDeviation(n, worst[n], total[n] / max(elements[n], 1), shape_ok[n]) for n in names
    )
    for out in outputs:
        if not out.shape_ok:
            failures.append(f"output '{out.name}' changed shape")
        if max_error is not None and out.max_abs > max_error:
            failures.append(f"output '{out.name}' moved by {out.max_abs:.4g} > --max-error {max_error:g}")
    return ValidationReport(candidate.get_providers()[0], count, outputs, max_error, tuple(dict.fromkeys(failures)))
