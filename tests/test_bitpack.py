"""The one bit-packing module: every layout round-trips, and each matches its format's own description."""

import numpy as np
import pytest
import torch

from qcompiler import _kernels
from qcompiler.bitpack import AWQ_GEMM, NIBBLES, NIBBLES_HIGH_FIRST, Layout, int32_words, pack, pack_nibbles, unpack


@pytest.mark.parametrize("layout", [NIBBLES, NIBBLES_HIGH_FIRST, AWQ_GEMM, int32_words(4), int32_words(2),
                                    int32_words(8), Layout(2), Layout(8)])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_round_trip(layout, signed, axis):
    rng = np.random.default_rng(layout.bits + layout.word_bits)
    lo, hi = (-(1 << (layout.bits - 1)), 1 << (layout.bits - 1)) if signed else (0, 1 << layout.bits)
    codes = rng.integers(lo, hi, size=(5, 19, 13)).astype(np.int8 if signed else np.uint8)
    packed = pack(codes, layout, axis=axis)
    assert packed.dtype == (np.uint8 if layout.word_bits == 8 else np.int32)
    assert packed.shape[axis] == -(-codes.shape[axis] // layout.per)  # padded to whole words
    back = unpack(packed, layout, codes.shape[axis], axis=axis, signed=signed)
    assert back.dtype == codes.dtype and np.array_equal(back, codes)
    t = pack(torch.from_numpy(codes), layout, axis=axis)  # torch in, torch out, the same words
    assert isinstance(t, torch.Tensor) and np.array_equal(t.numpy(), packed)


def test_the_layouts_put_each_code_where_their_formats_say():
    codes = np.arange(8, dtype=np.uint8)  # 0..7: each code's position is visible in the word
    assert pack(codes[:2], NIBBLES)[0] == 0x10  # OpenVINO / ONNX: element 0 in the low nibble
    assert pack(codes[:2], NIBBLES_HIGH_FIRST)[0] == 0x01  # bitsandbytes: element 0 in the high nibble
    assert pack(codes, int32_words(4))[0] == 0x76543210  # GPTQ: code k at bits 4k
    # AutoAWQ GEMM: nibble p holds column [0, 2, 4, 6, 1, 3, 5, 7][p]
    assert pack(codes, AWQ_GEMM)[0] == 0x75316420
    assert pack(np.array([-8, 7], np.int8), NIBBLES)[0] == 0x78  # two's complement of signed codes
    assert int(pack(np.array([7] * 8, np.uint8), int32_words(4))[0]) == 0x77777777  # GPTQ v1's sym zero word


@pytest.mark.parametrize("n", [1, 2, 7, 4096 + 3])
def test_pack_nibbles_is_the_nibbles_layout(monkeypatch, n):
    codes = torch.randint(-8, 8, (n,), dtype=torch.int8)
    expected = pack(codes, NIBBLES)
    assert torch.equal(pack_nibbles(codes), expected)
    if _kernels.get() is not None:
        monkeypatch.setenv("QCOMPILER_TORCH_KERNELS", "1")
        assert torch.equal(pack_nibbles(codes), expected)


def test_a_layout_that_cannot_fill_its_words_is_refused():
    with pytest.raises(ValueError, match="do not fill"):
        Layout(3, 8)  # a stream spills only across int32 words
    with pytest.raises(ValueError, match="do not fill"):
        Layout(3, 32, (0,) * 10)  # slots of a spilling stream cannot be reordered
    with pytest.raises(ValueError, match="permutation"):
        Layout(4, 8, (0, 0))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 31, 33, 96])
def test_int32_words_are_a_dense_bit_stream(bits, n):
    """Code i at stream bits [bits*i, bits*(i+1)), word w holding stream bits [32w, 32w+32): a 3-bit code
    spills into the next word (GPTQ's 3-bit layout, compressed-tensors' pack_to_int32)."""
    rng = np.random.default_rng(bits * 100 + n)
    codes = rng.integers(0, 2**bits, size=(3, n)).astype(np.uint8)
    packed = pack(codes, int32_words(bits))
    assert packed.dtype == np.int32 and packed.shape == (3, -(-n * bits // 32))
    for r in range(3):
        stream = [((int(w) & 0xFFFFFFFF) >> b) & 1 for w in packed[r] for b in range(32)]
        expected = [sum(stream[bits * i + b] << b for b in range(bits)) for i in range(n)]
        assert expected == codes[r].tolist()
    assert np.array_equal(unpack(packed, int32_words(bits), n), codes)
