"""The tensors each checkpoint format stores for one quantized Linear, and their decoding.

Every format here stores the same three things for a weight W [N out, K in] in groups of g input
channels: unsigned codes u [N, K] (u = q + 2^(b-1) for a symmetric grid), zero points z [N, K/g]
(2^(b-1) for a symmetric grid) and f16 scales s [N, K/g], with W[n, k] = s[n, k/g] * (u[n, k] -
z[n, k/g]). They differ in the axis and the order the codes are packed in (`qcompiler.bitpack`):

- GPTQ (v1 and v2; auto_round's `auto_round:auto_gptq` packing): `qweight` int32 [K*b/32, N], codes
  packed along the input dim; `qzeros` int32 [K/g, N*b/32] packed along the output dim, storing z - 1
  in v1 (AutoGPTQ's historical offset) and z in v2; `scales` f16 [K/g, N]; `g_idx` int32 [K] = k // g.
- AWQ GEMM (4-bit): `qweight` int32 [K, N/8] and `qzeros` int32 [K/g, N/8] packed along the output
  dim in AutoAWQ's interleaved order; `scales` f16 [K/g, N].
- compressed-tensors pack-quantized: `weight_packed` int32 [N, K*b/32] (the signed code q plus
  2^(b-1), i.e. u, along the input dim), `weight_scale` [N, K/g], `weight_shape` [2], and for an
  asymmetric grid `weight_zero_point` int32 [N*b/32, K/g] (packed along the output dim).

`encode` writes them from a `CompressedWeight` without quantizing again; `decode` reads them back
to (u, z, s), the oracle the tests compare with and the readers of these formats start from.
"""

from __future__ import annotations

import numpy as np
import torch

from qcompiler.bitpack import AWQ_GEMM, int32_words, pack, unpack
from qcompiler.errors import QCompilerError
from qcompiler.quant import CompressedWeight

GPTQ, GPTQ_V2, AWQ, COMPRESSED_TENSORS = "gptq", "gptq_v2", "awq", "compressed-tensors"


def parts(cw: CompressedWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u [N, K] uint8, z [N, G] uint8, s [N, G] f16) of an integer-grid weight in the [N, K] view."""
    n, k = cw.matrix_shape
    bits = cw.mode.bits
    u = cw.unsigned_codes().reshape(n, k).numpy()
    groups = cw.scale.numel() // n
    if cw.mode.asymmetric:
        z = cw.zero_point.reshape(n, groups).numpy().astype(np.uint8)
    else:
        z = np.full((n, groups), 1 << (bits - 1), dtype=np.uint8)
    return u, z, cw.scale.reshape(n, groups).numpy().astype(np.float16)


def encode(fmt: str, cw: CompressedWeight, name: str) -> dict[str, torch.Tensor]:
    """The tensors `fmt` stores for the quantized Linear `name` (its module path), keyed by suffix."""
    u, z, s = parts(cw)
    bits = cw.mode.bits
    n, k = u.shape
    g = k if cw.group_size == -1 else cw.group_size
    if fmt in (GPTQ, GPTQ_V2):
        if fmt == GPTQ and (z == 0).any():
            raise QCompilerError(f"{name} has a zero point of 0, which GPTQ v1 cannot store (it stores zero - 1): "
                                 "use --format gptq_v2, or a symmetric mode (--sym)")
        stored = z - 1 if fmt == GPTQ else z
        return {
            "qweight": torch.from_numpy(pack(np.ascontiguousarray(u.T), int32_words(bits), axis=0)),
            "qzeros": torch.from_numpy(pack(np.ascontiguousarray(stored.T), int32_words(bits), axis=1)),
            "scales": torch.from_numpy(np.ascontiguousarray(s.T)),
            "g_idx": torch.arange(k, dtype=torch.int32) // g,
        }
    if fmt == AWQ:
        return {
            "qweight": torch.from_numpy(pack(np.ascontiguousarray(u.T), AWQ_GEMM, axis=1)),
            "qzeros": torch.from_numpy(pack(np.ascontiguousarray(z.T), AWQ_GEMM, axis=1)),
            "scales": torch.from_numpy(np.ascontiguousarray(s.T)),
        }
    if fmt == COMPRESSED_TENSORS:
        out = {
            "weight_packed": torch.from_numpy(pack(u, int32_words(bits), axis=1)),
            "weight_scale": torch.from_numpy(s),
            "weight_shape": torch.tensor([n, k], dtype=torch.int64),
        }
        if cw.mode.asymmetric:
            out["weight_zero_point"] = torch.from_numpy(pack(z, int32_words(bits), axis=0))
        return out
    raise ValueError(f"unknown checkpoint format {fmt}")


def decode(fmt: str, tensors: dict[str, torch.Tensor], bits: int, n: int, k: int,
           asymmetric: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u [N, K], z [N, G], s [N, G] float32) from the stored tensors of one Linear of `fmt`."""
    t = {key: value.numpy() for key, value in tensors.items()}
    if fmt in (GPTQ, GPTQ_V2):
        u = unpack(t["qweight"], int32_words(bits), k, axis=0).T
        z = unpack(t["qzeros"], int32_words(bits), n, axis=1).T.astype(np.int16)
        if fmt == GPTQ:
            z = (z + 1) & ((1 << bits) - 1)
        return u, z.astype(np.uint8), t["scales"].T.astype(np.float32)
    if fmt == AWQ:
        u = unpack(t["qweight"], AWQ_GEMM, n, axis=1).T
        z = unpack(t["qzeros"], AWQ_GEMM, n, axis=1).T
        return u, z, t["scales"].T.astype(np.float32)
    if fmt == COMPRESSED_TENSORS:
        u = unpack(t["weight_packed"], int32_words(bits), k, axis=1)
        s = t["weight_scale"].astype(np.float32)
        if asymmetric:
            z = unpack(t["weight_zero_point"], int32_words(bits), n, axis=0)
        else:
            z = np.full(s.shape, 1 << (bits - 1), dtype=np.uint8)
        return u, z, s
    raise ValueError(f"unknown checkpoint format {fmt}")


def dequantize(u: np.ndarray, z: np.ndarray, s: np.ndarray, g_idx: np.ndarray | None = None) -> np.ndarray:
    """W [N, K] float32 from decoded parts; `g_idx` [K] gives each input channel's group where it is
    not k // g (GPTQ's act-order, compressed-tensors' actorder=group)."""
    n, k = u.shape
    if g_idx is not None and not np.array_equal(g_idx, np.arange(k) // (k // s.shape[1])):
        return (u.astype(np.float32) - z[:, g_idx].astype(np.float32)) * s[:, g_idx]
    g = k // s.shape[1]
    w = (u.reshape(n, -1, g).astype(np.float32) - z[..., None].astype(np.float32)) * s[..., None]
    return w.reshape(n, k)
