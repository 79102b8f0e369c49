"""Load and save ONNX models without surprises.

* Loading parses the protobuf once, refuses what the installed onnx cannot understand, and
  checks every external-data reference (no absolute paths, no ``..``, no symlink leaving the
  model's folder, offsets inside the file) before a single weight byte is read.
* Weights are read lazily through :class:`WeightStore`; external data is memory-mapped, so a
  multi-gigabyte model costs its page cache, not a second copy.
* Saving keeps the input's IR version, opsets and metadata (the proto is edited, never rebuilt),
  writes external data when the input had it, and is atomic: temporary files beside the target,
  then renames; nothing half-written is ever left behind.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import ModelError, OutputError

EXTERNAL_THRESHOLD_BYTES = 1024  # tensors at least this big go to the external-data file
_PROTOBUF_LIMIT = 2**31 - 1
_COPY_CHUNK = 64 << 20


@dataclass(frozen=True)
class ExternalRef:
    """A checked pointer into an external-data file."""

    path: Path
    offset: int
    length: int


def _tensor_nbytes(tensor: TensorProto) -> int:
    if tensor.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return 0
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    if tensor.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return (int(np.prod(tensor.dims, dtype=np.int64)) + 1) // 2
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def iter_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    """Every TensorProto the graph holds: initializers and Constant/attribute tensors, subgraphs too."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from iter_tensors(sub)


def _is_external(tensor: TensorProto) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == TensorProto.EXTERNAL


def check_external_ref(tensor: TensorProto, base_dir: Path) -> ExternalRef:
    """Validate one external-data reference without reading it (CVE-2022-25882, CVE-2024-27318)."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    if not location:
        raise ModelError(f"tensor '{tensor.name}' has external data without a location")
    rel = Path(location)
    if rel.is_absolute() or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        raise ModelError(f"tensor '{tensor.name}': external data location '{location}' is absolute; refused")
    if ".." in rel.parts or ".." in Path(location.replace("\\", "/")).parts:
        raise ModelError(f"tensor '{tensor.name}': external data location '{location}' contains '..'; refused")
    root = base_dir.resolve()
    target = (base_dir / rel).resolve()
    if not target.is_relative_to(root):
        raise ModelError(
            f"tensor '{tensor.name}': external data '{location}' resolves outside the model's folder; refused"
        )
    if not target.is_file():
        raise ModelError(f"tensor '{tensor.name}': external data file '{location}' is missing")
    try:
        offset = int(info.get("offset", "0"))
        expected = _tensor_nbytes(tensor)
        length = int(info["length"]) if "length" in info else expected
    except ValueError:
        raise ModelError(f"tensor '{tensor.name}': external data offset/length is not an integer") from None
    size = target.stat().st_size
    if offset < 0 or length < 0 or offset + length > size:
        raise ModelError(
            f"tensor '{tensor.name}': external data [{offset}, {offset + length}) lies past the end "
            f"of '{location}' ({size} bytes)"
        )
    if length != expected:
        raise ModelError(f"tensor '{tensor.name}': external data holds {length} bytes, its shape needs {expected}")
    return ExternalRef(target, offset, length)


class WeightStore:
    """Read tensors by name (initializers and Constant outputs) lazily, and hold their replacements.

    The graph itself is never touched here; :func:`save` and :meth:`materialize` write the
    replacements into the proto at the end, so a skipped chain stays byte-for-byte as it was.
    """

    def __init__(self, model: onnx.ModelProto, base_dir: Path | None) -> None:
        self._protos: dict[str, TensorProto] = {t.name: t for t in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
                for attr in node.attribute:
                    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                        self._protos[node.output[0]] = attr.t
        self._base_dir = base_dir
        self._external: dict[str, ExternalRef] = {}
        self.replaced: dict[str, np.ndarray] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._protos

    def proto(self, name: str) -> TensorProto:
        return self._protos[name]

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.replaced:
            return tuple(self.replaced[name].shape)
        return tuple(int(d) for d in self._protos[name].dims)

    def dtype(self, name: str) -> int:
        return self._protos[name].data_type

    def read(self, name: str) -> np.ndarray:
        """The current value: a replacement if one was written, else the stored tensor (read-only)."""
        if name in self.replaced:
            return self.replaced[name]
        tensor = self._protos[name]
        if _is_external(tensor):
            ref = self._external_ref(name)
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
            shape = tuple(int(d) for d in tensor.dims)
            if ref.length == 0:
                return np.zeros(shape, dtype)
            return np.memmap(ref.path, dtype=dtype, mode="r", offset=ref.offset, shape=shape)
        try:
            array = numpy_helper.to_array(tensor)
        except Exception as exc:  # a corrupt tensor is a model error, not a crash
            raise ModelError(f"tensor '{name}' cannot be decoded: {exc}") from None
        array.flags.writeable = False
        return array

    def write(self, name: str, array: np.ndarray) -> None:
        """Replace a tensor's value; the dtype is kept as stored, whatever precision the math used."""
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(self._protos[name].data_type))
        self.replaced[name] = np.ascontiguousarray(array, dtype=dtype)

    def _external_ref(self, name: str) -> ExternalRef:
        if name not in self._external:
            if self._base_dir is None:
                raise ModelError(f"tensor '{name}' lives in external data, but the model's folder is unknown")
            self._external[name] = check_external_ref(self._protos[name], self._base_dir)
        return self._external[name]

    def external_ref(self, name: str) -> ExternalRef | None:
        return self._external_ref(name) if _is_external(self._protos[name]) else None

    def materialize(self) -> None:
        """Write every replacement into its TensorProto, and pull external data inline."""
        for name, tensor in self._protos.items():
            if name in self.replaced or _is_external(tensor):
                _set_raw(tensor, np.asarray(self.read(name)))


