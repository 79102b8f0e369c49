"""onnxcoreset: data-independent coreset pruning of hidden neurons in ONNX models.

Public API: :func:`prune`, :func:`prune_file`, :func:`inspect`, :func:`validate`, the config and
report types, and the error types (each maps to a CLI exit code).

The names are resolved on first use (PEP 562), so that ``import onnxcoreset.coreset`` — the pure
numpy mathematics — works without importing onnx or onnxruntime.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, tuple[str, str]] = {
    "ModelError": ("errors", "ModelError"),
    "OnnxCoresetError": ("errors", "OnnxCoresetError"),
    "OutputError": ("errors", "OutputError"),
    "UsageError": ("errors", "UsageError"),
    "PruneConfig": ("pipeline", "PruneConfig"),
    "prune": ("pipeline", "prune"),
    "prune_file": ("pipeline", "prune_file"),
    "inspect": ("pipeline", "inspect"),
    "validate": ("validate", "compare"),
    "InspectReport": ("report", "InspectReport"),
    "LayerReport": ("report", "LayerReport"),
    "PruneReport": ("report", "PruneReport"),
    "SkippedReport": ("report", "SkippedReport"),
    "ValidationReport": ("validate", "ValidationReport"),
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .errors import ModelError, OnnxCoresetError, OutputError, UsageError  # noqa: F401
    from .pipeline import PruneConfig, inspect, prune, prune_file  # noqa: F401
    from .report import InspectReport, LayerReport, PruneReport, SkippedReport  # noqa: F401
    from .validate import ValidationReport  # noqa: F401
    from .validate import compare as validate  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attribute = _EXPORTS[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attribute)
        globals()[name] = value  # later look-ups skip this function
        return value
    try:  # submodules, as an eager package would have made them attributes
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """Keeps ``onnxcoreset.validate`` the API function once the ``validate`` submodule is imported.

    Importing a submodule binds it as an attribute of its package, which would shadow the
    function of the same name (the eager package rebound it after its imports, to the same effect).
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "validate" and isinstance(value, types.ModuleType):
            value = value.compare
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
