"""A NumPy stand-in for the subset of Beta-1 NKI (``neuronxcc.nki``, ``.language``, ``.isa``) bmojo's kernels use.

It runs the **real kernel source** (``src/bmojo/ops/ssd/nki.py``, ``src/bmojo/ops/attention/nki.py``):
``load_kernel_module`` places this package's modules under the ``neuronxcc`` names in ``sys.modules`` while the
kernel file is imported, the pattern nki-library's tests use for their CPU simulator. Every call checks trn1's
limits (NeuronCore-v2, see docs/kernels.md): partition dim <= 128 for every on-chip tile; ``nc_matmul`` contraction
K <= 128, stationary free M <= 128, moving free N <= 512, operands in SBUF, result in PSUM; transposes <= 128 x 128;
a PSUM tile at most one 2 KiB bank per partition and at most 8 banks live; at most 192 KiB of SBUF per partition
live; loads and stores between HBM and SBUF only; engine operands on chip. "Live" is Python liveness (reference
counting), which is more conservative than the compiler's allocator.

It is bmojo's model of NKI, not NKI: it cannot see compiler rejections, instruction scheduling, races between
iterations of ``affine_range``, ScalarE's exp tables, or anything the real simulator and hardware disagree on.
A ``LimitError`` names the rule a kernel broke.
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
import types
import weakref
from contextlib import contextmanager

import numpy as np

PMAX = 128  # partitions
PSUM_BANK_BYTES = 2048  # per partition: one (128, 512) fp32 tile
PSUM_BANKS = 8
SBUF_BYTES = 192 * 1024  # per partition on trn1
MATMUL_MOVING_FMAX = 512


class LimitError(AssertionError):
    """A kernel broke one of trn1's tile rules."""


class _Budget:
    """Live on-chip bytes per partition (SBUF) and live PSUM banks, updated as tiles are created and freed."""

    def __init__(self):
        self.sbuf = 0
        self.psum_banks = 0
        self.peak_sbuf = 0
        self.peak_psum_banks = 0
        self.matmul_flops = 0  # 2*K*M*N per nc_matmul, 2*p*f per nc_transpose (TensorE work)
        self.hbm_bytes = 0  # bytes loaded plus bytes stored

    def take(self, buffer, nbytes):
        if buffer == "psum":
            if nbytes > PSUM_BANK_BYTES:
                raise LimitError(f"PSUM tile of {nbytes} bytes per partition exceeds one {PSUM_BANK_BYTES}-byte bank")
            self.psum_banks += 1
            self.peak_psum_banks = max(self.peak_psum_banks, self.psum_banks)
            if self.psum_banks > PSUM_BANKS:
                raise LimitError(f"{self.psum_banks} PSUM banks live; trn1 has {PSUM_BANKS}")
        else:
            self.sbuf += nbytes
            self.peak_sbuf = max(self.peak_sbuf, self.sbuf)
            if self.sbuf > SBUF_BYTES:
                raise LimitError(f"{self.sbuf} SBUF bytes per partition live; trn1 has {SBUF_BYTES}")

    def give(self, buffer, nbytes):
        if buffer == "psum":
            self.psum_banks -= 1
        else:
            self.sbuf -= nbytes


BUDGET = _Budget()


def _index(idx):
    if not isinstance(idx, tuple):
        idx = (idx,)
    return tuple(i.slice if isinstance(i, _DynSlice) else i for i in idx)


class Tile:
    """An HBM tensor, or an on-chip tile (``sbuf``/``psum``) whose first dim is the partition dim."""

    def __init__(self, array, buffer, owner=None):
        self.array, self.buffer, self.owner = array, buffer, owner
        if buffer in ("sbuf", "psum"):
            if array.ndim < 1 or array.shape[0] > PMAX:
                raise LimitError(f"{buffer} tile {array.shape}: partition dim must be <= {PMAX}")
            if owner is None:
                nbytes = int(np.prod(array.shape[1:], dtype=np.int64)) * array.itemsize
                BUDGET.take(buffer, nbytes)
                weakref.finalize(self, BUDGET.give, buffer, nbytes)

    shape = property(lambda self: self.array.shape)
    dtype = property(lambda self: self.array.dtype)

    def __getitem__(self, idx):
        idx = _index(idx)
        if self.buffer != "hbm" and not isinstance(idx[0], (slice, type(Ellipsis))):
            raise LimitError(f"indexing the partition dim of an on-chip tile with {idx[0]!r}; slice it")
        return Tile(self.array[idx], self.buffer, owner=self)

    def __setitem__(self, idx, value):
        if self.buffer == "hbm":
            raise LimitError("write HBM with nl.store")
        target = self.array[_index(idx)]
        src = value.array if isinstance(value, Tile) else value
        if isinstance(value, Tile):
            if value.buffer == "hbm":
                raise LimitError("assigning an HBM tensor to a tile; use nl.load")
            if value.shape != target.shape:
                raise LimitError(f"assigning a {value.shape} tile to a {target.shape} slice")
        target[...] = src

    def __iadd__(self, other):
        if self.buffer != "psum" or not isinstance(other, Tile) or other.buffer != "psum":
            raise LimitError("+= accumulates a matmul result into a PSUM tile only")
        if other.shape != self.shape:
            raise LimitError(f"accumulating a {other.shape} result into a {self.shape} PSUM tile")
        self.array += other.array
        return self


