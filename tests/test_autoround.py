"""AutoRound (SignRound) on the calibration engine: its grid is round to nearest's, its compressed form is
what the loss measured, it lowers the block output error, and its switches and refusals."""

import pytest
import torch

from conftest import WIKITEXT, tiny_llama, tiny_tokenizer
from qcompiler.config import CompressionConfig, Mode, WeightFormat
from qcompiler.errors import QCompilerError
from qcompiler.passes.autoround import _Tuner
from qcompiler.pipeline import compress
from qcompiler.quant import quantize

FORMATS = [(Mode.INT4_SYM, 32), (Mode.INT4_ASYM, 64), (Mode.INT2_SYM, 32), (Mode.INT3_ASYM, -1), (Mode.INT8_SYM, -1)]


@pytest.mark.parametrize("mode,group", FORMATS, ids=[f"{m}-g{g}" for m, g in FORMATS])
def test_untuned_codes_are_round_to_nearest(mode, group):
    """With V = 0 and alpha = beta = 1 the tuner's codes, scales and zero points are quant.py's."""
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    cw = _Tuner(w, (1,), WeightFormat(mode, group), minmax=True).compressed(tuple(w.shape))
    rtn = quantize(w, (1,), mode, group)
    assert cw.same_codes(rtn)


@pytest.mark.parametrize("mode,group", FORMATS, ids=[f"{m}-g{g}" for m, g in FORMATS])
def test_compressed_form_is_what_the_loss_saw(mode, group):
    """After moving V, alpha and beta, the stored codes decode to exactly the weight the tuning ran with."""
    torch.manual_seed(1)
    w = torch.randn(48, 128)
    tuner = _Tuner(w.t().contiguous(), (0,), WeightFormat(mode, group), minmax=True)  # a transposed layout too
    with torch.no_grad():
        tuner.v.uniform_(-0.5, 0.5)
        tuner.alpha.uniform_(0.5, 1.0)
        tuner.beta.uniform_(0.5, 1.0)
    qdq = tuner.qdq()
    cw = tuner.compressed((128, 48))
    assert torch.equal(cw.dequantize(), qdq.detach())
    lo, hi = mode.spec.code_range
    assert cw.codes.min() >= lo and cw.codes.max() <= hi


