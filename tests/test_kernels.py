"""The C quantization kernels give exactly the torch path's codes, scales and zero points."""

import pytest
import torch

from qcompiler import _kernels
from qcompiler.config import Mode
from qcompiler.quant import quantization_error, quantize

pytestmark = pytest.mark.skipif(_kernels.get() is None, reason="the C kernels are not built here")


def weights(seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    w = torch.randn(96, 256) * torch.rand(96, 1) * 0.1
    w[0, :32] = 0.0  # an all-zero group: the EPS scale
    w[1, :32] = 1e-9  # below EPS
    w[2, 5] = 40.0  # an outlier
    w[3, :64] = torch.linspace(-1.0, 1.0, 64)  # values on rounding boundaries
    w[4, :32] = 6.0 * 2.0 ** torch.arange(-16, 16).float()  # exact powers of two (MXFP4's ceil(log2))
    return w


@pytest.mark.parametrize("mode,group_size", [
    (Mode.INT8_ASYM, -1), (Mode.INT8_SYM, -1), (Mode.INT4_ASYM, 32), (Mode.INT4_SYM, 64),
    (Mode.INT4_SYM, -1), (Mode.NF4, 32), (Mode.MXFP4, 32),
])
@pytest.mark.parametrize("transposed", [False, True])
def test_c_kernels_equal_the_torch_path(monkeypatch, mode, group_size, transposed):
    for seed in range(3):
        w = weights(seed)
        tensor, axes = (w.t().contiguous(), (0,)) if transposed else (w, (1,))
        c = quantize(tensor, axes, mode, group_size)
        monkeypatch.setenv("QCOMPILER_TORCH_KERNELS", "1")
        t = quantize(tensor, axes, mode, group_size)
        monkeypatch.delenv("QCOMPILER_TORCH_KERNELS")
        assert c.codes.dtype == t.codes.dtype and torch.equal(c.codes, t.codes)
        assert c.scale.dtype == t.scale.dtype and torch.equal(c.scale, t.scale)
        assert (c.zero_point is None and t.zero_point is None) or torch.equal(c.zero_point, t.zero_point)


@pytest.mark.parametrize("mode", [Mode.INT8_ASYM, Mode.INT8_SYM])
def test_c_error_equals_the_torch_error(monkeypatch, mode):
    w = weights(0)
    c = quantization_error(w, (1,), mode, -1)
    monkeypatch.setenv("QCOMPILER_TORCH_KERNELS", "1")
    assert c == pytest.approx(quantization_error(w, (1,), mode, -1), rel=1e-5)


@pytest.mark.parametrize("n", [1, 2, 7, 4096 + 3])
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8])
def test_c_nibble_packing_equals_the_torch_path(monkeypatch, n, dtype):
    from qcompiler.quant import pack_nibbles

    torch.manual_seed(n)
    codes = torch.randint(-8, 8, (n,), dtype=dtype) if dtype == torch.int8 else torch.randint(0, 16, (n,), dtype=dtype)
    c = pack_nibbles(codes)
    monkeypatch.setenv("QCOMPILER_TORCH_KERNELS", "1")
    t = pack_nibbles(codes)
    assert c.dtype == t.dtype == torch.uint8 and c.numel() == (n + 1) // 2 and torch.equal(c, t)
    assert int(c[0]) & 0x0F == int(codes[0]) & 0x0F  # element 0 in the low nibble
