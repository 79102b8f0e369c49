"""Float64 reductions over large float matrices, a few MiB at a time. Plain numpy.

A 4096×16384 float32 weight is 256 MiB; a float64 copy of it is 512 MiB, and every temporary of
its size (``np.abs(w)``, ``w * w``) is as much again. Layers this size are read here through one
reused float64 buffer instead, so pruning them costs the bytes that are kept, not several copies
of the bytes that are read, while every sum still accumulates in float64.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np

BLOCK_ELEMENTS = 1 << 19  # 4 MiB of float64: large enough for BLAS, small enough to stay in cache


def float64_blocks(matrix: np.ndarray) -> Iterator[tuple[slice, slice, np.ndarray]]:
    """(rows, cols, float64 copy of matrix[rows, cols]) pieces covering a 2-D ``matrix``.

    Pieces are cut along the matrix's outer memory axis (rows for C order, columns for a
    transposed view), so each is read from contiguous memory. The block is a reused scratch
    buffer: the caller may overwrite it, and must use it before asking for the next one.
    """
    n, d = matrix.shape
    by_columns = n > 1 and d > 1 and matrix.strides[0] < matrix.strides[1]
    outer, inner = (d, n) if by_columns else (n, d)
    step = max(1, BLOCK_ELEMENTS // max(inner, 1))
    buffer = np.empty(min(step, max(outer, 1)) * inner)
    for start in range(0, outer, step):
        piece = slice(start, min(start + step, outer))
        width = piece.stop - piece.start
        if by_columns:
            block = buffer[: n * width].reshape(width, n).T  # F order, like the source
            np.copyto(block, matrix[:, piece])
            yield slice(0, n), piece, block
        else:
            block = buffer[: width * d].reshape(width, d)
            np.copyto(block, matrix[piece])
            yield piece, slice(0, d), block


def row_norms(matrix: np.ndarray) -> np.ndarray:
    """‖row‖₂ of every row of a 2-D matrix, accumulated in float64."""
    squares = np.zeros(matrix.shape[0])
    for rows, _, block in float64_blocks(matrix):
        squares[rows] += np.einsum("ij,ij->i", block, block)
    return np.sqrt(squares)


def column_abs_max(matrix: np.ndarray) -> np.ndarray:
    """max_i |matrix[i, j]| of every column of a 2-D matrix, as float64 (NaN where a column has one)."""
    largest = np.zeros(matrix.shape[1])
    if matrix.shape[0] == 0:
        return largest
    for _, cols, block in float64_blocks(matrix):
        np.abs(block, out=block)  # a scratch copy: safe to overwrite
        largest[cols] = np.maximum(largest[cols], block.max(axis=0))  # maximum, not fmax: NaN stays NaN
    return largest


def all_finite(matrix: np.ndarray) -> bool:
    """Whether every entry is finite, read a few MiB at a time in the stored type (no conversion)."""
    matrix = np.asarray(matrix)
    if matrix.ndim != 2:
        return bool(np.all(np.isfinite(matrix)))
    by_columns = matrix.shape[0] > 1 and matrix.shape[1] > 1 and matrix.strides[0] < matrix.strides[1]
    source = matrix.T if by_columns else matrix  # rows of ``source`` are contiguous
    step = max(1, BLOCK_ELEMENTS // max(source.shape[1], 1))
    return all(bool(np.isfinite(source[i : i + step]).all()) for i in range(0, source.shape[0], step))


_controller = None


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run the BLAS products of a blockwise loop on one thread.

    Each product on a few MiB is too small to share: handing it to BLAS's threads costs more than
    it saves, and on a busy machine a descheduled BLAS thread stalls every call (a 1024×4096
    interval certificate: 190 ms with 2 threads under load, 6 ms on one). Uses threadpoolctl when
    it is installed; otherwise BLAS keeps its own setting.
    """
    global _controller
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        yield
        return
    if _controller is None:
        _controller = ThreadpoolController()
    with _controller.limit(limits=1, user_api="blas"):
        yield
