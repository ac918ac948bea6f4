"""GGML block formats: legacy types byte-identical to gguf-py 0.19, K-quants equal to a line-by-line
scalar transcription of ggml's C reference and decoded by gguf-py's dequantizers."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from qcompiler import ggml

F32 = np.float32


def _weights(n=16, k=512, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, k)) * 0.02).astype(F32)
    x[1, :32] = 0  # an all-zero block
    x[2, 7] = 0.9  # an outlier
    x[3, 256:512] = np.abs(x[3, 256:512])  # a positive-only super-block (min clamped at 0)
    x[4, :16] = -x[4, :16] * 3
    return x


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_legacy_types_equal_gguf_py_bytes(name):
    x = _weights()
    ours = ggml.quantize(x, name)
    theirs = quants.quantize(x, GGMLQuantizationType(ggml.TYPES[name].type_id))
    assert ours.dtype == np.uint8 and np.array_equal(ours, theirs)


def _nearest(v):
    return int(np.rint(F32(v)))


def _ref_qkx2(x, w, nmax, rmin, rdelta, nstep):
    """make_qkx2_quants, scalar, f32 at each step as in C."""
    n = len(x)
    lo, hi = F32(min(F32(0), x.min())), F32(x.max())
    sum_w = F32(0)
    sum_x = F32(0)
    for i in range(n):
        sum_w = F32(sum_w + w[i])
        sum_x = F32(sum_x + F32(w[i] * x[i]))
    if hi == lo:
        return [0] * n, F32(0), F32(-lo)
    iscale = F32(F32(nmax) / F32(hi - lo))
    scale = F32(F32(1) / iscale)
    L = [max(0, min(nmax, _nearest(F32(iscale * F32(x[i] - lo))))) for i in range(n)]
    best = F32(0)
    for i in range(n):
        diff = F32(F32(F32(scale * F32(L[i])) + lo) - x[i])
        best = F32(best + F32(w[i] * F32(diff * diff)))
    for step in range(nstep + 1):
        iscale = F32(F32(F32(F32(rmin) + F32(F32(rdelta) * F32(step))) + F32(nmax)) / F32(hi - lo))
        aux, sl, sl2, sxl = [], F32(0), F32(0), F32(0)
        for i in range(n):
            l = max(0, min(nmax, _nearest(F32(iscale * F32(x[i] - lo)))))
            aux.append(l)
            sl = F32(sl + F32(w[i] * F32(l)))
            sl2 = F32(sl2 + F32(F32(w[i] * F32(l)) * F32(l)))
            sxl = F32(sxl + F32(F32(w[i] * F32(l)) * x[i]))
        det = F32(F32(sum_w * sl2) - F32(sl * sl))
        if det > 0:
            this_scale = F32(F32(F32(sum_w * sxl) - F32(sum_x * sl)) / det)
            this_min = F32(F32(F32(sl2 * sum_x) - F32(sl * sxl)) / det)
            if this_min > 0:
                this_min, this_scale = F32(0), F32(sxl / sl2)
            err = F32(0)
            for i in range(n):
                diff = F32(F32(F32(this_scale * F32(aux[i])) + this_min) - x[i])
                err = F32(err + F32(w[i] * F32(diff * diff)))
            if err < best:
                L, best, scale, lo = aux, err, this_scale, this_min
    return L, scale, F32(-lo)


def _ref_q4_k(x):
    """quantize_row_q4_K_ref for one super-block of 256."""
    L, scales, mins = [], [], []
    for j in range(8):
        xs = x[32 * j:32 * j + 32]
        s2 = F32(0)
        for v in xs:
            s2 = F32(s2 + F32(v * v))
        av = F32(np.sqrt(F32(s2 / F32(32))))
        w = np.array([F32(av + abs(v)) for v in xs], dtype=F32)
        l, s, m = _ref_qkx2(xs, w, 15, -1.0, 0.1, 20)
        L += l
        scales.append(s)
        mins.append(m)
    max_scale, max_min = max([F32(0)] + scales), max([F32(0)] + mins)
    inv_s = F32(F32(63) / max_scale) if max_scale > 0 else F32(0)
    inv_m = F32(F32(63) / max_min) if max_min > 0 else F32(0)
    ls = [min(63, _nearest(F32(inv_s * s)) & 0xFF) for s in scales]
    lm = [min(63, _nearest(F32(inv_m * m)) & 0xFF) for m in mins]
    d, dmin = np.float16(F32(max_scale / F32(63))), np.float16(F32(max_min / F32(63)))
    for j in range(8):
        dj = F32(F32(d) * F32(ls[j]))
        if dj == 0:
            continue
        dm = F32(F32(dmin) * F32(lm[j]))
        for i in range(32):
            L[32 * j + i] = max(0, min(15, _nearest(F32(F32(x[32 * j + i] + dm) / dj))))
    sc = [0] * 12
    for j in range(8):
        if j < 4:
            sc[j], sc[j + 4] = ls[j], lm[j]
        else:
            sc[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
            sc[j - 4] |= (ls[j] >> 4) << 6
            sc[j] |= (lm[j] >> 4) << 6
    qs = [L[c * 64 + i] | (L[c * 64 + i + 32] << 4) for c in range(4) for i in range(32)]
    return np.concatenate([np.array([d, dmin], dtype=np.float16).view(np.uint8), np.array(sc + qs, dtype=np.uint8)])


def _ref_qx(x, nmax):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, NULL), scalar."""
    amax, mx = F32(0), F32(0)
    for v in x:
        if abs(v) > amax:
            amax, mx = F32(abs(v)), v
    if amax < F32(1e-15):
        return [0] * len(x), F32(0)

    def sums(iscale):
        ls, slx, sl2 = [], F32(0), F32(0)
        for v in x:
            l = max(-nmax, min(nmax - 1, _nearest(F32(iscale * v))))
            w = F32(v * v)
            ls.append(l)
            slx = F32(slx + F32(F32(w * v) * F32(l)))
            sl2 = F32(sl2 + F32(F32(w * F32(l)) * F32(l)))
        return ls, slx, sl2

    L, slx, sl2 = sums(F32(F32(-nmax) / mx))
    scale = F32(slx / sl2) if sl2 else F32(0)
    best = F32(scale * slx)
    for i in range(-9, 10):
        if i == 0:
            continue
        ls, slx, sl2 = sums(F32(-F32(F32(nmax) + F32(F32(0.1) * F32(i))) / mx))
        if sl2 > 0 and F32(slx * slx) > F32(best * sl2):
            L, scale = ls, F32(slx / sl2)
            best = F32(scale * slx)
    return [l + nmax for l in L], scale


