"""Bit packing: the one place where integer codes are packed into words and unpacked again.

A `Layout` packs `per = word_bits // bits` consecutive codes along one axis into one word of
`word_bits` bits (8: uint8 bytes; 32: int32 words, as GPTQ, AWQ and compressed-tensors checkpoints
store them): slot i of a word (bits [bits*i, bits*(i+1))) holds code `order[i]` of its run. The
natural order (slot i holds code i, the first code in the low bits) is OpenVINO's u4/i4/nf4, ONNX's
INT4/UINT4, MatMulNBits', the torch backend's, and GPTQ's and compressed-tensors' int32 packing
along the input dimension; bitsandbytes' NF4 (onnxruntime's MatMulBnb4) puts the first code in the
high nibble (`NIBBLES_HIGH_FIRST`); AutoAWQ's GEMM layout interleaves a word's 8 codes as
0, 2, 4, 6, 1, 3, 5, 7 (`AWQ_GEMM`). The packed axis is padded with zero codes to whole words.
Codes are taken modulo 2**bits (a signed code is stored in two's complement); `unpack(...,
signed=True)` gives them back signed. A code width that does not divide 32 (3 bits) packs as a
dense bit stream in int32 words: code i at bits [bits*i, bits*(i+1)) of the stream, word w holding
stream bits [32w, 32w+32), so a code may spill into the next word -- GPTQ's 3-bit layout (10 codes,
2 bits of the 11th | its last bit, 10 codes, 1 bit | ...) and compressed-tensors' `pack_to_int32`.

`pack` and `unpack` take and return numpy arrays or torch tensors alike. `pack_nibbles` is the
hot path of the lowerings (one C pass, `qcompiler._kernels`), the same bytes as `pack(values,
NIBBLES)` on the flattened codes (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qcompiler import _kernels


@dataclass(frozen=True)
class Layout:
    bits: int
    word_bits: int = 8
    order: tuple[int, ...] | None = None  # slot i holds code order[i] of the run; None: 0, 1, 2, ...

    def __post_init__(self) -> None:
        if self.word_bits not in (8, 32) or not 1 <= self.bits <= 8 or (self.word_bits % self.bits and (
                self.word_bits != 32 or self.order is not None)):
            raise ValueError(f"{self.bits}-bit codes do not fill {self.word_bits}-bit words")
        if self.order is not None and sorted(self.order) != list(range(self.per)):
            raise ValueError(f"order {self.order} is not a permutation of the {self.per} slots of a word")

    @property
    def spills(self) -> bool:
        """Codes cross word boundaries: a dense bit stream (3-bit codes in 32-bit words)."""
        return self.word_bits % self.bits != 0

    @property
    def per(self) -> int:
        return self.word_bits // self.bits

    @property
    def slots(self) -> tuple[int, ...]:
        return self.order if self.order is not None else tuple(range(self.per))


NIBBLES = Layout(4)
NIBBLES_HIGH_FIRST = Layout(4, order=(1, 0))
AWQ_GEMM = Layout(4, 32, (0, 2, 4, 6, 1, 3, 5, 7))


def int32_words(bits: int) -> Layout:
    """GPTQ's and compressed-tensors' packing: codes in int32 words, the first in the low bits."""
    return Layout(bits, 32)


def pack(codes, layout: Layout, axis: int = -1):
    """`codes` (integers, any dtype) packed along `axis`: uint8 for 8-bit words, int32 for 32-bit.
    Works in the word's own width (one byte per 4-bit code for bytes), never in 64-bit temporaries."""
    as_torch = isinstance(codes, torch.Tensor)
    x = np.moveaxis(codes.numpy() if as_torch else np.asarray(codes), axis, -1)
    if x.dtype.kind not in "iu":
        raise TypeError(f"codes to pack must be integers, not {x.dtype}")
    if layout.spills:
        out = _pack_stream(x, layout.bits)
        out = np.ascontiguousarray(np.moveaxis(out, -1, axis))
        return torch.from_numpy(out) if as_torch else out
    n, per = x.shape[-1], layout.per
    word = np.uint8 if layout.word_bits == 8 else np.uint32
    runs = np.zeros((*x.shape[:-1], -(-n // per) * per), dtype=word)
    u = x.view(np.dtype(f"u{x.dtype.itemsize}"))  # two's complement of signed codes
    runs[..., :n] = (u & u.dtype.type((1 << layout.bits) - 1)).astype(word)
    runs = runs.reshape(*x.shape[:-1], -1, per)
    out = np.zeros(runs.shape[:-1], dtype=word)
    for slot, code in enumerate(layout.slots):
        out |= runs[..., code] << word(layout.bits * slot)
    if layout.word_bits == 32:
        out = out.view(np.int32)
    out = np.ascontiguousarray(np.moveaxis(out, -1, axis))
    return torch.from_numpy(out) if as_torch else out


def unpack(packed, layout: Layout, count: int, axis: int = -1, signed: bool = False):
    """The first `count` codes along `axis` of `packed` (`pack`'s output): uint8, or int8 when
    `signed` (two's complement of `bits` bits)."""
    as_torch = isinstance(packed, torch.Tensor)
    p = np.moveaxis(packed.numpy() if as_torch else np.asarray(packed), axis, -1)
    word = np.uint8 if layout.word_bits == 8 else np.uint32
    p = p.view(word) if p.dtype.itemsize == np.dtype(word).itemsize else p.astype(word)
    if layout.spills:
        codes = _unpack_stream(p, layout.bits, count)
    else:
        runs = np.empty((*p.shape, layout.per), dtype=np.uint8)
        mask = word((1 << layout.bits) - 1)
        for slot, code in enumerate(layout.slots):
            runs[..., code] = (p >> word(layout.bits * slot)) & mask
        codes = runs.reshape(*p.shape[:-1], -1)[..., :count]
    if signed:
        codes = codes.view(np.int8)
        if layout.bits < 8:  # sign-extend the top bit of the code
            half = np.int8(1 << (layout.bits - 1))
            codes = (codes ^ half) - half
    out = np.ascontiguousarray(np.moveaxis(codes, -1, axis))
    return torch.from_numpy(out) if as_torch else out


def _stream_positions(bits: int):
    """For the 32 codes of one chunk (32 * bits stream bits = `bits` whole words): each code's word
    and bit offset."""
    return [((j * bits) // 32, (j * bits) % 32) for j in range(32)]


def _pack_stream(x: np.ndarray, bits: int) -> np.ndarray:
    n = x.shape[-1]
    chunks = -(-n // 32)
    u = np.zeros((*x.shape[:-1], chunks * 32), dtype=np.uint64)
    u[..., :n] = x.view(np.dtype(f"u{x.dtype.itemsize}")) & ((1 << bits) - 1)
    u = u.reshape(*x.shape[:-1], chunks, 32)
    words = np.zeros((*x.shape[:-1], chunks, bits), dtype=np.uint64)
    for j, (w, off) in enumerate(_stream_positions(bits)):
        words[..., w] |= u[..., j] << np.uint64(off)  # bits past 32 are the spill into the next word
        if off + bits > 32:
            words[..., w + 1] |= u[..., j] >> np.uint64(32 - off)
    words = (words & np.uint64(0xFFFFFFFF)).astype(np.uint32).reshape(*x.shape[:-1], chunks * bits)
    return words[..., :-(-n * bits // 32)].view(np.int32)


def _unpack_stream(p: np.ndarray, bits: int, count: int) -> np.ndarray:
    n_words = p.shape[-1]
    chunks = -(-n_words // bits)
    words = np.zeros((*p.shape[:-1], chunks * bits), dtype=np.uint64)
    words[..., :n_words] = p
    words = words.reshape(*p.shape[:-1], chunks, bits)
    codes = np.empty((*p.shape[:-1], chunks, 32), dtype=np.uint8)
    mask = np.uint64((1 << bits) - 1)
    for j, (w, off) in enumerate(_stream_positions(bits)):
        value = words[..., w] >> np.uint64(off)
        if off + bits > 32:
            value = value | (words[..., w + 1] << np.uint64(32 - off))
        codes[..., j] = (value & mask).astype(np.uint8)
    return codes.reshape(*p.shape[:-1], chunks * 32)[..., :count]


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """The 4-bit codes in `values` (one per byte, any 1-byte dtype), flattened, as uint8
    [ceil(n / 2)] in the `NIBBLES` layout: one C pass where the kernels are built."""
    raw = values.contiguous().view(torch.uint8).reshape(-1)
    kernels = _kernels.get()
    if kernels is not None:
        return kernels.pack_nibbles(raw)
    return pack(raw, NIBBLES)