class _DynSlice:
    def __init__(self, start, size):
        self.slice = slice(start, start + size)


def _on_chip(*tiles):
    for t in tiles:
        if not isinstance(t, Tile) or t.buffer not in ("sbuf", "psum"):
            raise LimitError(f"engine operand must be an SBUF or PSUM tile, got {getattr(t, 'buffer', type(t))}")


# ---------------------------------------------------------------- neuronxcc.nki.language
language = types.ModuleType("neuronxcc.nki.language")
language.float32 = np.float32
language.sbuf, language.psum, language.hbm, language.shared_hbm = "sbuf", "psum", "hbm", "shared_hbm"
language.exp = np.exp
language.log = np.log
language.ds = _DynSlice
language.sequential_range = range
language.affine_range = range
language.static_range = range
_program = {"ids": (0, 0), "hbm": [], "cursor": 0}


def _program_id(axis):
    return _program["ids"][axis]


def _ndarray(shape, dtype, buffer="sbuf"):
    if buffer in ("shared_hbm", "hbm"):
        # Outputs are shared by every program of the grid: program k > 0 gets program 0's k-th allocation.
        if _program["cursor"] < len(_program["hbm"]):
            out = _program["hbm"][_program["cursor"]]
        else:
            out = Tile(np.zeros(shape, dtype), "hbm")
            _program["hbm"].append(out)
        _program["cursor"] += 1
        return out
    return Tile(np.zeros(shape, dtype), buffer)


def _full(value):
    def make(shape, dtype, buffer="sbuf"):
        t = _ndarray(shape, dtype, buffer)
        t.array[...] = value
        return t

    return make


def _load(src):
    if not isinstance(src, Tile) or src.buffer != "hbm":
        raise LimitError("nl.load reads an HBM tensor")
    BUDGET.hbm_bytes += src.array.nbytes
    return Tile(np.array(src.array, dtype=src.dtype), "sbuf")


def _store(dst, value):
    if not isinstance(dst, Tile) or dst.buffer != "hbm":
        raise LimitError("nl.store writes an HBM tensor")
    if not isinstance(value, Tile) or value.buffer != "sbuf":
        raise LimitError("nl.store writes an SBUF tile (copy PSUM results to SBUF first)")
    if value.shape != dst.shape or value.shape[0] > PMAX:
        raise LimitError(f"storing a {value.shape} tile to a {dst.shape} slice")
    BUDGET.hbm_bytes += dst.array.nbytes
    dst.array[...] = value.array


language.program_id = _program_id
language.ndarray = _ndarray
language.zeros = _full(0.0)
language.full = lambda shape, fill_value, dtype, buffer="sbuf": _full(fill_value)(shape, dtype, buffer)
language.ones = _full(1.0)
language.load = _load
language.store = _store

# ---------------------------------------------------------------- neuronxcc.nki.isa
isa = types.ModuleType("neuronxcc.nki.isa")


def _sbuf(array):
    return Tile(np.ascontiguousarray(array, dtype=np.float32), "sbuf")


def nc_matmul(stationary, moving):
    """PSUM [M, N] fp32 = stationary[K, M].T @ moving[K, N]."""
    for name, t in (("stationary", stationary), ("moving", moving)):
        if not isinstance(t, Tile) or t.buffer != "sbuf" or t.array.ndim != 2:
            raise LimitError(f"nc_matmul {name} must be a 2-D SBUF tile")
    (k, m), (k2, n) = stationary.shape, moving.shape
    if k != k2:
        raise LimitError(f"nc_matmul contraction mismatch {stationary.shape} vs {moving.shape}")
    if k > PMAX or m > PMAX or n > MATMUL_MOVING_FMAX:
        raise LimitError(f"nc_matmul K={k} M={m} N={n}: limits K<=128, M<=128, N<=512")
    BUDGET.matmul_flops += 2 * k * m * n
    return Tile(stationary.array.T.astype(np.float32) @ moving.array.astype(np.float32), "psum")