def _ref_q6_k(x):
    """quantize_row_q6_K_ref for one super-block of 256."""
    L, scales = [], []
    for j in range(16):
        l, s = _ref_qx(x[16 * j:16 * j + 16], 32)
        L += l
        scales.append(s)
    max_abs, max_scale = F32(0), F32(0)
    for s in scales:
        if abs(s) > max_abs:
            max_abs, max_scale = F32(abs(s)), s
    if max_abs < F32(1e-15):
        return np.zeros(210, dtype=np.uint8)
    iscale = F32(F32(-128) / max_scale)
    d = np.float16(F32(F32(1) / iscale))
    sc = [min(127, _nearest(F32(iscale * s))) for s in scales]
    for j in range(16):
        dj = F32(F32(d) * F32(sc[j]))
        if dj == 0:
            continue
        for i in range(16):
            L[16 * j + i] = max(-32, min(31, _nearest(F32(x[16 * j + i] / dj)))) + 32
    ql, qh = [0] * 128, [0] * 64
    for c in range(2):
        base = c * 128
        for l in range(32):
            q = [L[base + l + 32 * t] for t in range(4)]
            ql[c * 64 + l] = (q[0] & 0xF) | ((q[2] & 0xF) << 4)
            ql[c * 64 + l + 32] = (q[1] & 0xF) | ((q[3] & 0xF) << 4)
            qh[c * 32 + l] = (q[0] >> 4) | ((q[1] >> 4) << 2) | ((q[2] >> 4) << 4) | ((q[3] >> 4) << 6)
    return np.concatenate([np.array(ql + qh, dtype=np.uint8), np.array(sc, dtype=np.int8).view(np.uint8),
                           np.array([d], dtype=np.float16).view(np.uint8)])


@pytest.mark.parametrize("name, reference", [("q4_k", _ref_q4_k), ("q6_k", _ref_q6_k)])
def test_k_quants_equal_the_scalar_reference(name, reference):
    x = _weights(n=6, k=512)
    ours = ggml.quantize(x, name).reshape(-1, ggml.TYPES[name].size)
    theirs = np.stack([reference(block) for block in x.reshape(-1, 256)])
    same = (ours == theirs).all(axis=1)
    assert same.all(), f"{(~same).sum()} of {len(same)} super-blocks differ"
    decoded = ggml.dequantize(ours, name, x.shape)
    expected = ggml.dequantize(theirs.reshape(x.shape[0], -1), name, x.shape)
    assert np.abs(decoded - expected).max() < 1e-2 * np.abs(x).max()


