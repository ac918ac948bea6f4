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
HALF = (torch.bfloat16, torch.float16)  # what quantize() takes besides float32 for the integer modes
TILE = 8  # rows of a group the scale-estimation kernel refits together (TILE in _quant_kernels.c)


class Kernels:
    def __init__(self, lib: ctypes.CDLL) -> None:
        lib.quantize_int.argtypes = [_P, _I64, _I64, _INT, _INT, _P, _P, _P, _INT]
        lib.quantize_int.restype = None
        lib.quantize_int_half.argtypes = [_P, _INT, _I64, _I64, _INT, _INT, _P, _P, _P, _INT]
        lib.quantize_int_half.restype = _INT
        lib.quantize_table.argtypes = [_P, _I64, _I64, _INT, ctypes.c_float, ctypes.c_float, _INT, _P, _P, _P, _P,
                                       _P, _INT]
        lib.quantize_table.restype = None
        lib.int_error.argtypes = [_P, _I64, _I64, _INT, _INT, _INT]
        lib.int_error.restype = ctypes.c_double
        lib.scale_estimate_int.argtypes = [_P, _I64, _I64, _I64, _P, _P, _INT, _INT, _INT, _INT, _P, _P, _P, _P, _P,
                                           _P, _INT]
        lib.scale_estimate_int.restype = None
        lib.awq_residual_int.argtypes = [_P, _P, _I64, _I64, _I64, _INT, _INT, _P, _P, _INT]
        lib.awq_residual_int.restype = None
        lib.pack_nibbles.argtypes = [_P, _I64, _P, _INT]
        lib.pack_nibbles.restype = None
        self.lib = lib

    def pack_nibbles(self, values: torch.Tensor) -> torch.Tensor:
        """uint8 [ceil(n / 2)] of the n one-byte 4-bit codes in `values` (contiguous), two per byte."""
        out = torch.empty((values.numel() + 1) // 2, dtype=torch.uint8)
        self.lib.pack_nibbles(values.data_ptr(), values.numel(), out.data_ptr(), torch.get_num_threads())
        return out

    def quantize(self, w: torch.Tensor, mode: Mode, table=None, code_of=None):
        """(codes, scale, zero point) of float32 groups `w` [..., g] (contiguous), shaped like quant.py's;
        for the integer modes (no table) `w` may also be bf16 or f16, widened exactly group by group."""
        g = w.shape[-1]
        groups = w.numel() // g
        stat_shape = (*w.shape[:-1], 1)
        threads = torch.get_num_threads()
        if table is None:
            codes = torch.empty(w.shape, dtype=torch.uint8 if mode.asymmetric else torch.int8)
            scale = torch.empty(stat_shape, dtype=torch.float16)
            zero_point = torch.empty(stat_shape, dtype=torch.uint8) if mode.asymmetric else None
            zp = zero_point.data_ptr() if zero_point is not None else None
            if w.dtype in HALF:
                if self.lib.quantize_int_half(w.data_ptr(), int(w.dtype == torch.bfloat16), groups, g, mode.bits,
                                              int(mode.asymmetric), codes.data_ptr(), scale.data_ptr(), zp, threads):
                    raise MemoryError("no memory for a group's float32 buffer in quantize_int_half")
                return codes, scale, zero_point
            self.lib.quantize_int(w.data_ptr(), groups, g, mode.bits, int(mode.asymmetric), codes.data_ptr(),
                                  scale.data_ptr(), zp, threads)
            return codes, scale, zero_point
        codes = torch.empty(w.shape, dtype=torch.uint8)
        mx = mode.spec.levels == "e2m1"  # E8M0 scales of amax / 6
        scale = torch.empty(stat_shape, dtype=torch.uint8 if mx else torch.float16)
        self.lib.quantize_table(w.data_ptr(), groups, g, int(mx), table.start, table.width, table.bins,
                                table.below.data_ptr(), table.threshold.data_ptr(), code_of.data_ptr(),
                                codes.data_ptr(), scale.data_ptr(), threads)
        return codes, scale, None

    def scale_estimate(self, wg: torch.Tensor, blocks: torch.Tensor, importance: torch.Tensor, mode: Mode,
                       initial_steps: int, scale_steps: int):
        """`weight_fit.estimate`'s refit for an integer mode: (scale f16 [G, N, 1], zero point uint8 or None,
        error with RTN, after, of the weights alone, each float32 [G, N]) of group-major weights wg [G, N, g]
        with the Hessian blocks [G, g, g] and importance [G, g]."""
        groups, rows, g = wg.shape
        wg, blocks, importance = (t.float().contiguous() for t in (wg, blocks, importance))
        if blocks.shape != (groups, g, g) or importance.shape != (groups, g):
            raise ValueError(f"Hessian blocks {tuple(blocks.shape)} / importance {tuple(importance.shape)} do not fit "
                             f"weights of {groups} groups of {g}")
        threads = torch.get_num_threads()
        scale = torch.empty((groups, rows, 1), dtype=torch.float16)
        zero_point = torch.empty((groups, rows, 1), dtype=torch.uint8) if mode.asymmetric else None
        errors = torch.empty((3, groups, rows), dtype=torch.float32)
        work = torch.empty(threads * 4 * TILE * g, dtype=torch.float32)  # 4 buffers of a tile per thread
        self.lib.scale_estimate_int(wg.data_ptr(), groups, rows, g, blocks.data_ptr(), importance.data_ptr(), mode.bits,
                                    int(mode.asymmetric), initial_steps, scale_steps, scale.data_ptr(),
                                    zero_point.data_ptr() if zero_point is not None else None, errors[0].data_ptr(),
                                    errors[1].data_ptr(), errors[2].data_ptr(), work.data_ptr(), threads)
        return scale, zero_point, errors[0], errors[1], errors[2]

    def awq_residual(self, w: torch.Tensor, s: torch.Tensor, mode: Mode, g: int) -> torch.Tensor:
        """W - Q(W * s) / s for W [N, K] and s [K] (as float32), Q round to nearest in groups of g."""
        rows, k = w.shape
        w, s = w.float().contiguous(), s.float().contiguous()
        if s.shape != (k,) or k % g:
            raise ValueError(f"scales {tuple(s.shape)} or group {g} do not fit a weight of {k} input channels")
        threads = torch.get_num_threads()
        out = torch.empty_like(w)
        work = torch.empty(threads * g, dtype=torch.float32)
        self.lib.awq_residual_int(w.data_ptr(), s.data_ptr(), rows, k, g, mode.bits, int(mode.asymmetric),
                                  out.data_ptr(), work.data_ptr(), threads)
        return out

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
