import pytest
import torch

from qcompiler.config import Mode
from qcompiler import quant
from qcompiler.quant import E2M1_VALUES, NF4_VALUES, quantize, theoretical_bits_per_weight


@pytest.fixture
def w():
    torch.manual_seed(0)
    return torch.randn(64, 128)


@pytest.mark.parametrize("mode,group", [(Mode.INT8_ASYM, -1), (Mode.INT8_SYM, -1), (Mode.INT4_ASYM, 32),
                                        (Mode.INT4_SYM, 64), (Mode.NF4, 64), (Mode.MXFP4, 32),
                                        (Mode.INT3_SYM, 32), (Mode.INT3_ASYM, 64), (Mode.INT2_SYM, 32),
                                        (Mode.INT2_ASYM, 32)])
def test_round_trip_error_is_bounded_by_the_step(w, mode, group):
    cw = quantize(w, (1,), mode, group)
    deq = cw.dequantize()
    assert deq.shape == w.shape
    step = cw.scale.float() if mode is not Mode.MXFP4 else torch.exp2(cw.scale.float() - 127)
    grouped = w.reshape(cw.codes.shape)
    err = (deq.reshape(cw.codes.shape) - grouped).abs()
    # integer grids: one step at most (the clipped side of a signed grid, the top of an unsigned one),
    # half a step on average; NF4: half its widest gap (0.152 of absmax); E2M1: half the 4 -> 6 gap
    bound = {Mode.NF4: 0.16, Mode.MXFP4: 1.0}.get(mode, 1.0)
    assert (err <= bound * step.abs() * (1 + 1e-3)).all()
    if mode.integer:
        assert (err / step.abs()).mean() < 0.3
        lo, hi = mode.spec.code_range
        assert cw.codes.min() >= lo and cw.codes.max() <= hi and cw.codes.dtype == quant.code_dtype(mode)


def test_int4_sym_uses_the_full_range(w):
    cw = quantize(w, (1,), Mode.INT4_SYM, 32)
    assert cw.codes.dtype == torch.int8
    assert cw.codes.min() == -8 and cw.codes.max() <= 7
    # in every group the extreme value is the code -8
    extreme = cw.codes.reshape(-1, 32).gather(1, w.reshape(-1, 32).abs().argmax(1, keepdim=True))
    assert (extreme == -8).all()


def test_asym_zero_point_and_codes_in_range(w):
    cw = quantize(w, (1,), Mode.INT4_ASYM, 32)
    assert cw.zero_point.dtype == torch.uint8 and cw.codes.max() <= 15
    assert cw.zero_point.shape == (64, 4, 1) and cw.scale.dtype == torch.float16


def test_mxfp4_scale_is_a_power_of_two_with_no_clipping(w):
    cw = quantize(w, (1,), Mode.MXFP4, 32)
    amax = w.reshape(64, 4, 32).abs().amax(-1, keepdim=True)
    scale = torch.exp2(cw.scale.float() - 127)
    assert (amax / scale <= 6.0).all() and (amax / scale > 3.0).all()


def test_mxfp4_ties_go_to_the_even_code():
    x = torch.tensor([[0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0] + [6.0] + [0.0] * 22])
    cw = quantize(x, (1,), Mode.MXFP4, 32)
    assert cw.scale.item() == 127  # amax 6 -> scale 1
    got = E2M1_VALUES[cw.codes.reshape(-1)[:9].long()].tolist()
    assert got == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -4.0]


def test_nf4_codes_pick_the_nearest_level(w):
    cw = quantize(w, (1,), Mode.NF4, 64)
    normalized = w.reshape(cw.codes.shape) / cw.scale.float()
    nearest = (normalized[..., None] - NF4_VALUES).abs().argmin(-1)
    assert torch.equal(cw.codes.long(), nearest)


def test_transposed_and_conv_layouts_restore_shape():
    w = torch.randn(128, 64)  # MatMul weight [K, N]: reduction axis 0
    cw = quantize(w, (0,), Mode.INT8_SYM, -1)
    assert cw.transposed and cw.codes.shape == (64, 128)
    assert torch.allclose(cw.dequantize(), w, atol=0.05)
    conv = torch.randn(8, 4, 3, 3)
    cw = quantize(conv, (1, 2, 3), Mode.INT8_ASYM, -1)
    assert cw.dequantize().shape == conv.shape


def test_theoretical_bits():
    assert theoretical_bits_per_weight(Mode.INT4_SYM, 64, 576) == 4 + 16 / 64
    assert theoretical_bits_per_weight(Mode.INT4_ASYM, 128, 1536) == 4 + 20 / 128
    assert theoretical_bits_per_weight(Mode.MXFP4, 32, 576) == 4.25
    assert theoretical_bits_per_weight(Mode.INT8_ASYM, -1, 576) == pytest.approx(8 + 24 / 576)


def test_level_tables_equal_bucketize_with_ties():
    from qcompiler.quant import _E2M1_SORTED, _E2M1_TABLE, _NF4_TABLE

    torch.manual_seed(1)
    nf4_mids = (NF4_VALUES[1:] + NF4_VALUES[:-1]) / 2
    x = torch.cat([torch.randn(100_000) * 0.5, nf4_mids, torch.tensor([-5.0, 5.0, -1.0, 1.0])])
    assert torch.equal(_NF4_TABLE.index(x), torch.bucketize(x, nf4_mids))
    mids = (_E2M1_SORTED[1:] + _E2M1_SORTED[:-1]) / 2
    y = torch.cat([torch.randn(100_000) * 3, torch.arange(-60, 61) / 8.0])
    idx = torch.bucketize(y, mids)
    tie = (idx < len(mids)) & (y == mids[idx.clamp(max=len(mids) - 1)])
    want = torch.where(tie & (idx % 2 == 0), idx + 1, idx)  # a tie goes to the even-mantissa value
    assert torch.equal(_E2M1_TABLE.index(y), want)


@pytest.mark.parametrize("mode,group", [(Mode.INT8_ASYM, -1), (Mode.INT4_ASYM, 64), (Mode.NF4, 64), (Mode.MXFP4, 32),
                                        (Mode.INT3_SYM, 64), (Mode.INT2_ASYM, 32)])
def test_blocks_of_rows_give_the_same_result(monkeypatch, mode, group):
    import qcompiler.quant as quant

    w = torch.randn(3000, 576)
    blocked = quantize(w, (1,), mode, group)
    monkeypatch.setattr(quant, "BLOCK_ELEMENTS", 1 << 30)
    whole = quantize(w, (1,), mode, group)
    assert torch.equal(blocked.codes, whole.codes) and torch.equal(blocked.scale, whole.scale)
    assert (blocked.zero_point is None) == (whole.zero_point is None)
    if whole.zero_point is not None:
        assert torch.equal(blocked.zero_point, whole.zero_point)