def _set_raw(tensor: TensorProto, array: np.ndarray) -> None:
    """Store ``array`` in ``tensor`` as little-endian raw bytes, keeping name, dtype and doc."""
    name, data_type, doc = tensor.name, tensor.data_type, tensor.doc_string
    tensor.Clear()
    tensor.name, tensor.data_type = name, data_type
    if doc:
        tensor.doc_string = doc
    tensor.dims.extend(array.shape)
    tensor.raw_data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


@dataclass
class LoadedModel:
    """A parsed model, the folder its external data is relative to, and its lazy weights."""

    model: onnx.ModelProto
    path: Path | None
    store: WeightStore

    @property
    def has_external_data(self) -> bool:
        return any(_is_external(t) for t in iter_tensors(self.model.graph))


def _check_versions(model: onnx.ModelProto, origin: str) -> None:
    if not model.HasField("graph"):
        raise ModelError(f"{origin} is not an ONNX model: it has no graph")
    if model.ir_version <= 0:
        raise ModelError(f"{origin} is not an ONNX model: it declares no IR version")
    if model.ir_version > onnx.IR_VERSION:
        raise ModelError(
            f"{origin} has IR version {model.ir_version}; the installed onnx {onnx.__version__} "
            f"knows up to {onnx.IR_VERSION}"
        )
    newest = onnx.defs.onnx_opset_version()
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > newest:
            raise ModelError(
                f"{origin} uses opset {opset.version}; the installed onnx {onnx.__version__} knows up to {newest}"
            )


def _check_tensor_sizes(model: onnx.ModelProto, base_dir: Path | None, origin: str) -> None:
    """Refuse lying tensors (declared size ≠ stored size) and unsafe external references up front."""
    for tensor in iter_tensors(model.graph):
        if _is_external(tensor):
            if base_dir is None:
                raise ModelError(f"{origin}: tensor '{tensor.name}' uses external data but no folder is known")
            check_external_ref(tensor, base_dir)
        elif tensor.HasField("raw_data") and tensor.data_type not in (TensorProto.STRING,):
            if len(tensor.raw_data) != _tensor_nbytes(tensor):
                raise ModelError(
                    f"{origin}: tensor '{tensor.name}' declares shape {list(tensor.dims)} "
                    f"({_tensor_nbytes(tensor)} bytes) but stores {len(tensor.raw_data)} bytes"
                )


def load(path: str | os.PathLike[str]) -> LoadedModel:
    """Parse a model file and check it can be used safely; raise ModelError with one clear line if not."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    if path.is_dir():
        raise ModelError(f"{path}: is a directory, not an ONNX file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{path}: cannot be read ({exc.strerror})") from None
    if not data:
        raise ModelError(f"{path}: the file is empty")
    model = parse(data, str(path))
    _check_tensor_sizes(model, path.parent, str(path))
    return LoadedModel(model, path, WeightStore(model, path.parent))


def parse(data: bytes, origin: str = "model") -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception:  # protobuf raises DecodeError, and RuntimeError for some corruptions
        raise ModelError(f"{origin}: not an ONNX model (the protobuf cannot be parsed)") from None
    _check_versions(model, origin)
    return model


def from_proto(model: onnx.ModelProto, base_dir: Path | None = None) -> LoadedModel:
    """Wrap an in-memory model; the caller's proto is copied, never modified."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _check_versions(copy, "model")
    _check_tensor_sizes(copy, base_dir, "model")
    return LoadedModel(copy, None, WeightStore(copy, base_dir))


def _tensor_bytes_chunks(store: WeightStore, tensor: TensorProto) -> Iterator[bytes | memoryview]:
    """The bytes of a tensor's value, in chunks, without materialising external data twice."""
    name = tensor.name
    if name in store.replaced:
        yield np.ascontiguousarray(store.replaced[name]).reshape(-1).view(np.uint8)
        return
    if _is_external(tensor):
        ref = store.external_ref(name)
        assert ref is not None
        with open(ref.path, "rb") as handle:
            handle.seek(ref.offset)
            remaining = ref.length
            while remaining:
                chunk = handle.read(min(_COPY_CHUNK, remaining))
                if not chunk:
                    raise ModelError(f"external data of '{name}' ended early")
                remaining -= len(chunk)
                yield chunk
        return
    yield numpy_helper.to_array(tensor).astype(
        np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<"), copy=False
    ).tobytes()


