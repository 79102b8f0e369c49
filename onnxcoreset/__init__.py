"""onnxcoreset: data-independent coreset pruning of hidden neurons in ONNX models.

Public API: :func:`prune`, :func:`prune_file`, :func:`inspect`, :func:`validate`, the config and
report types, and the error types (each maps to a CLI exit code).
"""

__version__ = "0.1.0"

from .errors import ModelError, OnnxCoresetError, OutputError, UsageError  # noqa: E402
from .pipeline import PruneConfig, inspect, prune, prune_file  # noqa: E402
from .report import InspectReport, LayerReport, PruneReport, SkippedReport  # noqa: E402
from .validate import ValidationReport  # noqa: E402
from .validate import compare as validate  # noqa: E402

__all__ = [
    "ModelError",
    "OnnxCoresetError",
    "OutputError",
    "UsageError",
    "PruneConfig",
    "prune",
    "prune_file",
    "inspect",
    "validate",
    "InspectReport",
    "LayerReport",
    "PruneReport",
    "SkippedReport",
    "ValidationReport",
]
