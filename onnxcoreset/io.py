"""Load and save ONNX models without surprises.

* Loading parses the protobuf once and refuses, with one clear :class:`ModelError`, what cannot be
  used safely: a file that is not a model, an IR version or opset newer than the installed onnx,
  a tensor whose declared shape disagrees with the bytes it stores, tensors declaring more memory
  than the machine has (:class:`ResourceError`), and any external-data reference that is absolute,
  climbs out with ``..``, leaves the model's folder through a symlink, is not a regular file or
  lies past the end of its file. All of this is checked before a single weight byte is read.
* Weights are read lazily through :class:`WeightStore`; external data is memory-mapped, so a
  multi-gigabyte model costs its page cache, not a second copy.
* Saving keeps the input's IR version, opsets and metadata (the proto is edited, never rebuilt),
  writes external data when the input had it, sorts the nodes topologically only when the input's
  order was not, refuses to overwrite the input or its external data unless asked to, and is
  atomic: files are staged in a private folder beside the target, then renamed into place;
  nothing half-written is ever left behind.
"""

from __future__ import annotations

import contextlib
import heapq
import math
import mmap
import os
import re
import signal
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import protowire
from .errors import ModelError, OutputError, ResourceError, UsageError

EXTERNAL_THRESHOLD_BYTES = 1024  # tensors at least this big go to the external-data file
PROTOBUF_LIMIT = 2**31 - 1  # a serialized ModelProto can be no larger
_COPY_CHUNK = 64 << 20
_UNLIMITED = 1 << 62

# Sub-byte types are packed: this many bits per element, in raw_data and in external data.
_PACKED_BITS = {
    getattr(TensorProto, name): bits
    for name, bits in (
        ("UINT4", 4), ("INT4", 4), ("FLOAT4E2M1", 4), ("UINT2", 2), ("INT2", 2), ("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6),
    )
    if hasattr(TensorProto, name)
}
# In the typed int32_data field, 4- and 2-bit types are packed too; 6-bit types take one entry each.
_PACKED_TYPED_BITS = {t: b for t, b in _PACKED_BITS.items() if b in (2, 4)}
_COMPLEX = {TensorProto.COMPLEX64, TensorProto.COMPLEX128}


@dataclass(frozen=True)
class ExternalRef:
    """A checked pointer into an external-data file."""

    path: Path  # resolved, inside the model's folder, a regular file
    offset: int
    length: int


def _human(nbytes: int) -> str:
    value, unit = float(nbytes), "bytes"
    for bigger in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{nbytes} bytes" if unit == "bytes" else f"{value:.1f} {unit}"


def _dtype_name(data_type: int) -> str:
    try:
        return TensorProto.DataType.Name(data_type)
    except ValueError:
        return str(data_type)


def tensor_elements(tensor: TensorProto) -> int:
    """The number of elements the tensor's dims declare (exact: Python integers never overflow)."""
    if any(d < 0 for d in tensor.dims):
        raise ModelError(f"tensor '{tensor.name}' has a negative dimension in {list(tensor.dims)}")
    return math.prod(tensor.dims)


def tensor_nbytes(tensor: TensorProto) -> int:
    """The bytes the tensor's dims and type declare, as raw or external data (0 for strings)."""
    data_type = tensor.data_type
    if data_type == TensorProto.STRING:
        return 0
    itemsize = _itemsize(tensor)
    elements = tensor_elements(tensor)
    if data_type in _PACKED_BITS:
        return (elements * _PACKED_BITS[data_type] + 7) // 8
    return elements * itemsize


def _itemsize(tensor: TensorProto) -> int:
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, ValueError, TypeError):
        raise ModelError(f"tensor '{tensor.name}' has unknown data type {_dtype_name(tensor.data_type)}") from None


def _typed_count(tensor: TensorProto) -> int:
    """How many entries the tensor's typed data field (float_data, int32_data …) must hold."""
    elements = tensor_elements(tensor)
    if tensor.data_type in _PACKED_TYPED_BITS:
        return (elements * _PACKED_TYPED_BITS[tensor.data_type] + 7) // 8
    return 2 * elements if tensor.data_type in _COMPLEX else elements


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