@pytest.mark.parametrize("mode,group", FORMATS, ids=[f"{m}-g{g}" for m, g in FORMATS])
def test_fused_qdq_has_the_straight_through_gradients(mode, group):
    """The fused quantize-dequantize gives the values and the gradients in V, alpha and beta of autograd
    run over the straight-through formulas, with groups at the scale floor and at both ends of the grid."""
    torch.manual_seed(3)
    w = torch.randn(48, 128)
    w[0, :] = 0.0  # a group whose scale is held at its floor
    w[1, :8] = 9.0  # codes clamped at the grid's ends once V moves them
    tuner = _Tuner(w.t().contiguous(), (0,), WeightFormat(mode, group), minmax=True)
    with torch.no_grad():
        tuner.v.uniform_(-0.5, 0.5)
        tuner.alpha.uniform_(0.5, 1.0)
        tuner.beta.uniform_(0.5, 1.0)
    upstream = torch.randn(128, 48)
    grads = []
    for qdq in (tuner.qdq, tuner.qdq_reference):
        for p in tuner.parameters():
            p.grad = None
        out = qdq()
        (out * upstream).sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in tuner.parameters()]))
    (fused, fused_grads), (reference, reference_grads) = grads
    assert torch.equal(fused, reference)
    for a, b in zip(fused_grads, reference_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert all(g.abs().sum() > 0 for g in fused_grads)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("ar") / "model"
    tiny_llama(seed=2).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _autoround(folder, **options):
    config = CompressionConfig(mode="int4_asym", group_size=32, dataset=str(WIKITEXT), num_samples=16, seqlen=64,
                               passes={"autoround": {"iters": 30, **options}})
    return compress(folder, config)


def test_autoround_lowers_every_blocks_output_error_and_compresses_every_block_linear(folder):
    result = _autoround(folder)
    summary = result.results["autoround"].summary
    assert summary["tuned"] == 14 and summary["iters"] == 30 and summary["samples"] == 16
    for block, record in summary["blocks"].items():
        assert record["loss_best"] < 0.8 * record["loss_first"], (block, record)
    consts = {c.attrs["weight"]: c for c in result.graph.weight_constants()}
    for name, layer in summary["layers"].items():
        assert consts[name].meta["compressed"].mode is Mode.INT4_ASYM and 0 < layer["changed_codes"] < 0.6
    assert "scale_estimation" not in result.results  # AutoRound replaces the default refit
    assert "compressed" in consts["lm_head.weight"].meta  # outside the blocks: the precision pass's format, RTN
    from qcompiler.report import _data_aware_lines

    line = next(x for x in _data_aware_lines({"passes": {"autoround": summary}}) if x.startswith("AutoRound"))
    assert "14 layers in 2 blocks, 30 iterations of batch 8 over 16 samples" in line and "on average" in line


def test_autoround_is_deterministic(folder):
    a, b = _autoround(folder, iters=5), _autoround(folder, iters=5)
    for ca, cb in zip(a.graph.weight_constants(), b.graph.weight_constants()):
        if "compressed" in ca.meta:
            assert ca.meta["compressed"].same_codes(cb.meta["compressed"])


def test_opt_rtn_searches_each_groups_scale_and_never_does_worse_than_rtn(folder):
    from qcompiler.quant import search_quantize

    config = CompressionConfig(mode="int4_sym", group_size=32, dataset=str(WIKITEXT), num_samples=8, seqlen=64,
                               passes={"autoround": {"recipe": "opt-rtn"}})
    result = compress(folder, config)
    summary = result.results["autoround"].summary
    assert summary["tuned"] == 14 and summary["iters"] == 0
    assert all(0 < layer["changed_codes"] < 0.5 for layer in summary["layers"].values())
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.02
    importance = torch.rand(256) + 0.1
    for mode, group in FORMATS:
        searched = search_quantize(w, mode, group, importance).dequantize()
        rtn = quantize(w, (1,), mode, group).dequantize()
        err = lambda d: float(((d - w).square() * importance).sum())  # noqa: E731
        assert err(searched) <= err(rtn) * (1 + 1e-6), mode
    with pytest.raises(QCompilerError, match="opt-rtn tunes nothing"):
        compress(folder, CompressionConfig(mode="int4_sym", group_size=32, dataset=str(WIKITEXT), num_samples=8,
                                           seqlen=64, passes={"autoround": {"recipe": "opt-rtn", "iters": 10}}))


def test_recipe_alone_switches_autoround_on_with_its_samples():
    config = CompressionConfig(mode="int4_sym", group_size=32, dataset="auto", passes={"autoround": {"recipe": "light"}})
    assert "autoround" in config.switched_on() and config.samples == (128, 2048)
    assert not config.switch("scale_estimation")
    from qcompiler.cli import _parser, config_from_args

    args = _parser().parse_args(["compress", "--weight-format", "int4", "--recipe", "best", "--dataset", "auto"])
    config, _ = config_from_args(args)
    assert config.passes["autoround"] == {"recipe": "best"} and config.samples == (512, 2048)


@pytest.mark.parametrize("passes,extra,message", [
    ({"autoround": {"recipe": "fast"}}, {"dataset": "auto"}, "--recipe 'fast' is not one of best, default, light, opt-rtn"),
    ({"autoround": {}}, {}, "need calibration data"),
    ({"autoround": {}}, {"dataset": "auto", "gptq": True}, "cannot be combined"),
    ({"autoround": {}}, {"dataset": "auto", "mode": "nf4"}, "AutoRound tunes integer grids"),
])
def test_autoround_refusals(passes, extra, message):
    with pytest.raises(QCompilerError, match=message):
        CompressionConfig(**{"mode": "int4_sym", "group_size": 32, **extra}, passes=passes)
