"""Read and write the weight bytes of a single-file ONNX model without copying them through protobuf.

Parsing a 500 MB single-file model copies every weight twice (the file's bytes, then the parsed
message), and serialising one copies them twice more. The weights are the ``raw_data`` of the
graph's initializers, a few length-delimited fields at known places in the protobuf wire format:

* :func:`strip_initializer_data` walks the file (memory-mapped) down to those fields and returns the
  model without them, plus where each one lies in the file, so the caller can parse a small message
  and memory-map the weights where they already are;
* :func:`write_with_initializer_data` writes a serialised model whose large initializers carry no
  data, splicing each one's ``raw_data`` in from an iterator of chunks while writing.

Wire format: a field is a varint key (number << 3 | wire type) then a varint (type 0), 8 bytes
(type 1), a varint length and that many bytes (type 2) or 4 bytes (type 5). ModelProto.graph is
field 7, GraphProto.initializer field 5, TensorProto.raw_data field 9. Anything unexpected (groups,
a repeated singular field, a length past the end) raises :class:`WireError`: the caller then falls
back to the ordinary parse, which gives the user the usual error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

MODEL_GRAPH = 7
GRAPH_INITIALIZER = 5
TENSOR_RAW_DATA = 9
_LENGTH_DELIMITED = 2


class WireError(ValueError):
    """The bytes are not the plain encoding this module handles."""


@dataclass(frozen=True)
class DataSpan:
    """Where the raw_data of the graph's ``index``-th initializer lies in the file."""

    index: int
    offset: int
    length: int


def read_varint(buf, pos: int, end: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it."""
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return encode_varint(number << 3 | wire_type)


def fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(number, wire type, field start, payload start, payload end) of every field in buf[start:end]."""
    pos = start
    while pos < end:
        first = pos
        key, pos = read_varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        if wire_type == 0:
            _, after = read_varint(buf, pos, end)
            yield number, wire_type, first, pos, after
            pos = after
        elif wire_type == 1 or wire_type == 5:
            after = pos + (8 if wire_type == 1 else 4)
            if after > end:
                raise WireError("truncated fixed-width field")
            yield number, wire_type, first, pos, after
            pos = after
        elif wire_type == _LENGTH_DELIMITED:
            length, pos = read_varint(buf, pos, end)
            if pos + length > end:
                raise WireError("length-delimited field runs past its message")
            yield number, wire_type, first, pos, pos + length
            pos += length
        else:
            raise WireError(f"wire type {wire_type} (groups) is not handled")


def _only_field(buf, start: int, end: int, number: int) -> tuple[int, int, int] | None:
    """(field start, payload start, payload end) of the one length-delimited field ``number``, if any."""
    found = None
    for num, wire_type, first, begin, stop in fields(buf, start, end):
        if num == number:
            if wire_type != _LENGTH_DELIMITED or found is not None:
                raise WireError(f"field {number} is not one length-delimited field")
            found = (first, begin, stop)
    return found


def strip_initializer_data(buf, min_bytes: int) -> tuple[bytes, list[DataSpan]]:
    """The model in ``buf`` with the raw_data of large top-level initializers removed, and where it was.

    Only initializers whose raw_data is at least ``min_bytes`` long are stripped; everything else
    is copied byte for byte. The result parses to the same model minus those fields.
    """
    end = len(buf)
    graph = _only_field(buf, 0, end, MODEL_GRAPH)
    if graph is None:
        raise WireError("no graph")
    _, graph_start, graph_end = graph
    pieces: list[bytes] = []
    spans: list[DataSpan] = []
    index = 0
    for number, wire_type, first, begin, stop in fields(buf, graph_start, graph_end):
        if number == GRAPH_INITIALIZER and wire_type == _LENGTH_DELIMITED:
            raw = _only_field(buf, begin, stop, TENSOR_RAW_DATA)
            if raw is not None and raw[2] - raw[1] >= min_bytes:
                body = bytes(buf[begin : raw[0]]) + bytes(buf[raw[2] : stop])
                pieces.append(_key(GRAPH_INITIALIZER, _LENGTH_DELIMITED) + encode_varint(len(body)) + body)
                spans.append(DataSpan(index, raw[1], raw[2] - raw[1]))
                index += 1
                continue
            index += 1
        pieces.append(bytes(buf[first:stop]))
    graph_body = b"".join(pieces)
    model_first, _, model_stop = graph
    head = bytes(buf[:model_first])
    tail = bytes(buf[model_stop:end])
    stripped = head + _key(MODEL_GRAPH, _LENGTH_DELIMITED) + encode_varint(len(graph_body)) + graph_body + tail
    return stripped, spans


def write_with_initializer_data(
    handle: BinaryIO,
    payload: bytes,
    data: dict[int, tuple[int, Callable[[], Iterable[bytes | memoryview]]]],
) -> None:
    """Write ``payload`` (a serialised model) with raw_data spliced into some of its initializers.

    ``data`` maps an initializer's index in the graph to (byte count, a function returning its
    chunks); those initializers must carry no data in ``payload``. Nothing is copied but the
    messages' headers: the chunks go straight to ``handle``.
    """
    end = len(payload)
    graph = _only_field(payload, 0, end, MODEL_GRAPH)
    if graph is None:
        raise WireError("no graph")
    model_first, graph_start, graph_end = graph
    extra = {i: len(_key(TENSOR_RAW_DATA, _LENGTH_DELIMITED) + encode_varint(n)) + n for i, (n, _) in data.items()}
    layout = []  # (field start, field stop, initializer index or None)
    index = 0
    graph_length = 0
    for number, wire_type, first, begin, stop in fields(payload, graph_start, graph_end):
        if number == GRAPH_INITIALIZER and wire_type == _LENGTH_DELIMITED:
            if index in data:
                body = stop - begin + extra[index]
                graph_length += len(_key(GRAPH_INITIALIZER, _LENGTH_DELIMITED) + encode_varint(body)) + body
                layout.append((begin, stop, index))
                index += 1
                continue
            index += 1
        graph_length += stop - first
        layout.append((first, stop, None))
    if set(data) - set(range(index)):
        raise WireError("data for an initializer the model does not have")
    handle.write(payload[:model_first])
    handle.write(_key(MODEL_GRAPH, _LENGTH_DELIMITED) + encode_varint(graph_length))
    for begin, stop, which in layout:
        if which is None:
            handle.write(payload[begin:stop])
            continue
        count, chunks = data[which]
        handle.write(_key(GRAPH_INITIALIZER, _LENGTH_DELIMITED) + encode_varint(stop - begin + extra[which]))
        handle.write(payload[begin:stop])
        handle.write(_key(TENSOR_RAW_DATA, _LENGTH_DELIMITED) + encode_varint(count))
        written = 0
        for chunk in chunks():
            handle.write(chunk)
            written += len(chunk)
        if written != count:
            raise WireError(f"initializer {which}: {written} bytes written, {count} announced")
    handle.write(payload[graph_end:])
