"""GGML block formats (GGUF's quantized tensor types): their layouts and llama.cpp's reference quantizers.

A row of K weights is cut into blocks of `block` values stored in `size` bytes each:
- Q8_0: d = amax / 127, q = round-half-away(x / d) in int8;            x ~ d * q.
- Q4_0 / Q5_0: d = m / -8 (-16), m the value of largest |x|, q = min(2^b - 1, trunc(x / d + 2^(b-1) + 0.5));
  x ~ d * (q - 2^(b-1)). The extreme value lands exactly on the code 0.
- Q4_1 / Q5_1: d = (max - min) / (2^b - 1), m = min, q = min(2^b - 1, trunc((x - m) / d + 0.5)); x ~ d * q + m.
- Q4_K: super-blocks of 256 = 8 sub-blocks of 32. Each sub-block's (scale, min) comes from llama.cpp's
  weighted search (`make_qkx2_quants`: 21 candidate grids, each refitted by weighted least squares,
  weights |x| + rms(x)); the 8 scales and 8 mins are stored as 6-bit multiples of the super-block's
  f16 d and dmin; the codes are then re-rounded against the stored values: x ~ d*sc*q - dmin*m.
- Q6_K: super-blocks of 256 = 16 sub-blocks of 16; each sub-block scale from `make_qx_quants`
  (19 candidate grids, the one maximising (sum w x l)^2 / sum w l^2 with w = x^2), stored as int8
  multiples of an f16 d; codes in [-32, 31] re-rounded against the stored scales: x ~ d*sc*q.
Every division is done on the f32 value (not its f16 rounding) and only then stored in f16, as
ggml's C reference and gguf-py's numpy quantizers do, so Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 bytes equal
gguf-py's. The K-quants are vectorised ports of `quantize_row_q4_K_ref` / `quantize_row_q6_K_ref`
(gguf-py has no quantizer for them), with C's left-to-right f32 sums, so their bytes equal the C
reference's. Decoding uses gguf-py's dequantizers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QK_K = 256
GROUP_MAX_EPS = np.float32(1e-15)
F32 = np.float32


@dataclass(frozen=True)
class BlockType:
    """One GGML tensor type: its GGUF id, values per block and bytes per block."""

    name: str
    type_id: int
    block: int
    size: int

    @property
    def bits_per_weight(self) -> float:
        return self.size * 8 / self.block

    @property
    def float(self) -> bool:
        return self.block == 1


TYPES: dict[str, BlockType] = {t.name: t for t in (
    BlockType("f32", 0, 1, 4), BlockType("f16", 1, 1, 2), BlockType("bf16", 30, 1, 2),
    BlockType("q4_0", 2, 32, 18), BlockType("q4_1", 3, 32, 20), BlockType("q5_0", 6, 32, 22),
    BlockType("q5_1", 7, 32, 24), BlockType("q8_0", 8, 32, 34), BlockType("q4_k", 12, QK_K, 144),
    BlockType("q6_k", 14, QK_K, 210),
)}
BY_ID = {t.type_id: t for t in TYPES.values()}


def quantize(matrix: np.ndarray, type_name: str) -> np.ndarray:
    """Rows of float weights [N, K] as blocks of `type_name`: uint8 [N, K / block * size]."""
    t = TYPES[type_name]
    x = np.ascontiguousarray(matrix, dtype=F32)
    n, k = x.shape
    if k % t.block:
        raise ValueError(f"{type_name} blocks hold {t.block} values; a row of {k} does not divide into them")
    blocks = x.reshape(-1, t.block)
    out = np.empty((blocks.shape[0], t.size), dtype=np.uint8)
    step = max(1, (1 << 16) // t.block)  # blocks at a time: the searches' temporaries stay small
    for i in range(0, blocks.shape[0], step):
        out[i:i + step] = _QUANTIZERS[type_name](blocks[i:i + step])
    return out.reshape(n, -1)


def dequantize(data: np.ndarray, type_name: str, shape: tuple[int, int]) -> np.ndarray:
    """Blocks of `type_name` back to float32 [N, K] (gguf-py's decoders)."""
    from gguf import GGMLQuantizationType, quants

    kind = GGMLQuantizationType(TYPES[type_name].type_id)
    values = quants.dequantize(np.ascontiguousarray(data, dtype=np.uint8), kind)
    return np.asarray(values, dtype=F32).reshape(shape)


def _seq_sum(v: np.ndarray) -> np.ndarray:
    """Row sums [R, 1] added left to right in f32, as C's loops do (numpy's pairwise sum differs in the
    last bits, enough to change which candidate grid wins)."""
    return np.cumsum(v, axis=1, dtype=F32)[:, -1:]


def _nearest(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: round half to even in f32."""
    return np.rint(v).astype(np.int32)


def _f16(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=F32).astype(np.float16)


def _half_bytes(v: np.ndarray) -> np.ndarray:
    return _f16(v).reshape(-1, 1).view(np.uint8)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """32 codes per block -> 16 bytes: byte j holds code j (low nibble) and code j + 16 (high)."""
    q = q.astype(np.uint8)
    return (q[:, :16] & 0x0F) | (q[:, 16:] << 4)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """Bit 4 of 32 codes as a little-endian uint32, 4 bytes."""
    return np.packbits((q.astype(np.uint8) >> 4) & 1, axis=-1, bitorder="little")


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, F32(0), F32(1) / d).astype(F32)


def _q8_0(x: np.ndarray) -> np.ndarray:
    d = (np.abs(x).max(axis=1, keepdims=True) / F32(127)).astype(F32)
    v = x * _inverse(d)
    q = (np.sign(v) * np.floor(np.abs(v) + F32(0.5))).astype(np.int8)  # C's roundf: half away from zero
    return np.concatenate([_half_bytes(d), q.view(np.uint8)], axis=1)


def _signed_max(x: np.ndarray) -> np.ndarray:
    """The value of largest magnitude in each row (the first one on ties)."""
    return np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)


def _q4_0(x: np.ndarray) -> np.ndarray:
    d = (_signed_max(x) / F32(-8)).astype(F32)
    q = np.clip(np.trunc(x * _inverse(d) + F32(8.5)), 0, 15)
    return np.concatenate([_half_bytes(d), _nibbles(q)], axis=1)


def _q5_0(x: np.ndarray) -> np.ndarray:
    d = (_signed_max(x) / F32(-16)).astype(F32)
    q = np.clip(np.trunc(x * _inverse(d) + F32(16.5)), 0, 31)
    return np.concatenate([_half_bytes(d), _high_bits(q), _nibbles(q)], axis=1)


def _min_max(x: np.ndarray, levels: int):
    lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    d = ((hi - lo) / F32(levels)).astype(F32)
    q = np.clip(np.trunc((x - lo) * _inverse(d) + F32(0.5)), 0, levels)
    return d, lo, q


def _q4_1(x: np.ndarray) -> np.ndarray:
    d, lo, q = _min_max(x, 15)
    return np.concatenate([_half_bytes(d), _half_bytes(lo), _nibbles(q)], axis=1)


def _q5_1(x: np.ndarray) -> np.ndarray:
    d, lo, q = _min_max(x, 31)
    return np.concatenate([_half_bytes(d), _half_bytes(lo), _high_bits(q), _nibbles(q)], axis=1)


def _search_scale_min(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """ggml's make_qkx2_quants on each row of x [R, n] with weights w: (codes, scale, -min), the
    (scale, min) of least weighted squared error among the min/max grid and `nstep` + 1 stretched ones,
    each refitted in closed form (min clamped to <= 0)."""
    lo = np.minimum(x.min(axis=1, keepdims=True), F32(0))
    hi = x.max(axis=1, keepdims=True)
    span = (hi - lo).astype(F32)
    flat = (span == 0)[:, 0]
    span = np.where(span == 0, F32(1), span)
    sum_w = _seq_sum(w)
    sum_x = _seq_sum(w * x)
    iscale = (F32(nmax) / span).astype(F32)
    scale = (F32(1) / iscale).astype(F32)
    codes = np.clip(_nearest(iscale * (x - lo)), 0, nmax)
    best = _seq_sum(w * np.square(scale * codes + lo - x))
    minimum = lo.copy()
    for step in range(nstep + 1):  # as in C, each grid starts from the best min found so far
        span = np.where(flat[:, None], F32(1), hi - minimum).astype(F32)
        iscale = ((F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / span).astype(F32)
        trial = np.clip(_nearest(iscale * (x - minimum)), 0, nmax)
        lf = trial.astype(F32)
        sum_l = _seq_sum(w * lf)
        sum_l2 = _seq_sum(w * lf * lf)
        sum_xl = _seq_sum(w * lf * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive = this_min > 0
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale).astype(F32)
            this_min = np.where(positive, F32(0), this_min).astype(F32)
            error = _seq_sum(w * np.square(this_scale * lf + this_min - x))
        better = (det > 0) & (error < best)
        codes = np.where(better, trial, codes)
        best = np.where(better, error, best)
        scale = np.where(better, this_scale, scale)
        minimum = np.where(better, this_min, minimum)
    codes[flat] = 0
    scale[flat] = 0
    return codes, scale[:, 0], -minimum[:, 0]


def _q4_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32)
    av_x = np.sqrt(_seq_sum(np.square(sub)) / F32(32)).astype(F32)
    codes, scales, mins = _search_scale_min(sub, av_x + np.abs(sub), 15, -1.0, 0.1, 20)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale = np.maximum(scales.max(axis=1, keepdims=True), F32(0))
    max_min = np.maximum(mins.max(axis=1, keepdims=True), F32(0))
    inv_scale = np.where(max_scale > 0, F32(63) / np.where(max_scale > 0, max_scale, 1), F32(0)).astype(F32)
    inv_min = np.where(max_min > 0, F32(63) / np.where(max_min > 0, max_min, 1), F32(0)).astype(F32)
    ls = np.minimum(_nearest(inv_scale * scales) & 0xFF, 63)  # C stores the int in a uint8, then caps it
    lm = np.minimum(_nearest(inv_min * mins) & 0xFF, 63)
    d = _f16(max_scale / F32(63))
    dmin = _f16(max_min / F32(63))
    sub_d = (d.astype(F32) * ls.astype(F32)).reshape(nb * 8, 1)
    sub_m = (dmin.astype(F32) * lm.astype(F32)).reshape(nb * 8, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_nearest((sub + sub_m) / np.where(sub_d == 0, F32(1), sub_d)), 0, 15)
    codes = np.where(sub_d != 0, requant, codes).reshape(nb, 4, 2, 32).astype(np.uint8)
    qs = (codes[:, :, 0] | (codes[:, :, 1] << 4)).reshape(nb, 128)
    packed = np.zeros((nb, 12), dtype=np.uint8)
    packed[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return np.concatenate([d.view(np.uint8), dmin.view(np.uint8), packed, qs], axis=1)


def _search_scale(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_qx_quants(rmse_type=1) on each row: (codes + nmax, scale), the grid among
    iscale = -(nmax + 0.1 i) / m, i in -9..9, that maximises (sum w x l)^2 / sum w l^2, w = x^2."""
    m = _signed_max(x)
    zero = (np.abs(m) < GROUP_MAX_EPS)[:, 0]
    m = np.where(np.abs(m) < GROUP_MAX_EPS, F32(1), m)
    w = x * x

    def trial(iscale):
        l = np.clip(_nearest(iscale * x), -nmax, nmax - 1)
        lf = l.astype(F32)
        sumlx = _seq_sum(w * x * lf)
        return l, sumlx, _seq_sum(w * lf * lf)

    codes, sumlx, suml2 = trial((F32(-nmax) / m).astype(F32))
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0)).astype(F32)
    best = scale * sumlx
    for i in range(-9, 10):
        if i == 0:
            continue
        l, slx, sl2 = trial((-(F32(nmax) + F32(0.1) * F32(i)) / m).astype(F32))
        better = (sl2 > 0) & (slx * slx > best * sl2)
        with np.errstate(divide="ignore", invalid="ignore"):
            new_scale = np.where(better, slx / sl2, scale).astype(F32)
        codes = np.where(better, l, codes)
        scale = new_scale
        best = np.where(better, scale * slx, best)
    codes = codes + nmax
    codes[zero] = 0
    scale[zero] = 0
    return codes, scale[:, 0]