def nc_transpose(data):
    """PSUM [f, p] = data[p, f].T (TensorE, p and f <= 128)."""
    _on_chip(data)
    if data.array.ndim != 2 or max(data.shape) > PMAX:
        raise LimitError(f"nc_transpose of {data.shape}: at most 128 x 128")
    BUDGET.matmul_flops += 2 * data.shape[0] * data.shape[1] * data.shape[0]
    return Tile(np.ascontiguousarray(data.array.T, dtype=np.float32), "psum")


def tensor_copy(src):
    _on_chip(src)
    return _sbuf(src.array)


def _operand(data, operand):
    if isinstance(operand, Tile):
        _on_chip(operand)
        if operand.shape != (data.shape[0], 1):
            raise LimitError(f"tensor_scalar operand {operand.shape}: a scalar or a ({data.shape[0]}, 1) vector")
        return operand.array
    return operand


def tensor_scalar(data, op0, operand0, reverse0=False, op1=None, operand1=None):
    _on_chip(data)
    x, s = data.array, _operand(data, operand0)
    out = op0(s, x) if reverse0 else op0(x, s)
    if op1 is not None:
        out = op1(out, _operand(data, operand1))
    return _sbuf(out)


def tensor_tensor(data1, data2, op):
    _on_chip(data1, data2)
    if data1.shape != data2.shape:
        raise LimitError(f"tensor_tensor shapes differ: {data1.shape} vs {data2.shape}")
    if data1.buffer == data2.buffer == "psum":
        raise LimitError("tensor_tensor: both operands in PSUM")
    return _sbuf(op(data1.array, data2.array))


def activation(op, data, bias=None, scale=1.0):
    _on_chip(data)
    x = data.array * (_operand(data, scale) if isinstance(scale, Tile) else scale)
    if bias is not None:
        x = x + _operand(data, bias)
    return _sbuf(op(x))


def tensor_reduce(op, data, axis, keepdims=False):
    _on_chip(data)
    axes = axis if isinstance(axis, tuple) else (axis,)
    if 0 in axes:
        raise LimitError("tensor_reduce over the partition dim; use a matmul with ones")
    reduce = {np.add: np.sum, np.max: np.max, np.maximum: np.max}[op]
    return _sbuf(reduce(data.array, axis=axes, keepdims=keepdims))


for _fn in (nc_matmul, nc_transpose, tensor_copy, tensor_scalar, tensor_tensor, activation, tensor_reduce):
    setattr(isa, _fn.__name__, _fn)

# ---------------------------------------------------------------- neuronxcc.nki
nki = types.ModuleType("neuronxcc.nki")
nki.language, nki.isa = language, isa


class _Kernel:
    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        return _Launch(self.fn, grid if isinstance(grid, tuple) else (grid,))


class _Launch:
    """``kernel[grid](*numpy_arrays)``: every program in turn, outputs shared across the grid."""

    def __init__(self, fn, grid):
        self.fn, self.grid = fn, grid

    def __call__(self, *args):
        _program["hbm"] = []
        outputs = None
        for ids in itertools.product(*(range(g) for g in self.grid)):
            _program["ids"], _program["cursor"] = ids, 0
            inputs = [Tile(np.array(a, dtype=np.float32), "hbm") for a in args]
            outputs = self.fn(*inputs)
        single = isinstance(outputs, Tile)
        arrays = tuple(t.array.copy() for t in ((outputs,) if single else outputs))
        return arrays[0] if single else arrays


def simulate_kernel(launch, *args):
    """Same call shape as ``neuronxcc.nki.simulate_kernel(kernel[grid], *arrays)``."""
    return launch(*args)


nki.jit = _Kernel
nki.simulate_kernel = simulate_kernel
_package = types.ModuleType("neuronxcc")
_package.nki = nki
_MODULES = {"neuronxcc": _package, "neuronxcc.nki": nki, "neuronxcc.nki.language": language, "neuronxcc.nki.isa": isa}


@contextmanager
def standin_modules():
    """The stand-in under the ``neuronxcc`` module names, restored afterwards."""
    saved = {name: sys.modules.get(name) for name in _MODULES}
    sys.modules.update(_MODULES)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def load_kernel_module(path, name="bmojo_nki_kernels_under_standin"):
    """Import the kernel source file at ``path`` against the stand-in; returns the module."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    with standin_modules():
        spec.loader.exec_module(module)
    return module
