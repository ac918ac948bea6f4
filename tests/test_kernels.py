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
    (Mode.INT4_SYM, -1), (Mode.NF4, 32), (Mode.MXFP4, 32), (Mode.INT3_SYM, 32), (Mode.INT2_ASYM, 64),
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


@pytest.mark.parametrize("mode,group_size", [(Mode.INT8_ASYM, -1), (Mode.INT8_SYM, -1), (Mode.INT4_SYM, 64),
                                             (Mode.INT4_ASYM, 32), (Mode.INT2_ASYM, 64), (Mode.NF4, 32)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transposed", [False, True])
def test_half_weights_quantize_as_their_float32_copy(monkeypatch, mode, group_size, dtype, transposed):
    """A bf16 / f16 weight (a half-precision checkpoint read as stored) gets the codes, scales and zero
    points of its exact float32 copy, on the C path (widened group by group) and the torch path."""
    for seed in range(3):
        w = weights(seed).clamp(-1e4, 1e4).to(dtype)  # finite in f16 too
        w[5, :32] = torch.finfo(dtype).tiny / 4  # subnormal halves widen exactly too
        tensor, axes = (w.t().contiguous(), (0,)) if transposed else (w, (1,))
        for torch_path in (False, True):
            if torch_path:
                monkeypatch.setenv("QCOMPILER_TORCH_KERNELS", "1")
            half, full = quantize(tensor, axes, mode, group_size), quantize(tensor.float(), axes, mode, group_size)
            monkeypatch.delenv("QCOMPILER_TORCH_KERNELS", raising=False)
            assert half.codes.dtype == full.codes.dtype and torch.equal(half.codes, full.codes)
            assert torch.equal(half.scale, full.scale)
            assert (half.zero_point is None and full.zero_point is None) or torch.equal(half.zero_point,
                                                                                     full.zero_point)


@pytest.mark.parametrize("mode", [Mode.INT8_ASYM, Mode.INT8_SYM])
def test_c_error_equals_the_torch_error(monkeypatch, mode):
    w = weights(0)
    c = quantization_error(w, (1,), mode, -1)
    monkeypatch.setenv("QCOMPILER_TORCH_KERNELS", "1")
    assert c == pytest.approx(quantization_error(w, (1,), mode, -1), rel=1e-5)


@pytest.mark.parametrize("n", [1, 2, 7, 4096 + 3])
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8])
def test_c_nibble_packing_equals_the_torch_path(monkeypatch, n, dtype):
    from qcompiler.bitpack import pack_nibbles

    torch.manual_seed(n)
    codes = torch.randint(-8, 8, (n,), dtype=dtype) if dtype == torch.int8 else torch.randint(0, 16, (n,), dtype=dtype)
    c = pack_nibbles(codes)
    monkeypatch.setenv("QCOMPILER_TORCH_KERNELS", "1")
    t = pack_nibbles(codes)
    assert c.dtype == t.dtype == torch.uint8 and c.numel() == (n + 1) // 2 and torch.equal(c, t)
    assert int(c[0]) & 0x0F == int(codes[0]) & 0x0F  # element 0 in the low nibble


@pytest.mark.parametrize("mode,group_size", [
    (Mode.INT4_SYM, 64), (Mode.INT4_ASYM, 32), (Mode.INT4_SYM, -1), (Mode.INT8_ASYM, 64), (Mode.INT4_SYM, 12),
    (Mode.INT3_ASYM, 32), (Mode.INT2_SYM, 64),
])
def test_c_scale_estimation_equals_the_torch_path(monkeypatch, mode, group_size):
    """The C refit (tiles of 8 rows; 93 rows leave a partial tile, group 12 takes the scalar error) picks
    the torch path's scales: equal up to ties that float summation order decides."""
    from qcompiler.weight_fit import estimate, hessian_blocks

    torch.manual_seed(1)
    w = torch.randn(93, 192) * torch.rand(93, 1) * 0.1
    w[0, :64] = 0.0  # an all-zero group
    w[2, 5] = 4.0  # an outlier
    x = torch.randn(512, 192) * torch.rand(192) * 3
    g = 192 if group_size == -1 else group_size
    blocks, importance = hessian_blocks(x.t() @ x / 512, g), x.abs().amax(0)
    c, c_before, c_after = estimate(w, blocks, importance, mode, group_size, 5, 10)
    monkeypatch.setenv("QCOMPILER_TORCH_KERNELS", "1")
    t, t_before, t_after = estimate(w, blocks, importance, mode, group_size, 5, 10)
    assert c_before == pytest.approx(t_before, rel=1e-4) and c_after == pytest.approx(t_after, rel=1e-4)
    assert c_after < c_before
    assert (c.scale == t.scale).float().mean() > 0.9 and (c.codes == t.codes).float().mean() > 0.99
    assert (c.zero_point is None and t.zero_point is None) or torch.equal(c.zero_point, t.zero_point)


@pytest.mark.parametrize("mode,group_size", [(Mode.INT4_SYM, 64), (Mode.INT4_ASYM, 32), (Mode.INT8_ASYM, -1),
                                             (Mode.INT3_SYM, 32)])
def test_c_awq_residual_equals_the_torch_path(monkeypatch, mode, group_size):
    from qcompiler.quant import awq_residual

    w = weights(1)[5:]  # no powers of two: W * s must stay finite
    s = torch.rand(256) * 2 + 0.1
    c = awq_residual(w, s, mode, group_size)
    monkeypatch.setenv("QCOMPILER_TORCH_KERNELS", "1")
    t = awq_residual(w, s, mode, group_size)
    assert torch.equal(c, t) and c.abs().max() > 0
