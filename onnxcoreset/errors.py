"""The error types a caller can rely on; each maps to one documented exit code (see cli.py).

Every message is one line that names the file or option at fault and says what is wrong.
"""

from __future__ import annotations


class OnnxCoresetError(Exception):
    """Base of every error onnxcoreset raises on purpose. Its message is one clear line."""

    exit_code = 2


class ModelError(OnnxCoresetError):
    """The model file cannot be used: missing, corrupt, unsafe or unsupported as a whole."""


class ResourceError(ModelError):
    """The model declares more data than this machine's memory can hold; refused before allocating."""


class UsageError(OnnxCoresetError):
    """The options given do not make sense together or are out of range."""


class OutputError(OnnxCoresetError):
    """The output cannot be written where it was asked to go."""