def _q6_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    sub = x.reshape(nb * 16, 16)
    codes, scales = _search_scale(sub, 32)
    scales = scales.reshape(nb, 16)
    max_scale = np.take_along_axis(scales, np.abs(scales).argmax(axis=1)[:, None], axis=1)
    empty = (np.abs(max_scale) < GROUP_MAX_EPS)[:, 0]
    max_scale = np.where(empty[:, None], F32(1), max_scale)
    iscale = (F32(-128) / max_scale).astype(F32)
    d = _f16(F32(1) / iscale)
    sc = np.minimum(127, _nearest(iscale * scales)).astype(np.int8)
    sub_d = (d.astype(F32) * sc.astype(F32)).reshape(nb * 16, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_nearest(sub / np.where(sub_d == 0, F32(1), sub_d)), -32, 31) + 32
    codes = np.where(sub_d != 0, requant, codes).reshape(nb, 2, 4, 32).astype(np.uint8)
    low = codes & 0xF
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    high = codes >> 4
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    block = np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8), d.view(np.uint8)], axis=1)
    block[empty] = 0
    return block


_QUANTIZERS = {"q8_0": _q8_0, "q4_0": _q4_0, "q4_1": _q4_1, "q5_0": _q5_0, "q5_1": _q5_1, "q4_k": _q4_k, "q6_k": _q6_k}


