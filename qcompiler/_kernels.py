"""The C quantization kernels (`_quant_kernels.c`), built at install time, called through ctypes.

`get()` returns None when the extension was not built (no C compiler at install time) or when
QCOMPILER_TORCH_KERNELS=1; quant.py then runs its torch path, which gives the same codes (tested).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

import torch

from qcompiler.config import Mode

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int


class Kernels:
    def __init__(self, lib: ctypes.CDLL) -> None:
        lib.quantize_int.argtypes = [_P, _I64, _I64, _INT, _INT, _P, _P, _P, _INT]
        lib.quantize_int.restype = None
        lib.quantize_table.argtypes = [_P, _I64, _I64, _INT, ctypes.c_float, ctypes.c_float, _INT, _P, _P, _P, _P,
                                       _P, _INT]
        lib.quantize_table.restype = None
        lib.int_error.argtypes = [_P, _I64, _I64, _INT, _INT, _INT]
        lib.int_error.restype = ctypes.c_double
        lib.pack_nibbles.argtypes = [_P, _I64, _P, _INT]
        lib.pack_nibbles.restype = None
        self.lib = lib

    def pack_nibbles(self, values: torch.Tensor) -> torch.Tensor:
        """uint8 [ceil(n / 2)] of the n one-byte 4-bit codes in `values` (contiguous), two per byte."""
        out = torch.empty((values.numel() + 1) // 2, dtype=torch.uint8)
        self.lib.pack_nibbles(values.data_ptr(), values.numel(), out.data_ptr(), torch.get_num_threads())
        return out

    def quantize(self, w: torch.Tensor, mode: Mode, table=None, code_of=None):
        """(codes, scale, zero point) of float32 groups `w` [..., g] (contiguous), shaped like quant.py's."""
        g = w.shape[-1]
        groups = w.numel() // g
        stat_shape = (*w.shape[:-1], 1)
        threads = torch.get_num_threads()
        if table is None:
            codes = torch.empty(w.shape, dtype=torch.uint8 if mode.asymmetric else torch.int8)
            scale = torch.empty(stat_shape, dtype=torch.float16)
            zero_point = torch.empty(stat_shape, dtype=torch.uint8) if mode.asymmetric else None
            self.lib.quantize_int(w.data_ptr(), groups, g, mode.bits, int(mode.asymmetric), codes.data_ptr(),
                                  scale.data_ptr(), zero_point.data_ptr() if zero_point is not None else None, threads)
            return codes, scale, zero_point
        codes = torch.empty(w.shape, dtype=torch.uint8)
        mx = mode is Mode.MXFP4
        scale = torch.empty(stat_shape, dtype=torch.uint8 if mx else torch.float16)
        self.lib.quantize_table(w.data_ptr(), groups, g, int(mx), table.start, table.width, table.bins,
                                table.below.data_ptr(), table.threshold.data_ptr(), code_of.data_ptr(),
                                codes.data_ptr(), scale.data_ptr(), threads)
        return codes, scale, None

    def int_error(self, matrix: torch.Tensor, mode: Mode) -> float:
        rows, k = matrix.shape
        return self.lib.int_error(matrix.data_ptr(), rows, k, mode.bits, int(mode.asymmetric), torch.get_num_threads())


@functools.lru_cache(maxsize=1)
def _load() -> Kernels | None:
    try:
        from qcompiler import _quant_kernels
    except ImportError:
        logging.getLogger("qcompiler").info("C quantization kernels not built; using the torch path")
        return None
    return Kernels(ctypes.CDLL(_quant_kernels.__file__))


def get() -> Kernels | None:
    if os.environ.get("QCOMPILER_TORCH_KERNELS") == "1":
        return None
    return _load()
