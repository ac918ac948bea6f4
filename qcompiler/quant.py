"""Weight quantization math, written once on torch tensors; no backend appears here.

A weight is viewed as a matrix W[N, K] (N output channels, K input channels, the reduction axis
last) and split into groups of g consecutive input channels (g = K: one scale per output channel).
Per group, with b bits:

- asymmetric (INT8_ASYM, INT4_ASYM): lo = min(W, 0), hi = max(W, 0), s = (hi - lo) / (2^b - 1),
  z = clip(-round(lo / s), 0, 2^b - 1), q = clip(round(W / s) + z, 0, 2^b - 1), W ~ (q - z) * s.
- symmetric (INT8_SYM, INT4_SYM): m = the signed value of largest |W|, s = -m / 2^(b-1), so the
  extreme maps to -2^(b-1) and the codes use the full range [-2^(b-1), 2^(b-1) - 1]; W ~ q * s.
- NF4: s = max|W|, q = the nearest of the 16 NF4 levels to W / s; W ~ NF4[q] * s.
- MXFP4 (group 32): s = 2^ceil(log2(max|W| / 6)) stored as an E8M0 exponent, so no value clips;
  q = the nearest E2M1 value to W / s, ties to the even code; W ~ E2M1[q] * s.

Scales are stored as f16 (E8M0 for MXFP4) and the codes are computed from the stored scale, so
the decoded weight is exactly what the runtime computes. These are NNCF's formulas
(`weight_lowering.py`), so the same model compresses to the same codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qcompiler import _kernels
from qcompiler.config import Mode

EPS = torch.finfo(torch.float32).eps

NF4_VALUES = torch.tensor(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0]
)
# E2M1 code -> value: bit 3 is the sign, codes 0..7 are 0, 0.5, 1, 1.5, 2, 3, 4, 6.
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
_E2M1_SORTED = torch.tensor([-6.0, -4.0, -3.0, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_E2M1_SORTED_CODES = torch.tensor([15, 14, 13, 12, 11, 10, 9, 0, 1, 2, 3, 4, 5, 6, 7], dtype=torch.uint8)


@dataclass
class CompressedWeight:
    """Codes and quantization parameters of one weight, in the [N, K] matrix view.

    codes: [N, K/g, g] when grouped, [N, K] per-channel; int8 for symmetric integer modes, uint8
    otherwise (4-bit codes unpacked, one per byte). scale: [N, K/g, 1] or [N, 1], f16 (uint8 E8M0
    exponents, 127 = 2^0, for MXFP4). zero_point: uint8 like scale, asymmetric modes only.
    `transposed` and `shape` say how to turn the [N, K] matrix back into the original tensor.
    """

    mode: Mode
    group_size: int
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    shape: tuple[int, ...]
    transposed: bool = False

    @property
    def matrix_shape(self) -> tuple[int, int]:
        n = self.codes.shape[0]
        return n, self.codes[0].numel()

    def dequantize(self) -> torch.Tensor:
        """The decoded weight in its original shape, float32."""
        values = decode_values(self.mode, self.codes)
        if self.zero_point is not None:
            values = values - self.zero_point.float()
        w = (values * scale_values(self)).reshape(self.matrix_shape)
        return restore(w, self.shape, self.transposed)

    def same_codes(self, other: CompressedWeight) -> bool:
        """Bit-identical codes, scales and zero points in the same format."""
        if (self.mode, self.group_size) != (other.mode, other.group_size) or (self.zero_point is None) != (
                other.zero_point is None):
            return False
        return (torch.equal(self.codes, other.codes) and torch.equal(self.scale, other.scale)
                and (self.zero_point is None or torch.equal(self.zero_point, other.zero_point)))

    def unsigned_codes(self) -> torch.Tensor:
        """uint8 codes of an integer grid shifted to [0, 2^b): a symmetric code plus 2^(b-1) (zero point
        2^(b-1)), an asymmetric one as it is; the form MatMulNBits and the checkpoint formats store."""
        if self.mode.asymmetric:
            return self.codes.to(torch.uint8)
        return (self.codes.to(torch.int16) + (1 << (self.mode.bits - 1))).to(torch.uint8)

    def storage_bits(self) -> int:
        """Bits this weight needs in theory: codes, scales and zero points, nothing else."""
        bits = self.codes.numel() * self.mode.bits + self.scale.numel() * self.mode.scale_bits
        if self.zero_point is not None:
            bits += self.zero_point.numel() * self.mode.bits
        return bits


@dataclass
class BlockWeight(CompressedWeight):
    """A weight in a GGUF block type (`qcompiler.ggml`): `codes` holds the blocks' bytes, uint8
    [N, K / block, bytes per block], scales and minimums inside them as GGUF stores them (`scale` is
    empty, `zero_point` None)."""

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * self.mode.spec.block

    def dequantize(self) -> torch.Tensor:
        from qcompiler import ggml

        n, k = self.matrix_shape
        w = torch.from_numpy(ggml.dequantize(self.codes.reshape(n, -1).numpy(), self.mode.value, (n, k)))
        return restore(w, self.shape, self.transposed)

    def same_codes(self, other: CompressedWeight) -> bool:
        return isinstance(other, BlockWeight) and self.mode == other.mode and torch.equal(self.codes, other.codes)

    def unsigned_codes(self) -> torch.Tensor:
        raise TypeError(f"{self.mode} blocks are not a grid of integer codes")

    def storage_bits(self) -> int:
        return self.codes.numel() * 8


def integer_form(cw: BlockWeight) -> tuple[CompressedWeight, bool] | None:
    """The GGUF blocks of `cw` as an integer grid of groups of 32 (what OpenVINO, ONNX and the
    checkpoint formats store), and whether it decodes to exactly the same values; None when no such
    grid exists (q5_*, q6_k: 5- and 6-bit codes).
    - q4_0 -> int4_sym (codes q - 8, scale d) and q8_0 -> int8_sym (codes q, scale d): exact.
    - q4_1 (x = d q + m) and q4_k (x = d_j q - m_j) -> int4_asym with the codes as they are, f16 scale d
      and a zero point -m / d in f16 (a float zero point, not the integer one of int4_asym): close, not
      exact (f16 rounding of -m / d, and for q4_k of the product d_j).
    """
    from qcompiler import ggml

    name = cw.mode.value
    if name not in ("q4_0", "q8_0", "q4_1", "q4_k"):
        return None
    n, k = cw.matrix_shape
    f = ggml.fields(cw.codes.reshape(-1, ggml.TYPES[name].size).numpy(), name)
    per_row = k // 32
    codes = torch.from_numpy(np.ascontiguousarray(f["codes"])).reshape(n, per_row, 32)
    d = torch.from_numpy(np.asarray(f["d"], dtype=np.float32)).reshape(n, per_row, 1)
    if name in ("q4_0", "q8_0"):
        mode = Mode.INT4_SYM if name == "q4_0" else Mode.INT8_SYM
        signed = codes.to(torch.int8) - 8 if name == "q4_0" else codes.to(torch.int8)
        return CompressedWeight(mode, 32, signed.to(torch.int8), d.half(), None, cw.shape, cw.transposed), True
    m = torch.from_numpy(np.asarray(f["m"], dtype=np.float32)).reshape(n, per_row, 1)
    scale = d.half()
    safe = torch.where(scale.float() == 0, torch.ones_like(d), scale.float())
    zero = (-m / safe).half()
    # a group whose scale is 0 (a constant group) or whose -m / d leaves f16's range (a nearly constant one
    # far from 0): codes 0, zero point -1, scale = the group's mean value, so (0 + 1) * scale is that value
    flat = (scale.float() == 0) | ~torch.isfinite(zero.float())
    codes = codes.to(torch.uint8)
    if flat.any():
        mean = cw.dequantize().reshape(n, per_row, 32).mean(-1, keepdim=True)
        codes = torch.where(flat, torch.zeros_like(codes), codes)
        zero = torch.where(flat, torch.full_like(zero, -1.0), zero)
        scale = torch.where(flat, mean.half(), scale)
    return CompressedWeight(Mode.INT4_ASYM, 32, codes, scale, zero, cw.shape, cw.transposed), False


# the GGUF block type that holds an integer grid of groups of 32 (the inverse of `integer_form`)
GGUF_BLOCKS = {(Mode.INT4_SYM, 32): "q4_0", (Mode.INT8_SYM, 32): "q8_0", (Mode.INT4_ASYM, 32): "q4_1"}


def block_form(cw: CompressedWeight) -> tuple[BlockWeight, float] | None:
    """`cw`'s codes and scales as the GGUF blocks that hold them, and the largest difference between
    what the blocks and `cw` decode to; None when no block type holds `cw`'s grid (see `GGUF_BLOCKS`).
    - int4_sym g32 -> q4_0 (codes + 8, scale d) and int8_sym g32 -> q8_0 (codes, scale d): exact, 0.
    - int4_asym g32 -> q4_1 (codes, scale d, minimum m = -d z in f16): the f16 rounding of m, close
      but not exact."""
    from qcompiler import ggml

    name = GGUF_BLOCKS.get((cw.mode, cw.group_size))
    if name is None or isinstance(cw, BlockWeight) or cw.transposed or len(cw.shape) != 2 or cw.shape[1] % 32:
        return None
    n, k = cw.shape
    codes = cw.codes.reshape(-1, 32)
    if name == "q4_0":
        codes = (codes.to(torch.int16) + 8).to(torch.uint8)
    scale = cw.scale.float().reshape(-1)
    m = None if name != "q4_1" else (-scale * cw.zero_point.float().reshape(-1)).numpy()
    blocks = ggml.pack(name, codes.numpy(), scale.numpy(), m)
    bw = BlockWeight(Mode(name), 32, torch.from_numpy(blocks).reshape(n, k // 32, -1), torch.empty(0), None,
                     tuple(cw.shape), False)
    error = 0.0 if m is None else float((bw.dequantize() - cw.dequantize()).abs().max())
    return bw, error


def scale_values(cw: CompressedWeight) -> torch.Tensor:
    return _scale_float(cw.mode, cw.scale)


def _scale_float(mode: Mode, scale: torch.Tensor) -> torch.Tensor:
    if mode.scale_bits == 8:  # an E8M0 exponent
        return torch.exp2(scale.float() - 127.0)
    return scale.float()


def decode_values(mode: Mode, codes: torch.Tensor) -> torch.Tensor:
    levels = mode.spec.levels
    return codes.float() if levels is None else LEVEL_VALUES[levels][codes.long()]


def matrix_view(tensor: torch.Tensor, reduction_axes: tuple[int, ...]) -> tuple[torch.Tensor, bool]:
    """The weight as [N, K] with the reduction axes flattened last; True if it was transposed."""
    rank = tensor.dim()
    if rank == 2 and tuple(reduction_axes) == (0,):
        return tensor.t(), True
    if rank > 2 and tuple(reduction_axes) == (rank - 2,):  # batched `x @ W`, W [..., in, out] (MoE experts)
        t = tensor.transpose(-1, -2)
        return t.reshape(-1, t.shape[-1]), True
    if tuple(reduction_axes) == tuple(range(rank - len(reduction_axes), rank)):  # [out..., in...] -> [N, K]
        k = 1
        for axis in reduction_axes:
            k *= tensor.shape[axis]
        return tensor.reshape(-1, k), False
    raise ValueError(f"unsupported reduction axes {reduction_axes} for a weight of shape {tuple(tensor.shape)}")


def restore(matrix: torch.Tensor, shape: tuple[int, ...], transposed: bool) -> torch.Tensor:
    if not transposed:
        return matrix.reshape(shape)
    if len(shape) == 2:
        return matrix.t().contiguous()
    return matrix.reshape(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2).contiguous()


def quantize(tensor: torch.Tensor, reduction_axes: tuple[int, ...], mode: Mode, group_size: int) -> CompressedWeight:
    """Round-to-nearest quantization of one weight; `group_size` -1 means per output channel.
    GGUF block types use llama.cpp's reference quantizers (their own scale searches)."""
    matrix, transposed = matrix_view(tensor, reduction_axes)
    if mode.spec.ggml:
        from qcompiler import ggml

        blocks = torch.from_numpy(ggml.quantize(matrix.float().numpy(), mode.value))
        codes = blocks.reshape(matrix.shape[0], matrix.shape[1] // mode.spec.block, -1)
        return BlockWeight(mode, mode.spec.block, codes, torch.empty(0), None, tuple(tensor.shape), transposed)
    c = _kernels.get()
    if c is not None:  # the same formulas in C, one pass over memory, multithreaded
        table = _LEVEL_SEARCH.get(mode.spec.levels, (None, None))
        half = table[0] is None and matrix.dtype in _kernels.HALF  # widened in the kernel, group by group
        w = grouped(matrix if half else matrix.float(), group_size)
        codes, scale, zero_point = c.quantize(w.contiguous(), mode, *table)
        return CompressedWeight(mode, group_size, codes, scale, zero_point, tuple(tensor.shape), transposed)
    w = grouped(matrix.float(), group_size)
    rows = max(1, BLOCK_ELEMENTS // max(1, w[0].numel()))
    if rows >= w.shape[0]:
        codes, scale, zero_point = _quantizer(mode)(w, mode)
    else:  # blocks of rows, each read from memory once: statistics, scale and codes while in cache
        codes = torch.empty(w.shape, dtype=code_dtype(mode))
        scale = zero_point = None
        for i in range(0, w.shape[0], rows):
            c, s, z = _quantizer(mode)(w[i:i + rows], mode)
            if scale is None:
                scale = s.new_empty((w.shape[0], *s.shape[1:]))
                zero_point = None if z is None else z.new_empty(scale.shape)
            codes[i:i + rows], scale[i:i + rows] = c, s
            if z is not None:
                zero_point[i:i + rows] = z
    return CompressedWeight(mode, group_size, codes, scale, zero_point, tuple(tensor.shape), transposed)


def fake_quantize(matrix: torch.Tensor, mode: Mode, group_size: int) -> torch.Tensor:
    """Q(W) decoded, for a float matrix [N, K]: what `quantize(...).dequantize()` gives, without the
    layout bookkeeping (searches call it many times)."""
    cw = quantize(matrix, (1,), mode, group_size)
    if isinstance(cw, BlockWeight):
        return cw.dequantize().reshape(matrix.shape)
    values = decode_values(mode, cw.codes)
    if cw.zero_point is not None:
        values = values.sub_(cw.zero_point)
    return values.mul_(scale_values(cw)).reshape(matrix.shape)


def awq_residual(matrix: torch.Tensor, s: torch.Tensor, mode: Mode, group_size: int) -> torch.Tensor:
    """W - Q(W * s) / s for a float matrix W [N, K] and per-input-channel scales s [K]: what AWQ's search
    multiplies its calibration rows by. One pass in C for the integer modes where the kernels are built."""
    c = _kernels.get()
    if c is not None and mode.integer:
        g = matrix.shape[1] if group_size == -1 else group_size
        grouped(matrix, g)  # the group size divides K, or the usual error
        return c.awq_residual(matrix, s, mode, g)
    return matrix - fake_quantize(matrix * s, mode, group_size) / s


def quantize_matrix_with_scale(w: torch.Tensor, mode: Mode, scale: torch.Tensor, zero_point):
    """Codes of grouped weights `w` for a given stored scale (and zero point): the rounding step alone."""
    x = w / _scale_float(mode, scale)
    levels = mode.spec.levels
    if levels is not None:
        table, codes = _LEVEL_SEARCH[levels]
        return torch.take(codes, table.index(x))
    x.round_()
    if zero_point is not None:
        return x.add_(zero_point.float()).clamp_(0, 2**mode.bits - 1).to(torch.uint8)
    half = 2 ** (mode.bits - 1)
    return x.clamp_(-half, half - 1).to(torch.int8)


BLOCK_ELEMENTS = 1 << 18  # weights are quantized in blocks of rows of about this size, to stay in cache


class _LevelTable:
    """Index of the nearest of the sorted `levels` for each x, as torch.bucketize on the midpoints gives
    it (the number of midpoints < x; a tie goes left, or with `ties_to_even` to the even index).

    A uniform grid of bins, each holding at most one midpoint and none within 1e-4 of an edge (checked
    here), turns the search into two gathers and one compare: index = below[bin] + (x > threshold[bin]).
    """

    def __init__(self, levels: torch.Tensor, bins: int = 32, ties_to_even: bool = False) -> None:
        mids = ((levels[1:] + levels[:-1]) / 2).double()
        self.width = (levels[-1].item() - levels[0].item()) / bins
        self.start = levels[0].item() - self.width / 2
        self.bins = bins + 1
        pos = (mids - self.start) / self.width
        where = pos.floor().long()
        assert torch.bincount(where).max() <= 1 and (torch.minimum(pos - where, where + 1 - pos) * self.width).min() > 1e-4
        edges = self.start + self.width * torch.arange(self.bins, dtype=torch.float64)
        self.below = (mids[None, :] < edges[:, None]).sum(1)
        # x goes right of the bin's midpoint when x > threshold; a tie going right (to the even index)
        # becomes x >= mid, i.e. x > the float just below mid
        self.threshold = torch.full((self.bins,), float("inf"))
        self.threshold[where] = mids.float()
        if ties_to_even:
            up = (self.below % 2 == 0) & torch.isfinite(self.threshold)
            self.threshold[up] = torch.nextafter(self.threshold[up], torch.tensor(float("-inf")))

    def index(self, x: torch.Tensor) -> torch.Tensor:
        b = (x - self.start).div_(self.width).floor_().clamp_(0, self.bins - 1).long()
        # take is several times faster than advanced indexing here
        return torch.take(self.below, b) + (x > torch.take(self.threshold, b))


def grouped(matrix: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = matrix.shape
    if group_size == -1 or group_size == k:
        return matrix
    if k % group_size:
        raise ValueError(f"group size {group_size} does not divide {k} input channels")
    return matrix.reshape(n, k // group_size, group_size)


def _f16_scale(scale: torch.Tensor) -> torch.Tensor:
    scale = torch.where(scale.abs() < EPS, torch.full_like(scale, EPS), scale)
    half = scale.half()
    tiny = torch.finfo(torch.float16).tiny
    return torch.where(half == 0, torch.full_like(half, tiny), half)


def _asym(w: torch.Tensor, mode: Mode):
    hi_level = 2**mode.bits - 1
    lo, hi = torch.aminmax(w, dim=-1, keepdim=True)
    lo, hi = lo.clamp_(max=0.0), hi.clamp_(min=0.0)
    scale = _f16_scale((hi - lo) / hi_level)
    zero_point = torch.clamp(-torch.round(lo / scale.float()), 0, hi_level).to(torch.uint8)
    return quantize_matrix_with_scale(w, mode, scale, zero_point), scale, zero_point


def _sym(w: torch.Tensor, mode: Mode):
    lo, hi = torch.aminmax(w, dim=-1, keepdim=True)
    lo = lo.abs()
    scale = _f16_scale(torch.where(lo >= hi, lo, -hi) / 2 ** (mode.bits - 1))
    return quantize_matrix_with_scale(w, mode, scale, None), scale, None


def _nf4(w: torch.Tensor, mode: Mode):
    scale = _f16_scale(w.abs().amax(dim=-1, keepdim=True))
    return quantize_matrix_with_scale(w, mode, scale, None), scale, None


def _mxfp4(w: torch.Tensor, mode: Mode):
    amax = torch.clamp(w.abs().amax(dim=-1, keepdim=True) / 6.0, min=EPS)
    mantissa, exponent = torch.frexp(amax)  # amax = m * 2^e, m in [0.5, 1): ceil(log2(amax)), exactly
    exponent = torch.clamp(torch.where(mantissa == 0.5, exponent - 1, exponent), -127, 127)
    scale = (exponent + 127).to(torch.uint8)
    return quantize_matrix_with_scale(w, mode, scale, None), scale, None


_NF4_TABLE = _LevelTable(NF4_VALUES)
_NF4_CODES = torch.arange(16, dtype=torch.uint8)
_E2M1_TABLE = _LevelTable(_E2M1_SORTED, ties_to_even=True)


LEVEL_VALUES = {"nf4": NF4_VALUES, "e2m1": E2M1_VALUES}  # code -> value of each table format
# each table's nearest-level search and the codes of its sorted levels
_LEVEL_SEARCH = {"nf4": (_NF4_TABLE, _NF4_CODES), "e2m1": (_E2M1_TABLE, _E2M1_SORTED_CODES)}
_SCALED_BY_LEVEL = {"nf4": _nf4, "e2m1": _mxfp4}


def _quantizer(mode: Mode):
    """The round-to-nearest function of `mode`, from its description."""
    if mode.integer:
        return _asym if mode.asymmetric else _sym
    return _SCALED_BY_LEVEL[mode.spec.levels]


def code_dtype(mode: Mode) -> torch.dtype:
    """int8 for the signed codes of symmetric integer formats, uint8 otherwise."""
    return torch.int8 if mode.integer and not mode.asymmetric else torch.uint8


def compressed_by_content(graph) -> dict[bytes, CompressedWeight | None]:
    """Each weight's compressed form keyed by its float [N, K] matrix, so the same weight read by two
    frontends (named and laid out differently) meets under one key."""
    out = {}
    for const, uses in graph.uses_by_weight().items():
        matrix = matrix_view(graph.weight(const).float(), uses[0].reduction_axes)[0]
        out[matrix.numpy().tobytes()] = const.meta.get("compressed")
    return out


def quantization_error(tensor: torch.Tensor, reduction_axes: tuple[int, ...], mode: Mode, group_size: int) -> float:
    """max over output channels of mean((dequantize(quantize(W)) - W)^2): NNCF's "max_mean"."""
    matrix, _ = matrix_view(tensor, reduction_axes)
    c = _kernels.get()
    if c is not None and group_size == -1 and mode.bits == 8:
        return c.int_error(matrix.float().contiguous(), mode)
    rows = max(1, BLOCK_ELEMENTS // matrix.shape[1])
    worst = 0.0
    for i in range(0, matrix.shape[0], rows):  # in blocks of rows, so temporaries stay in cache
        block = matrix[i:i + rows].float()
        diff = quantize(block, (1,), mode, group_size).dequantize().reshape(block.shape).sub_(block)
        worst = max(worst, diff.square_().mean(dim=1).max().item())
    return worst


def theoretical_bits_per_weight(mode: Mode, group_size: int, k: int) -> float:
    """Bits per weight of a [N, K] matrix in `mode`: codes plus one scale (and zero point) per group."""
    if mode.spec.ggml:
        from qcompiler import ggml

        return ggml.TYPES[mode.value].bits_per_weight
    g = k if group_size == -1 else group_size
    bits = mode.bits + mode.scale_bits / g
    return bits + mode.bits / g if mode.asymmetric else bits


def search_quantize(matrix: torch.Tensor, mode: Mode, group_size: int, importance: torch.Tensor | None = None,
                    steps: int = 9, span: float = 0.9) -> CompressedWeight:
    """Round to nearest with each group's grid searched, as llama.cpp's quantizers and AutoRound's
    opt-RTN do: among candidate grids, the one of least (importance-weighted) squared error of the
    decoded group, each scale rounded to the f16 it is stored in before the error is measured.
    Symmetric: scale = -m / (2^(b-1) + d), m the group's value of largest magnitude, d on a grid of
    2 * steps + 1 points in [-span, span] (d = 0 is round to nearest, so the search never does worse).
    Asymmetric: the min moved by d units of (max - min) / (2^b - 1) (max fixed), then the max moved
    likewise with the best min (a coordinate search: 2 * (2 * steps + 1) grids, not their product);
    zero point round(-min / scale). `importance` [K] weights each input channel (e.g. its mean
    squared activation); None weighs all equally. Matrix [N, K] float, in blocks of rows; returns the
    compressed weight in the mode's grid, as `quantize` does."""
    n, k = matrix.shape
    g = k if group_size == -1 else group_size
    imp = None if importance is None else importance.float().reshape(1, k // g, g)
    rows = max(1, BLOCK_ELEMENTS // k)
    parts = [_search_rows(grouped(matrix[i:i + rows].float(), g).reshape(-1, k // g, g), mode, imp, steps, span)
             for i in range(0, n, rows)]
    codes = torch.cat([p[0] for p in parts])
    s16 = torch.cat([p[1] for p in parts])
    zero_point = torch.cat([p[2] for p in parts]) if mode.asymmetric else None
    if group_size == -1:
        codes, s16 = codes.reshape(n, k), s16.reshape(n, 1)
        zero_point = None if zero_point is None else zero_point.reshape(n, 1)
    return CompressedWeight(mode, group_size, codes, s16, zero_point, (n, k))


def _search_rows(w: torch.Tensor, mode: Mode, imp, steps: int, span: float):
    low, high = mode.spec.code_range
    offsets = torch.linspace(-span, span, 2 * steps + 1).tolist()
    lo, hi = w.amin(-1, keepdim=True).clamp(max=0.0), w.amax(-1, keepdim=True).clamp(min=0.0)

    def error(scale, zero):
        q = torch.round(w / scale)
        if zero is not None:
            q = q.add_(zero).clamp_(low, high).sub_(zero)
        else:
            q = q.clamp_(low, high)
        e = q.mul_(scale).sub_(w).square_()
        return (e if imp is None else e.mul_(imp)).sum(-1, keepdim=True)

    def grid(cmin, cmax):
        scale = _f16_scale((cmax - cmin).clamp_min(1e-12) / high).float()
        return scale, torch.clamp(torch.round(-cmin / scale), 0, high)

    if mode.asymmetric:
        unit = (hi - lo) / high
        best_min, best_max = lo, hi
        scale, zero = grid(lo, hi)
        best = error(scale, zero)
        for moving_min in (True, False):
            base_min, base_max = best_min, best_max
            for d in offsets:
                cmin, cmax = (base_min + d * unit, base_max) if moving_min else (base_min, base_max + d * unit)
                err = error(*grid(cmin, cmax))
                better = err < best
                best = torch.where(better, err, best)
                best_min = torch.where(better, cmin, best_min)
                best_max = torch.where(better, cmax, best_max)
        scale, zero = grid(best_min, best_max)
        s16 = scale.half()
        codes = torch.clamp(torch.round(w / s16.float()) + zero, low, high).to(torch.uint8)
        return codes, s16, zero.to(torch.uint8)
    peak = torch.where(-lo >= hi, lo, hi)  # the value of largest magnitude, with its sign
    best_scale = _f16_scale(-peak / -low).float()
    best = error(best_scale, None)
    for d in offsets:
        scale = _f16_scale(-peak / (-low + d)).float()
        err = error(scale, None)
        better = err < best
        best = torch.where(better, err, best)
        best_scale = torch.where(better, scale, best_scale)
    s16 = best_scale.half()
    return torch.clamp(torch.round(w / s16.float()), low, high).to(code_dtype(mode)), s16, None
