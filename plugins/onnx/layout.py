"""Compressed weights in onnxruntime's layouts: MatMulNBits / GatherBlockQuantized blocks, MatMulBnb4,
and standard opset-21 blocked DequantizeLinear. Pure numpy; no graph editing here.

MatMulNBits B is uint8 [N, blocks, block*bits/8], packed along K, element 2i in the low nibble; its
scales are [N, blocks] in the activation's float type and its zero points uint8, packed along the
blocks (two 4-bit values per byte, each row padded to a whole byte). Unsigned codes only: symmetric
codes are stored shifted (q + 2^(bits-1)) with no zero point, which is the ops' default zero point.
A per-channel weight is written in blocks of the largest power of two dividing K, its scale repeated
per block: the same numbers, in the only form the kernels take.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompiler.bitpack import NIBBLES, NIBBLES_HIGH_FIRST, pack
from qcompiler.errors import QCompilerError
from qcompiler.quant import CompressedWeight

MIN_BLOCK = 16  # MatMulNBits / GatherBlockQuantized: block_size is a power of two >= 16


@dataclass
class Blocks:
    """One weight in MatMulNBits' layout; `data` is also GatherBlockQuantized's [N, blocks, blob]."""

    bits: int
    block: int
    n: int
    k: int
    data: np.ndarray  # uint8 [N, blocks, block * bits / 8]
    scale: np.ndarray  # float32 [N, blocks]
    zero_point: np.ndarray | None  # uint8 [N, blocks], unpacked; float32 for a float zero point (GGUF q4_1)

    def packed_zero_point(self) -> np.ndarray | None:
        """MatMulNBits' zero points: packed along the blocks, low bits first, each row whole bytes; a
        float zero point goes as it is, in the scales' type and shape (MatMulNBits takes both forms)."""
        if self.zero_point is None or self.bits == 8 or self.zero_point.dtype == np.float32:
            return self.zero_point
        return pack(self.zero_point, NIBBLES, axis=1)


def to_blocks(cw: CompressedWeight, name: str) -> Blocks:
    if not cw.mode.integer:
        raise ValueError(f"{cw.mode} has no MatMulNBits layout")
    n, k = cw.matrix_shape
    scale = cw.scale.float().numpy().reshape(n, -1)
    zero_point = None if cw.zero_point is None else cw.zero_point.numpy().reshape(n, -1)
    if zero_point is not None and cw.zero_point.is_floating_point():
        zero_point = np.ascontiguousarray(zero_point, np.float32)
    if cw.group_size == -1:
        block = block_for(k, name)
        repeat = k // block
        scale = np.repeat(scale, repeat, axis=1)
        zero_point = None if zero_point is None else np.repeat(zero_point, repeat, axis=1)
    else:
        block = cw.group_size
        if block < MIN_BLOCK or block & (block - 1):
            raise QCompilerError(
                f"group size {block} of {name} is not a power of two >= {MIN_BLOCK}, which onnxruntime's "
                "MatMulNBits needs: use --group-size 32, 64 or 128, or --backend openvino"
            )
    unsigned = cw.unsigned_codes().numpy().reshape(n, k // block, block)
    if cw.mode.bits == 4:
        unsigned = pack(unsigned, NIBBLES)
    return Blocks(cw.mode.bits, block, n, k, np.ascontiguousarray(unsigned, np.uint8),
                  np.ascontiguousarray(scale, np.float32), zero_point)


def block_for(k: int, name: str) -> int:
    """The block a per-channel weight is written in: the largest power of two dividing K."""
    block = k & -k
    if block < MIN_BLOCK:
        raise QCompilerError(
            f"{name} has {k} input channels, which no power-of-two block >= {MIN_BLOCK} divides, so "
            "onnxruntime's MatMulNBits cannot hold it per channel: ignore that layer "
            "(--ignored-scope-name) or use --backend openvino"
        )
    return min(block, 1 << 12)


def bnb4(cw: CompressedWeight) -> tuple[np.ndarray, np.ndarray]:
    """MatMulBnb4 (NF4): codes of the row-major [N, K] matrix, first element in the HIGH nibble
    (bitsandbytes' order), and absmax [N*K/g] float32."""
    packed = pack(cw.codes.numpy().reshape(-1), NIBBLES_HIGH_FIRST)
    return packed, cw.scale.float().numpy().reshape(-1).astype(np.float32)


def qdq(cw: CompressedWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """Standard DequantizeLinear for MatMul's [K, N] weight: (codes [K, N], scale, zero point, axis).

    Grouped 4-bit: blocked along axis 0, scale/zero point [K/g, N]; per-channel: axis 1, [N].
    Codes keep their signedness (int4/int8 symmetric, uint4/uint8 asymmetric).
    """
    n, k = cw.matrix_shape
    codes = cw.codes.numpy().reshape(n, k).T
    if cw.group_size == -1:
        scale = cw.scale.float().numpy().reshape(n)
        zp = None if cw.zero_point is None else cw.zero_point.numpy().reshape(n)
        return np.ascontiguousarray(codes), scale, zp, 1
    scale = np.ascontiguousarray(cw.scale.float().numpy().reshape(n, -1).T)
    zp = None if cw.zero_point is None else np.ascontiguousarray(cw.zero_point.numpy().reshape(n, -1).T)
    return np.ascontiguousarray(codes), scale, zp, 0


def pack_int4(values: np.ndarray) -> bytes:
    """ONNX INT4/UINT4 raw data: two per byte, element 2i in the low nibble."""
    return pack(np.asarray(values).reshape(-1), NIBBLES).tobytes()