def _external_candidates(loaded: LoadedModel) -> list[TensorProto]:
    seen: set[int] = set()
    tensors = []
    for tensor in iter_tensors(loaded.model.graph):
        if id(tensor) in seen or tensor.data_type == TensorProto.STRING:
            continue
        seen.add(id(tensor))
        nbytes = (
            store_nbytes(loaded.store, tensor) if tensor.name in loaded.store.replaced else _tensor_nbytes(tensor)
        )
        if nbytes >= EXTERNAL_THRESHOLD_BYTES:
            tensors.append(tensor)
    return tensors


def store_nbytes(store: WeightStore, tensor: TensorProto) -> int:
    return int(store.replaced[tensor.name].nbytes)


def _write_external(loaded: LoadedModel, data_handle, data_name: str) -> None:
    """Stream every large tensor into the data file and point its proto there (64-byte aligned)."""
    store = loaded.store
    offset = 0
    for tensor in _external_candidates(loaded):
        pad = (-offset) % 64
        if pad:
            data_handle.write(b"\0" * pad)
            offset += pad
        start = offset
        shape = store.shape(tensor.name) if tensor.name in store.replaced else tuple(tensor.dims)
        for chunk in _tensor_bytes_chunks(store, tensor):
            data_handle.write(chunk)
            offset += len(chunk)
        name, data_type, doc = tensor.name, tensor.data_type, tensor.doc_string
        tensor.Clear()
        tensor.name, tensor.data_type = name, data_type
        if doc:
            tensor.doc_string = doc
        tensor.dims.extend(shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", data_name), ("offset", str(start)), ("length", str(offset - start))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        store.replaced.pop(name, None)


@dataclass
class StagedOutput:
    """Files written into a private folder beside the target; nothing is visible until commit().

    The staged model can be checked and run where it lies (its external data sits beside it
    under its final name); commit() renames the data file and then the model into place,
    discard() removes everything.
    """

    target: Path
    folder: Path
    files: list[str]

    @property
    def model_path(self) -> Path:
        return self.folder / self.target.name

    def commit(self) -> list[Path]:
        placed: list[Path] = []
        try:
            for name in sorted(self.files, key=lambda f: f == self.target.name):  # the model goes last
                os.replace(self.folder / name, self.target.parent / name)
                placed.append(self.target.parent / name)
        except OSError as exc:
            for path in placed:
                path.unlink(missing_ok=True)
            raise OutputError(f"{self.target}: cannot be written ({exc.strerror or exc})") from None
        finally:
            self.discard()
        return placed

    def discard(self) -> None:
        if self.folder.exists():
            for child in self.folder.iterdir():
                child.unlink(missing_ok=True)
            self.folder.rmdir()


def _check_target(out_path: Path) -> Path:
    folder = out_path.parent if str(out_path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{out_path}: the output folder '{folder}' does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{out_path}: the output folder '{folder}' is not writable")
    if out_path.is_dir():
        raise OutputError(f"{out_path}: is a directory")
    return folder


def stage(loaded: LoadedModel, out_path: str | os.PathLike[str], external: bool | None = None) -> StagedOutput:
    """Write the model with its replacements into a staging folder beside ``out_path``.

    ``external=None`` keeps the input's choice, switching to external data only when the model
    would not fit in one protobuf. The loaded proto is consumed: do not reuse it afterwards.
    """
    out_path = Path(out_path)
    folder = _check_target(out_path)
    if external is None:
        external = loaded.has_external_data or _declared_bytes(loaded) > _PROTOBUF_LIMIT - (64 << 20)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=folder))
    except OSError as exc:
        raise OutputError(f"{out_path}: cannot be written ({exc.strerror or exc})") from None
    staged = StagedOutput(out_path, staging, [])
    try:
        if external:
            data_name = out_path.name + ".data"
            with open(staging / data_name, "wb") as handle:
                staged.files.append(data_name)
                _write_external(loaded, handle, data_name)
        loaded.store.materialize()
        try:
            payload = loaded.model.SerializeToString(deterministic=True)
        except ValueError as exc:
            raise OutputError(f"{out_path}: the model cannot be serialised ({exc})") from None
        with open(staging / out_path.name, "wb") as handle:
            staged.files.append(out_path.name)
            handle.write(payload)
        return staged
    except OSError as exc:
        staged.discard()
        raise OutputError(f"{out_path}: cannot be written ({exc.strerror or exc})") from None
    except BaseException:
        staged.discard()
        raise


def save(loaded: LoadedModel, out_path: str | os.PathLike[str], external: bool | None = None) -> list[Path]:
    """Stage and commit in one go: the files written."""
    return stage(loaded, out_path, external).commit()


def _declared_bytes(loaded: LoadedModel) -> int:
    total = 0
    for tensor in iter_tensors(loaded.model.graph):
        if tensor.name in loaded.store.replaced:
            total += int(loaded.store.replaced[tensor.name].nbytes)
        else:
            total += _tensor_nbytes(tensor)
    return total