@pytest.mark.parametrize("name, worst", [("q4_k", 0.09), ("q6_k", 0.025), ("q4_0", 0.11), ("q4_1", 0.1),
                                         ("q5_0", 0.05), ("q8_0", 0.007)])
def test_round_trip_through_gguf_py(name, worst):
    """Relative RMS error of each type decoded by gguf-py, on Gaussian rows (K-quants beat the legacy 4-bit)."""
    x = (np.random.default_rng(1).standard_normal((32, 1024)) * 0.02).astype(F32)
    y = ggml.dequantize(ggml.quantize(x, name), name, x.shape)
    rel = float(np.sqrt(np.mean((y - x) ** 2)) / np.sqrt(np.mean(x ** 2)))
    assert rel < worst


def test_rows_the_block_does_not_divide_are_refused():
    with pytest.raises(ValueError, match="576 does not divide"):
        ggml.quantize(np.zeros((2, 576), dtype=F32), "q4_k")


def test_integer_form_of_constant_and_nearly_constant_groups_stays_finite_and_close():
    """q4_1 / q4_k groups whose scale is 0 or whose -m / d overflows f16 become codes 0, zero point -1 and
    the group's mean as scale (a float zero point of -m / d would be inf or lose the offset)."""
    import torch

    from qcompiler.config import Mode
    from qcompiler.quant import BlockWeight, integer_form

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 256)) * 0.02).astype(F32)
    x[0, :32] = 0.05 + rng.standard_normal(32).astype(F32) * 1e-6  # nearly constant, far from 0
    x[1, :32] = 0.5  # constant
    x[2, :32] = -0.05 + rng.standard_normal(32).astype(F32) * 1e-4  # a q4_k sub-block whose 6-bit scale is 0
    x[2, 32:64] = np.abs(x[2, 32:64]) * 40
    for name in ("q4_1", "q4_k"):
        t = ggml.TYPES[name]
        blocks = torch.from_numpy(ggml.quantize(x, name)).reshape(4, 256 // t.block, t.size)
        cw = BlockWeight(Mode(name), t.block, blocks, torch.empty(0), None, (4, 256), False)
        lowered, exact = integer_form(cw)
        decoded, file = lowered.dequantize(), cw.dequantize()
        assert not exact and bool(torch.isfinite(decoded).all()), name
        assert float((decoded - file).abs().max()) < 1e-3, name


@pytest.mark.parametrize("mode, block", [("int4_sym", "q4_0"), ("int8_sym", "q8_0"), ("int4_asym", "q4_1")])
def test_block_form_packs_an_integer_grid_and_integer_form_reads_it_back(mode, block):
    """Codes and scales a pass chose (here moved off round to nearest) go into the GGUF blocks as they
    are: q4_0 and q8_0 decode to exactly the same values, q4_1 to within its f16 minimum's rounding,
    and `integer_form` gives the same codes and scales back."""
    import dataclasses

    import torch

    from qcompiler.config import Mode
    from qcompiler.quant import block_form, integer_form, quantize

    torch.manual_seed(0)
    cw = quantize(torch.randn(8, 96), (1,), Mode(mode), 32)
    low, high = Mode(mode).spec.code_range
    moved = (cw.codes.to(torch.int16) + torch.randint(-1, 2, cw.codes.shape)).clamp(low, high).to(cw.codes.dtype)
    cw = dataclasses.replace(cw, codes=moved)
    bw, error = block_form(cw)
    assert bw.mode.value == block and bw.codes.dtype == torch.uint8 and bw.matrix_shape == (8, 96)
    expected = ggml.TYPES[block].size * 3
    assert bw.codes.reshape(8, -1).shape[1] == expected
    gguf_py = quants.dequantize(bw.codes.reshape(8, -1).numpy(), GGMLQuantizationType[block.upper()])
    assert np.array_equal(gguf_py.reshape(8, 96), bw.dequantize().numpy())  # gguf-py decodes what we decode
    back, exact = integer_form(bw)
    assert torch.equal(back.codes.to(torch.int16), cw.codes.to(torch.int16)) and torch.equal(back.scale, cw.scale)
    difference = float((bw.dequantize() - cw.dequantize()).abs().max())
    if block == "q4_1":
        assert not exact and difference == error and 0 < error < 1e-3 * float(cw.dequantize().abs().max())
    else:
        assert exact and error == 0.0 and difference == 0.0
    assert block_form(dataclasses.replace(cw, group_size=64)) is None  # no block type holds groups of 64