def iter_sparse_tensors(graph: onnx.GraphProto) -> Iterator[onnx.SparseTensorProto]:
    """Every SparseTensorProto: sparse initializers and sparse attribute values, subgraphs too."""
    yield from graph.sparse_initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                yield attr.sparse_tensor
            elif attr.type == onnx.AttributeProto.SPARSE_TENSORS:
                yield from attr.sparse_tensors
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_sparse_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from iter_sparse_tensors(sub)


def _is_external(tensor: TensorProto) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == TensorProto.EXTERNAL


def _has_inline_data(tensor: TensorProto) -> bool:
    return tensor.HasField("raw_data") or any(
        len(getattr(tensor, f)) for f in ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")
    )


def _check_location(name: str, location: str) -> None:
    """Refuse a location that could name anything but a file inside the model's folder.

    Both path conventions are checked whatever the platform: a model that is safe here must be
    safe on Windows too, where ``..\\`` and ``C:`` mean something.
    """
    if not location:
        raise ModelError(f"tensor '{name}' has external data without a location")
    if any(ord(c) < 32 or ord(c) == 127 for c in location):
        raise ModelError(f"tensor '{name}': external data location {location!r} contains control characters; refused")
    posix, windows = PurePosixPath(location), PureWindowsPath(location)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or location.startswith(("/", "\\")):
        raise ModelError(f"tensor '{name}': external data location '{location}' is absolute; refused")
    if ".." in posix.parts or ".." in windows.parts:
        raise ModelError(f"tensor '{name}': external data location '{location}' contains '..'; refused")


def _non_negative_int(name: str, key: str, value: str) -> int:
    if not (value.isascii() and value.isdigit()):
        raise ModelError(f"tensor '{name}': external data {key} {value!r} is not a non-negative integer")
    return int(value)