def pack(type_name: str, codes: np.ndarray, d: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
    """Blocks [R, size] of q4_0, q4_1 or q8_0 holding R groups of 32 given codes as the blocks store them
    (q4_0: 0..15 with offset 8; q4_1: 0..15; q8_0: int8), scales `d` [R] and, for q4_1, minimums `m` [R]
    (both stored as f16): the inverse of `fields`, for codes a data-aware pass chose."""
    codes = np.asarray(codes).reshape(-1, 32)
    if type_name == "q8_0":
        return np.concatenate([_half_bytes(d), codes.astype(np.int8).view(np.uint8)], axis=1)
    if type_name == "q4_0":
        return np.concatenate([_half_bytes(d), _nibbles(codes)], axis=1)
    if type_name == "q4_1":
        return np.concatenate([_half_bytes(d), _half_bytes(m), _nibbles(codes)], axis=1)
    raise ValueError(f"{type_name} blocks are not built from one integer grid per group of 32")


def fields(data: np.ndarray, type_name: str) -> dict[str, np.ndarray]:
    """The parts of blocks [R, size] of an integer-grid type, per row of blocks (R, groups per block, ...):
    "codes" uint8 [R, G, g], "d" f16 [R, G] and, for the types with a minimum, "m" f16 [R, G], with
    x = d * (codes - offset) + m (offset 8 for q4_0, 0 for q4_1 and q4_k, 128 for q8_0's two's complement).
    q4_k's d and m are per 32-value sub-block: f16 super-block scale times the 6-bit sub-scale, in f32."""
    b = np.ascontiguousarray(data, dtype=np.uint8)
    r = b.shape[0]

    def nibbles(qs):  # [R, 16] -> 32 codes: byte j = code j (low), code j + 16 (high)
        return np.concatenate([qs & 0x0F, qs >> 4], axis=1)[:, None, :]

    if type_name == "q4_0":
        return {"codes": nibbles(b[:, 2:18]), "d": b[:, 0:2].copy().view(np.float16)}
    if type_name == "q4_1":
        return {"codes": nibbles(b[:, 4:20]), "d": b[:, 0:2].copy().view(np.float16),
                "m": b[:, 2:4].copy().view(np.float16)}
    if type_name == "q8_0":
        return {"codes": b[:, None, 2:34].view(np.int8), "d": b[:, 0:2].copy().view(np.float16)}
    if type_name == "q4_k":
        d = b[:, 0:2].copy().view(np.float16).astype(F32)
        dmin = b[:, 2:4].copy().view(np.float16).astype(F32)
        s = b[:, 4:16].astype(np.uint16)
        sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], axis=1)
        mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
        qs = b[:, 16:144].reshape(r, 4, 32)
        codes = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(r, 8, 32)
        return {"codes": codes, "d": d * sc.astype(F32), "m": -(dmin * mn.astype(F32))}
    raise ValueError(f"{type_name} blocks are not one integer grid per group of 32")