def check_external_ref(tensor: TensorProto, base_dir: Path) -> ExternalRef:
    """Validate one external-data reference without reading it (CVE-2022-25882, CVE-2024-27318).

    The location must be relative, free of ``..`` and control characters, resolve (symlinks
    followed) to a regular file inside ``base_dir``, and hold exactly the bytes the tensor's
    shape needs at [offset, offset + length). A key given twice is refused: readers disagree on
    which one wins, which is how a checked reference could be swapped for an unchecked one.
    """
    name = tensor.name
    info: dict[str, str] = {}
    for entry in tensor.external_data:
        if entry.key in info:
            raise ModelError(f"tensor '{name}': external data gives the key '{entry.key}' twice; refused")
        info[entry.key] = entry.value
    location = info.get("location", "")
    _check_location(name, location)
    if _has_inline_data(tensor):
        raise ModelError(f"tensor '{name}' has both inline data and external data; refused")
    try:
        root = base_dir.resolve()
        target = (base_dir / location).resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        raise ModelError(f"tensor '{name}': external data '{location}' cannot be resolved ({exc})") from None
    if not target.is_relative_to(root):
        raise ModelError(f"tensor '{name}': external data '{location}' resolves outside the model's folder; refused")
    try:
        status = target.stat()
    except FileNotFoundError:
        raise ModelError(f"tensor '{name}': external data file '{location}' is missing") from None
    except OSError as exc:
        raise ModelError(f"tensor '{name}': external data file '{location}' cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(status.st_mode):
        raise ModelError(f"tensor '{name}': external data '{location}' is not a regular file; refused")
    expected = tensor_nbytes(tensor)
    offset = _non_negative_int(name, "offset", info.get("offset", "0"))
    length = _non_negative_int(name, "length", info["length"]) if "length" in info else expected
    size = status.st_size
    if offset + length > size:
        raise ModelError(
            f"tensor '{name}': external data [{offset}, {offset + length}) lies past the end "
            f"of '{location}' ({size} bytes)"
        )
    if length != expected:
        raise ModelError(f"tensor '{name}': external data holds {length} bytes, its shape needs {expected}")
    return ExternalRef(target, offset, length)


def memory_budget() -> int:
    """Bytes of memory this machine can give the process: physical memory, capped by a cgroup limit."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system: no limit we can know
        return _UNLIMITED
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            value = Path(limit).read_text().strip()
        except OSError:
            continue
        if value.isdigit():
            total = min(total, int(value))
    return total if total > 0 else _UNLIMITED


def check_tensors(model: onnx.ModelProto, base_dir: Path | None, origin: str) -> None:
    """Refuse lying tensors, unsafe external references and more declared data than memory, up front.

    Only protos are looked at: nothing is decoded and no external file is opened.
    """
    budget = memory_budget()
    declared = 0
    tensors: list[TensorProto] = list(iter_tensors(model.graph))
    for sparse in iter_sparse_tensors(model.graph):
        if any(d < 0 for d in sparse.dims):
            raise ModelError(f"{origin}: sparse tensor '{sparse.values.name}' has a negative dimension")
        declared += math.prod(sparse.dims) * _itemsize(sparse.values)  # what densifying it costs
        tensors += [sparse.values, sparse.indices]
    for tensor in tensors:
        nbytes = tensor_nbytes(tensor)
        if nbytes > budget:
            raise ResourceError(
                f"{origin}: tensor '{tensor.name}' declares shape {list(tensor.dims)} ({_human(nbytes)}), "
                f"more than this machine's {_human(budget)} of memory; refused"
            )
        declared += nbytes
        if declared > budget:
            raise ResourceError(
                f"{origin}: its tensors declare {_human(declared)} or more, more than this machine's "
                f"{_human(budget)} of memory; refused"
            )
        if _is_external(tensor):
            if base_dir is None:
                raise ModelError(f"{origin}: tensor '{tensor.name}' uses external data but no folder is known")
            check_external_ref(tensor, base_dir)
        elif tensor.HasField("raw_data"):
            if tensor.data_type == TensorProto.STRING:
                raise ModelError(f"{origin}: string tensor '{tensor.name}' stores raw bytes, which strings cannot use")
            if len(tensor.raw_data) != nbytes:
                raise ModelError(
                    f"{origin}: tensor '{tensor.name}' declares shape {list(tensor.dims)} "
                    f"({nbytes} bytes) but stores {len(tensor.raw_data)} bytes"
                )
        else:
            field = helper.tensor_dtype_to_field(tensor.data_type)
            stored, needed = len(getattr(tensor, field)), _typed_count(tensor)
            if stored != needed:
                raise ModelError(
                    f"{origin}: tensor '{tensor.name}' declares shape {list(tensor.dims)} "
                    f"({needed} values) but stores {stored} in {field}"
                )


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
            if tensor.data_type in _PACKED_BITS:  # packed: decode a copy (small: these are never pruned)
                copy = TensorProto()
                copy.CopyFrom(tensor)
                copy.ClearField("external_data")
                copy.ClearField("data_location")
                with open(ref.path, "rb") as handle:
                    handle.seek(ref.offset)
                    copy.raw_data = handle.read(ref.length)
                return _decode(copy, name)
            return np.memmap(ref.path, dtype=dtype.newbyteorder("<"), mode="r", offset=ref.offset, shape=shape)
        return _decode(tensor, name)

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

    def materialize(self, written: frozenset[int] = frozenset()) -> None:
        """Write every replacement into its TensorProto, and pull external data inline.

        ``written``: ids of protos already pointed at a newly written data file (their bytes are
        there, not at the location this store read them from), left as they are.
        """
        for name, tensor in self._protos.items():
            if id(tensor) in written:
                continue
            if name in self.replaced or _is_external(tensor):
                _set_raw(tensor, np.asarray(self.read(name)))
                self.replaced.pop(name, None)  # its bytes now live in the proto; free the array


def _decode(tensor: TensorProto, name: str) -> np.ndarray:
    try:
        array = numpy_helper.to_array(tensor)
    except Exception as exc:  # noqa: BLE001 (a corrupt tensor is a model error, not a crash)
        raise ModelError(f"tensor '{name}' cannot be decoded: {str(exc).splitlines()[0][:200]}") from None
    array.flags.writeable = False
    return array


def _set_raw(tensor: TensorProto, array: np.ndarray) -> None:
    """Store ``array`` in ``tensor`` as little-endian raw bytes, keeping name, dtype and doc."""
    name, data_type, doc = tensor.name, tensor.data_type, tensor.doc_string
    tensor.Clear()
    tensor.name, tensor.data_type = name, data_type
    if doc:
        tensor.doc_string = doc
    tensor.dims.extend(array.shape)
    tensor.raw_data = bytes(_raw_view(array, data_type))


def _raw_view(array: np.ndarray, data_type: int) -> bytes | memoryview:
    """The ONNX raw_data bytes of ``array``: little-endian, sub-byte types packed; no copy where possible."""
    if data_type in _PACKED_BITS:
        return numpy_helper.from_array(np.asarray(array)).raw_data
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and sys.byteorder == "big"):
        array = array.byteswap()
    return memoryview(array.reshape(-1).view(np.uint8))


@dataclass
class LoadedModel:
    """A parsed model, the folder its external data is relative to, and its lazy weights."""

    model: onnx.ModelProto
    path: Path | None
    store: WeightStore
    in_place: frozenset[str] = frozenset()  # initializers of a single-file model read where they lie in it

    @property
    def has_external_data(self) -> bool:
        return any(_is_external(t) and t.name not in self.in_place for t in iter_tensors(self.model.graph))

    def input_files(self) -> list[Path]:
        """The model file and every external-data file it reads (what must never be modified)."""
        files = [self.path] if self.path is not None else []
        base = self.path.parent if self.path is not None else self.store._base_dir
        if base is not None:
            for tensor in iter_tensors(self.model.graph):
                if _is_external(tensor):
                    files.append(check_external_ref(tensor, base).path)
        return list(dict.fromkeys(files))


def _newest_opsets() -> dict[str, int]:
    newest: dict[str, int] = {}
    for domain, version in helper.OP_SET_ID_VERSION_MAP:
        newest[domain] = max(newest.get(domain, 0), version)
    newest[""] = max(newest.get("ai.onnx", 0), onnx.defs.onnx_opset_version())
    return newest


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
    newest = _newest_opsets()
    for opset in model.opset_import:
        domain = "" if opset.domain == "ai.onnx" else opset.domain
        if domain in newest and opset.version > newest[domain]:
            shown = f"opset {opset.version}" if not domain else f"opset {opset.version} of '{domain}'"
            raise ModelError(
                f"{origin} uses {shown}; the installed onnx {onnx.__version__} knows up to {newest[domain]}"
            )


def _opset_map(model: onnx.ModelProto) -> dict[str, int]:
    return {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return f"node '{node.name}'" if node.name else f"node {index} ({node.op_type or 'no op type'})"


def _stub_subgraphs(node: onnx.NodeProto) -> onnx.NodeProto:
    """A copy of a control-flow node with empty bodies: its own inputs and attributes can then be checked
    alone (onnx's node checker cannot be told which outer names a body may read)."""
    stub = onnx.NodeProto()
    stub.CopyFrom(node)
    for attr in stub.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            attr.g.Clear()
            attr.g.name = "stub"
        elif attr.type == onnx.AttributeProto.GRAPHS:
            del attr.graphs[:]
    return stub


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _first_bad_string(message) -> str | None:
    """The path to a string field holding invalid UTF-8 (protobuf hands such a field over as bytes)."""
    if isinstance(message, TensorProto):  # never touch raw_data: reading it would copy the weights
        fields = [("name", message.name)] + [(f"external_data.{e.key!r}", e.value) for e in message.external_data]
        fields += [("external_data.key", e.key) for e in message.external_data]
        return next((path for path, value in fields if isinstance(value, bytes)), None)
    for descriptor, value in message.ListFields():
        items = value if _is_repeated(descriptor) else [value]
        if descriptor.type == descriptor.TYPE_STRING:
            if any(isinstance(item, bytes) for item in items):
                return descriptor.name
        elif descriptor.type == descriptor.TYPE_MESSAGE:
            for item in items:
                inner = _first_bad_string(item)
                if inner is not None:
                    return f"{descriptor.name}.{inner}"
    return None


def _is_repeated(descriptor) -> bool:
    flag = getattr(descriptor, "is_repeated", None)  # protobuf >= 5.28 (``label`` is gone in 7)
    return bool(flag) if flag is not None else descriptor.label == descriptor.LABEL_REPEATED


def check_structure(model: onnx.ModelProto, origin: str) -> None:
    """Refuse graphs whose wiring or nodes are malformed, so matching never meets a broken node.

    Every tensor must be defined exactly once (inputs, initializers, node outputs) and defined
    somewhere before it is read (in any order: an unsorted graph is fine); every node must fit its
    operator's schema (input and output counts, attribute names and types), as onnx's node
    checker sees it. Nothing is copied but one node at a time.
    """
    bad = _first_bad_string(model)
    if bad is not None:
        raise ModelError(f"{origin}: the text field {re.sub(r'[^ -~]', '?', bad)} is not valid UTF-8")
    context = onnx.checker.C.CheckerContext()
    context.ir_version = model.ir_version
    context.opset_imports = _opset_map(model)
    _check_graph_structure(model.graph, context, frozenset(), origin)


def _check_graph_structure(graph: onnx.GraphProto, context, outer: frozenset[str], origin: str) -> None:
    defined: dict[str, str] = {}

    def define(name: str, what: str) -> None:
        if name in defined and not (what == "an initializer" and defined[name] == "a graph input"):
            raise ModelError(f"{origin}: tensor '{name}' is defined twice ({defined[name]} and {what})")
        defined[name] = what

    for value in graph.input:
        define(value.name, "a graph input")
    for tensor in graph.initializer:
        define(tensor.name, "an initializer")
    for sparse in graph.sparse_initializer:
        define(sparse.values.name, "an initializer")
    for index, node in enumerate(graph.node):
        if not node.op_type:
            raise ModelError(f"{origin}: {_node_label(node, index)} has no operator type")
        for name in node.output:
            if name:
                define(name, _node_label(node, index))
    visible = outer | defined.keys()
    for index, node in enumerate(graph.node):
        for name in node.input:
            if name and name not in visible:
                raise ModelError(
                    f"{origin}: {_node_label(node, index)} ({node.op_type}) reads '{name}', "
                    "which no input, initializer or node defines"
                )
        try:
            onnx.checker.check_node(_stub_subgraphs(node) if _has_subgraph(node) else node, context)
        except Exception as exc:  # noqa: BLE001 (ValidationError, or SchemaError for a broken attribute)
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{origin}: {_node_label(node, index)} ({node.op_type}) is malformed: {detail[:300]}") from None
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subgraphs:
                _check_graph_structure(sub, context, frozenset(visible), origin)
    for value in graph.output:
        if value.name not in visible:
            raise ModelError(f"{origin}: graph output '{value.name}' is not defined by any input, initializer or node")


def load(path: str | os.PathLike[str]) -> LoadedModel:
    """Parse a model file and check it can be used safely; raise ModelError with one clear line if not."""
    path = Path(path)
    try:
        status = path.stat()
    except FileNotFoundError:
        raise ModelError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise ModelError(f"{path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    if stat.S_ISDIR(status.st_mode):
        raise ModelError(f"{path}: is a directory, not an ONNX file")
    if not stat.S_ISREG(status.st_mode):
        raise ModelError(f"{path}: is not a regular file")
    if status.st_size == 0:
        raise ModelError(f"{path}: the file is empty")
    if status.st_size > PROTOBUF_LIMIT:
        raise ModelError(
            f"{path}: {_human(status.st_size)} is more than a protobuf can hold (2 GiB), so it is not an ONNX "
            "model (large models keep their weights in external data)"
        )
    model, in_place = _parse_in_place(path), frozenset()
    if model is not None:
        in_place = frozenset(t.name for t in model.graph.initializer if _is_external(t))
    else:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelError(f"{path}: cannot be read ({exc.strerror})") from None
        model = parse(data, str(path))
        del data
    check_tensors(model, path.parent, str(path))
    check_structure(model, str(path))
    return LoadedModel(model, path, WeightStore(model, path.parent), in_place)


IN_PLACE_MIN_BYTES = 64 << 10  # initializers of single-file models at least this big are read in place


def _parse_in_place(path: Path) -> onnx.ModelProto | None:
    """Parse a single-file model without copying its large initializers: each is pointed at where its
    bytes lie in the model file (as external data located in the file itself), for WeightStore to
    memory-map. Every safety check then applies to these references as to any external data.

    None where this does not apply or anything is unusual (the plain parse then runs, and gives the
    usual errors): no large initializer, a name the location checks would refuse, a symlink out of
    the folder, wire encodings protowire does not handle, or data that disagrees with its shape.
    """
    try:
        _check_location(path.name, path.name)
        if path.resolve().parent != path.parent.resolve():
            return None
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            stripped, spans = protowire.strip_initializer_data(mapped, IN_PLACE_MIN_BYTES)
    except (OSError, ValueError, RuntimeError, ModelError):
        return None
    if not spans:
        return None
    model = onnx.ModelProto()
    try:
        model.ParseFromString(stripped)
        _check_versions(model, str(path))
        tensors = model.graph.initializer
        for span in spans:
            tensor = tensors[span.index]
            usable = tensor.data_type not in (TensorProto.STRING, TensorProto.UNDEFINED) and not tensor.external_data
            if not usable or tensor.HasField("data_location") or _has_inline_data(tensor) or tensor_nbytes(tensor) != span.length:
                return None
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", path.name), ("offset", str(span.offset)), ("length", str(span.length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
    except Exception:  # noqa: BLE001 (any surprise: let the plain parse report it)
        return None
    return model


def parse(data: bytes, origin: str = "model") -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception:  # noqa: BLE001 (protobuf raises DecodeError, and RuntimeError for some corruptions)
        raise ModelError(f"{origin}: not an ONNX model (the protobuf cannot be parsed)") from None
    _check_versions(model, origin)
    return model


def from_proto(model: onnx.ModelProto, base_dir: Path | None = None) -> LoadedModel:
    """Wrap an in-memory model; the caller's proto is copied, never modified."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _check_versions(copy, "model")
    check_tensors(copy, base_dir, "model")
    check_structure(copy, "model")
    return LoadedModel(copy, None, WeightStore(copy, base_dir))


# --- node order -------------------------------------------------------------------------------


def _outer_names(node: onnx.NodeProto) -> set[str]:
    """Names a control-flow node's subgraphs read from the enclosing scope."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for sub in graphs:
            local = {i.name for i in sub.input} | {t.name for t in sub.initializer}
            local |= {s.values.name for s in sub.sparse_initializer}
            for inner in sub.node:
                local.update(inner.output)
            for inner in sub.node:
                names.update(n for n in inner.input if n and n not in local)
                names.update(n for n in _outer_names(inner) if n not in local)
            names.update(o.name for o in sub.output if o.name not in local)
    return names


def _node_reads(node: onnx.NodeProto) -> list[str]:
    return [n for n in node.input if n] + sorted(_outer_names(node))


def topological_order(graph: onnx.GraphProto) -> list[int] | None:
    """Node indices in a topological order that keeps the file's order wherever it can.

    None when the file's order already is topological; ModelError when there is a cycle.
    Only dependencies on tensors produced inside ``graph`` count: the rest come from the
    graph's inputs, initializers or an enclosing scope.
    """
    producer: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in node.output:
            if name:
                producer.setdefault(name, index)
    reads = [[producer[n] for n in _node_reads(node) if n in producer] for node in graph.node]
    if all(dep < index for index, deps in enumerate(reads) for dep in deps if dep != index):
        return None
    pending = [len({d for d in deps if d != index}) for index, deps in enumerate(reads)]
    dependents: dict[int, list[int]] = {}
    for index, deps in enumerate(reads):
        for dep in {d for d in deps if d != index}:
            dependents.setdefault(dep, []).append(index)
    ready = [index for index, count in enumerate(pending) if count == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for dependent in dependents.get(index, []):
            pending[dependent] -= 1
            if pending[dependent] == 0:
                heapq.heappush(ready, dependent)
    if len(order) != len(graph.node):
        raise ModelError("the graph has a cycle: its nodes cannot be ordered")
    return order


def sort_nodes(graph: onnx.GraphProto) -> bool:
    """Put the nodes (and those of every subgraph) in topological order in place, if they are not.

    The node messages are reordered, not copied, so references into them stay valid. Returns
    whether anything moved.
    """
    moved = False
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                moved |= sort_nodes(sub)
    order = topological_order(graph)
    if order is None:
        return moved
    nodes = list(graph.node)  # keeps the wrappers alive so that id() identifies each node
    rank = {id(nodes[index]): position for position, index in enumerate(order)}
    graph.node.sort(key=lambda node: rank[id(node)])
    return True


# --- saving -----------------------------------------------------------------------------------


def _tensor_bytes_chunks(store: WeightStore, tensor: TensorProto) -> Iterator[bytes | memoryview]:
    """The bytes of a tensor's value, in chunks, without materialising external data twice."""
    name = tensor.name
    if name in store.replaced:
        yield _raw_view(store.replaced[name], tensor.data_type)
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
    if tensor.HasField("raw_data"):
        yield tensor.raw_data
        return
    yield _raw_view(_decode(tensor, name), tensor.data_type)


def _file_chunks(ref: ExternalRef, name: str) -> Iterator[bytes]:
    """The bytes at a checked external reference, read in chunks (no mapping, no whole copy)."""
    with open(ref.path, "rb") as handle:
        handle.seek(ref.offset)
        remaining = ref.length
        while remaining:
            chunk = handle.read(min(_COPY_CHUNK, remaining))
            if not chunk:
                raise ModelError(f"external data of '{name}' ended early")
            remaining -= len(chunk)
            yield chunk


def _metadata_only(tensor: TensorProto, shape: tuple[int, ...]) -> None:
    """Empty a tensor proto of its data, keeping name, type, doc string and the given shape."""
    name, data_type, doc = tensor.name, tensor.data_type, tensor.doc_string
    tensor.Clear()
    tensor.name, tensor.data_type = name, data_type
    if doc:
        tensor.doc_string = doc
    tensor.dims.extend(shape)


def _detach_initializers(
    loaded: LoadedModel,
) -> tuple[frozenset[int], dict[int, tuple[int, Callable[[], Iterable[bytes | memoryview]]]]]:
    """For a single-file output: empty the large initializers whose bytes are replacements (memory)
    or on disk (read in place, or external), and return their proto ids and, by initializer index,
    (byte count, chunk source) for protowire.write_with_initializer_data: serialising the model then
    copies none of their bytes."""
    store = loaded.store
    detached: set[int] = set()
    sources: dict[int, tuple[int, Callable[[], Iterable[bytes | memoryview]]]] = {}
    for index, tensor in enumerate(loaded.model.graph.initializer):
        name = tensor.name
        if tensor.data_type == TensorProto.STRING or name not in store or store.proto(name) is not tensor:
            continue
        if name in store.replaced:
            array, data_type = store.replaced[name], tensor.data_type
            raw = _raw_view(array, data_type)
            count, shape = len(raw), tuple(array.shape)
            source: Callable[[], Iterable[bytes | memoryview]] = lambda raw=raw: [raw]
        elif _is_external(tensor):
            ref = store.external_ref(name)
            assert ref is not None
            count, shape = ref.length, tuple(int(d) for d in tensor.dims)
            source = lambda ref=ref, name=name: _file_chunks(ref, name)
        else:
            continue
        if count < IN_PLACE_MIN_BYTES:
            continue
        _metadata_only(tensor, shape)
        detached.add(id(tensor))
        sources[index] = (count, source)
    return frozenset(detached), sources


def _external_candidates(loaded: LoadedModel) -> list[TensorProto]:
    seen: set[int] = set()
    tensors = []
    for tensor in iter_tensors(loaded.model.graph):
        if id(tensor) in seen or tensor.data_type == TensorProto.STRING:
            continue
        seen.add(id(tensor))
        nbytes = store_nbytes(loaded.store, tensor) if tensor.name in loaded.store.replaced else tensor_nbytes(tensor)
        if nbytes >= EXTERNAL_THRESHOLD_BYTES:
            tensors.append(tensor)
    return tensors


def store_nbytes(store: WeightStore, tensor: TensorProto) -> int:
    return int(store.replaced[tensor.name].nbytes)


def _write_external(loaded: LoadedModel, data_handle, data_name: str) -> frozenset[int]:
    """Stream every large tensor into the data file and point its proto there (64-byte aligned).

    Returns the ids of the protos rewritten, which must not be materialized from the input again.
    """
    store = loaded.store
    offset = 0
    written: set[int] = set()
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
        written.add(id(tensor))
    return frozenset(written)


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
            with _signals_deferred():  # a model must never be left beside another run's data file
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


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block is done (POSIX; elsewhere a no-op)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a small text file (a report) atomically: a temporary file beside it, then a rename."""
    path = Path(path)
    folder = check_target(path)
    try:
        descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise OutputError(f"{path}: cannot be written ({exc.strerror or exc})") from None
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException as exc:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputError(f"{path}: cannot be written ({exc.strerror or exc})") from None
        raise


def check_target(out_path: Path) -> Path:
    """The folder the output will be staged in; OutputError when it cannot be (checked before any work)."""
    folder = out_path.parent if str(out_path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{out_path}: the output folder '{folder}' does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{out_path}: the output folder '{folder}' is not writable")
    if out_path.is_dir():
        raise OutputError(f"{out_path}: is a directory")
    return folder


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def _check_no_clobber(loaded: LoadedModel, outputs: list[Path]) -> None:
    """Refuse to replace the model being read or any of its external-data files."""
    inputs = loaded.input_files()
    for out in outputs:
        for source in inputs:
            if _same_file(out, source):
                what = "the input model" if source == loaded.path else f"the input's external data '{source.name}'"
                raise UsageError(f"{out}: the output would overwrite {what}; pass --force to allow it")


def stage(
    loaded: LoadedModel,
    out_path: str | os.PathLike[str],
    external: bool | None = None,
    *,
    overwrite_input: bool = False,
) -> StagedOutput:
    """Write the model with its replacements into a staging folder beside ``out_path``.

    ``external=None`` keeps the input's choice, switching to external data only when the model
    would not fit in one protobuf. Replacing the input model or its external data is refused
    unless ``overwrite_input`` (it is safe then: the input is fully read before the rename).
    The loaded proto is consumed: do not reuse it afterwards.
    """
    out_path = Path(out_path)
    folder = check_target(out_path)
    if external is None:
        external = loaded.has_external_data or _declared_bytes(loaded) > PROTOBUF_LIMIT - (64 << 20)
    data_name = out_path.name + ".data"
    if not overwrite_input:
        _check_no_clobber(loaded, [out_path] + ([folder / data_name] if external else []))
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=folder))
    except OSError as exc:
        raise OutputError(f"{out_path}: cannot be written ({exc.strerror or exc})") from None
    staged = StagedOutput(out_path, staging, [])
    try:
        written: frozenset[int] = frozenset()
        streamed: dict[int, tuple[int, Callable[[], Iterable[bytes | memoryview]]]] = {}
        if external:
            with open(staging / data_name, "wb") as handle:
                staged.files.append(data_name)
                written = _write_external(loaded, handle, data_name)
        else:
            written, streamed = _detach_initializers(loaded)
        loaded.store.materialize(written)
        sort_nodes(loaded.model.graph)  # last: materialize writes into the node protos it references
        try:
            payload = loaded.model.SerializeToString(deterministic=True)
        except ValueError as exc:
            raise OutputError(f"{out_path}: the model cannot be serialised ({exc})") from None
        if len(payload) + sum(n + 32 for n, _ in streamed.values()) > PROTOBUF_LIMIT:
            where = "even with its weights in external data" if external else "in one file; save it with external data"
            raise OutputError(f"{out_path}: the model is over 2 GiB {where}")
        with open(staging / out_path.name, "wb") as handle:
            staged.files.append(out_path.name)
            if streamed:  # the large initializers' bytes go from memory or disk straight to the file
                protowire.write_with_initializer_data(handle, payload, streamed)
            else:
                handle.write(payload)
        streamed.clear()
        for tensor in loaded.model.graph.initializer:  # written: free the replacements (the check reads the file)
            if id(tensor) in written:
                loaded.store.replaced.pop(tensor.name, None)
        return staged
    except OSError as exc:
        staged.discard()
        raise OutputError(f"{out_path}: cannot be written ({exc.strerror or exc})") from None
    except BaseException:
        staged.discard()
        raise


def save(loaded: LoadedModel, out_path: str | os.PathLike[str], external: bool | None = None, *, overwrite_input: bool = False) -> list[Path]:
    """Stage and commit in one go: the files written."""
    return stage(loaded, out_path, external, overwrite_input=overwrite_input).commit()


def finish(loaded: LoadedModel) -> onnx.ModelProto:
    """The in-memory result: replacements written in, weights inline, nodes in topological order."""
    loaded.store.materialize()
    sort_nodes(loaded.model.graph)
    return loaded.model


def _declared_bytes(loaded: LoadedModel) -> int:
    total = 0
    for tensor in iter_tensors(loaded.model.graph):
        if tensor.name in loaded.store.replaced:
            total += int(loaded.store.replaced[tensor.name].nbytes)
        else:
            total += tensor_nbytes(tensor)
    return total
