"""Activation quantization (--quant-mode) and SmoothQuant on tiny random models."""

from collections import Counter

import numpy as np
import onnx
import openvino as ov
import pytest
import torch

from qcompiler import CompressionConfig, compress
from qcompiler.activations import ActivationQuant, static_range
from qcompiler.config import Mode
from qcompiler.engine import Collector
from qcompiler.errors import QCompilerError
from qcompiler.registry import build_registry
from tests.conftest import tiny_llama
from tests.test_calibration import _logits, _samples

IDS = torch.tensor([[3, 17, 99, 5, 42, 7, 250, 1, 64, 128, 9, 11]])
EXAMPLE = {"input_ids": IDS[:, :8]}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return float(((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)).mean())


def _outlier_llama():
    """tiny_llama with a few large input channels on every norm, as real LLMs have (SmoothQuant's case)."""
    model = tiny_llama()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p[[3, 40, 77]] = 30.0
    return model


# config and command line ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"quant_mode": "int8"}, "--dataset auto"),
    ({"quant_mode": "int8", "dataset": "x.txt", "smooth_quant_alpha": 1.5}, r"outside \[0, 1\]"),
    ({"quant_mode": "int8", "dataset": "x.txt", "smooth_quant_alpha": "much"}, "not a number"),
    ({"smooth_quant_alpha": 0.5}, "add --quant-mode int8"),
    ({"quant_mode": "int8-dynamic", "smooth_quant_alpha": 0.5}, "add --dataset"),
    ({"quant_mode": "int8", "dataset": "x.txt", "mode": "int4_sym"}, "int8_sym per channel, not int4_sym"),
    ({"quant_mode": "int4"}, "unknown quant mode"),
    ({"activation_range": "percentile"}, "add --quant-mode int8"),
    ({"quant_mode": "int8-dynamic", "activation_max_error": 0.1}, "int8-dynamic takes each range per call"),
    ({"quant_mode": "int8", "dataset": "x.txt", "activation_range": "kl"}, "choose minmax or percentile"),
    ({"quant_mode": "int8", "dataset": "x.txt", "activation_percentile": 99.9}, "add --activation-range percentile"),
    ({"quant_mode": "int8", "dataset": "x.txt", "activation_range": "percentile", "activation_percentile": 40},
     r"outside \(50, 100\]"),
    ({"quant_mode": "int8", "dataset": "x.txt", "activation_max_error": -1.0}, "number >= 0"),
])
def test_impossible_activation_options(kwargs, message):
    with pytest.raises(QCompilerError, match=message):
        CompressionConfig(**kwargs)


def test_quant_mode_defaults():
    static = CompressionConfig(quant_mode="int8", dataset="x.txt")
    assert str(static.mode) == "int8_sym" and static.smoothing == "auto"  # NNCF's MIXED preset; alpha searched
    assert CompressionConfig(quant_mode="int8", dataset="x.txt", smooth_quant_alpha="off").smoothing is None
    assert CompressionConfig(quant_mode="int8", dataset="x.txt", smooth_quant_alpha="0.5").smoothing == 0.5
    assert CompressionConfig(quant_mode="int8-dynamic").smoothing is None  # no data, nothing to smooth by


def test_cli_builds_the_config_and_refuses_weight_options():
    from qcompiler.cli import _parser, config_from_args

    parse = lambda *a: config_from_args(_parser().parse_args(["compress", *a]))[0]  # noqa: E731
    config = parse("--quant-mode", "int8", "--dataset", "x.txt", "--smooth-quant-alpha", "0.6", "--num-samples", "8")
    assert (config.quant_mode, config.smoothing, config.num_samples, str(config.mode)) == ("int8", 0.6, 8, "int8_sym")
    with pytest.raises(QCompilerError, match="drop --weight-format int4"):
        parse("--quant-mode", "int8", "--weight-format", "int4", "--dataset", "x.txt")
    with pytest.raises(QCompilerError, match="drop --group-size"):
        parse("--quant-mode", "int8-dynamic", "--group-size", "64")
    with pytest.raises(QCompilerError, match="add --quant-mode"):
        parse("--weight-format", "int8", "--smooth-quant-alpha", "0.5")
    config = parse("--quant-mode", "int8", "--dataset", "x.txt", "--activation-range", "percentile",
                   "--activation-percentile", "99.9", "--activation-max-error", "0.1")
    assert (config.range_percentile, config.activation_max_error) == (99.9, 0.1)
    assert parse("--quant-mode", "int8", "--dataset", "x.txt", "--activation-range", "percentile").range_percentile == 99.99
    assert parse("--quant-mode", "int8", "--dataset", "x.txt").range_percentile is None
    with pytest.raises(QCompilerError, match="--activation-range sets static activation ranges: add --quant-mode"):
        parse("--weight-format", "int8", "--activation-range", "percentile")


@pytest.mark.parametrize("backend, mode, fix", [("gptq", "int8", "onnx or openvino or torch"),
                                                ("openvino", "int8-dynamic", "--backend onnx or torch")])
def test_backends_without_integer_kernels_refuse_before_any_work(tmp_path, backend, mode, fix):
    model = tiny_llama()
    data = _samples() if mode == "int8" else None
    with pytest.raises(QCompilerError, match=fix):
        compress(model, CompressionConfig(quant_mode=mode, dataset=data), output=tmp_path / "out", backend=backend,
                 example_input=EXAMPLE)
    assert not (tmp_path / "out").exists()


# statistics and the quantizer -----------------------------------------------------------------------

def test_min_max_statistic_streams_and_follows_channel_scaling():
    collector = Collector({"w": frozenset({"min_max"})}, row_rate=0.0)
    a, b = torch.randn(2, 5, 8), torch.randn(3, 8) * 4
    collector.add("w", a)
    collector.add("w", b)
    rows = torch.cat([a.reshape(-1, 8), b])
    st = collector.stats["w"]
    assert torch.equal(st.min, rows.amin(0)) and torch.equal(st.max, rows.amax(0))
    factor = torch.linspace(-2, 2, 8)
    st.scale_channels(factor)
    scaled = rows * factor
    assert torch.allclose(st.min, scaled.amin(0)) and torch.allclose(st.max, scaled.amax(0))


def test_percentiles_stream_and_follow_channel_scaling():
    """The "extremes" statistic gives the tensor's two-sided percentiles (order statistics over every channel and
    token), across batches, and after a per-channel scaling (SmoothQuant's x / s, a negative factor swapping)."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 50, 16, generator=g) for _ in range(3)]
    batches[1][0, 7, 3], batches[2][1, 9, 12] = 80.0, -60.0  # two outliers the percentiles clip
    collector = Collector({"w": frozenset({"extremes:99.9", "min_max"})}, row_rate=0.0, tokens=300)
    for b in batches:
        collector.add("w", b)
    st = collector.done()["w"]
    values = torch.cat([b.reshape(-1, 16) for b in batches])
    k = 5  # ceil(0.001 * 300 * 16)
    def expect(v):
        return float(v.reshape(-1).topk(k, largest=False).values[-1]), float(v.reshape(-1).topk(k).values[-1])
    assert st.percentile_range(99.9) == expect(values)
    assert max(abs(v) for v in st.percentile_range(99.9)) < 5 < 60 <= float(values.abs().max())
    assert st.percentile_range(100.0) == (float(values.min()), float(values.max()))
    factor = torch.linspace(0.5, 3, 16)
    assert st.percentile_range(99.9, factor) == pytest.approx(expect(values * factor))
    factor[3] = -2.0
    st.scale_channels(factor)
    assert st.percentile_range(99.9) == pytest.approx(expect(values * factor))


def test_percentile_ranges_clip_a_rare_outlier_for_the_other_tokens():
    """With one token of huge activations in the calibration data, min / max ranges spend their levels on
    it; the percentile ranges clip it, and the quantized layer is closer to float on text without that
    token (on the calibration rows, which hold it, the error grows: clipping is the trade-off). The
    report says which range and keeps the min / max beside it."""
    from qcompiler.quant import fake_quantize

    data = _samples(16, 32)
    data = [torch.where(s == 7, 8, s) for s in data]
    data[0][5] = 7  # token 7 once in all the data

    def outlier_model():  # token 7 puts all of its norm's output into one channel: sqrt(hidden) there
        model = tiny_llama()
        with torch.no_grad():
            model.model.embed_tokens.weight[7] = 0.0
            model.model.embed_tokens.weight[7, 10] = 1.0
        return model

    def run(**ranges):
        cfg = CompressionConfig(quant_mode="int8", dataset=data, smooth_quant_alpha="off", **ranges)
        return compress(outlier_model(), cfg).results["activation_quant"].summary

    minmax, percentile = run(), run(activation_range="percentile")  # 99.99: the 5 most extreme values of 49152
    assert minmax["range"] == "min / max" and percentile["range"] == "percentiles 0.01 and 99.99 of all values"
    name = "model.layers.0.self_attn.q_proj.weight"
    mm, pc = minmax["layers"][name], percentile["layers"][name]
    assert pc["min"] < pc["low"] <= 0 <= pc["high"] < pc["max"]
    assert (mm["low"], mm["high"]) == pytest.approx((pc["min"], pc["max"]), rel=1e-2)  # zero made exact
    model = outlier_model()
    with torch.no_grad():
        clean = torch.where(_samples(4, 32, seed=5)[0] == 7, 8, _samples(4, 32, seed=5)[0])[None]
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(clean))[0]
        w = model.model.layers[0].self_attn.q_proj.weight
        wq = fake_quantize(w, Mode.INT8_SYM, -1)
        error = {key: float((x @ w.t() - static_range(v["low"], v["high"]).fake(x) @ wq.t()).pow(2).sum())
                 for key, v in (("minmax", mm), ("percentile", pc))}
    assert error["percentile"] < 0.5 * error["minmax"], error


def test_activation_max_error_is_the_fallback_limit():
    cfg = dict(quant_mode="int8", dataset=_samples(), smooth_quant_alpha="off")
    every = compress(tiny_llama(), CompressionConfig(**cfg, activation_max_error=1.0)).results["activation_quant"].summary
    none = compress(tiny_llama(), CompressionConfig(**cfg, activation_max_error=0.0)).results["activation_quant"].summary
    # lm_head, the output layer, has its own limit (`max_error_output`)
    blocks = lambda fallback: {n: why for n, why in fallback.items() if n != "lm_head.weight"}  # noqa: E731
    assert every["quantized"] >= 14 and not blocks(every["fallback"])  # 7 Linears in each of 2 blocks
    assert len(blocks(none["fallback"])) == 14 and all("> 0.0" in why for why in blocks(none["fallback"]).values())


def test_static_range_represents_zero_and_matches_onnxruntime():
    import onnxruntime as ort
    from onnx import TensorProto, helper

    aq = static_range(-0.7, 3.1)
    assert aq.low <= -0.7 and aq.high >= 3.1 - aq.scale and aq.fake(torch.zeros(1)).item() == 0.0
    assert static_range(0.2, 5.0).low == 0.0  # the range always holds zero
    x = np.linspace(-1.0, 3.5, 1001, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
        "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1001])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1001])],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [aq.scale]), helper.make_tensor("z", TensorProto.UINT8, [], [aq.zero_point])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.allclose(y, aq.fake(torch.from_numpy(x)).numpy(), atol=1e-6)
    dynamic = ActivationQuant(dynamic=True).fake(torch.from_numpy(x))
    assert float((dynamic - torch.from_numpy(x)).abs().max()) <= 4.5 / 255 / 2 + 1e-6


# SmoothQuant ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha, tie", [(0.5, False), ("auto", False), (0.5, True)])
def test_smoothing_is_found_by_patterns_and_keeps_the_float_function(alpha, tie):
    from qcompiler.rewrites import in_module

    model = _outlier_llama()
    if tie:
        model = tiny_llama(tie=True)
    before = _logits(model, IDS)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = compress(model, CompressionConfig(quant_mode="int8", dataset=_samples(), smooth_quant_alpha=alpha),
                      example_input=EXAMPLE)
    sq = result.results["smooth_quant"].summary
    # per block: q/k/v and gate/up after their norms, down after the gated Multiply, o after the attention
    # (v_proj's rows); after the blocks: the final norm before lm_head, through the embedding when tied
    assert sq["matched"] == {"gated": 2, "relu": 0, "norm": 4 + (not tie), "tied_head": int(tie), "value": 2, "explicit": 0}
    assert sq["applied"] == sq["matched"] or alpha == "auto"
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # the user's model is unchanged
    with in_module(model, result.graph):  # the rewritten float weights (not yet quantized) and the epilogue
        params = dict(model.named_parameters(remove_duplicate=False))
        for c in result.graph.weight_constants():
            if c.meta.get("rewritten"):
                params[c.attrs["weight"]].data = result.graph.weight(c).clone()
        smoothed = _logits(model, IDS)
    torch.testing.assert_close(smoothed, before, rtol=1e-4, atol=1e-4)
    if tie:
        assert "model.embed_tokens.smooth_quant_inverse" in result.graph.weights
    if alpha == "auto":
        layers = sq["layers"].values()
        assert all(v["error_after"] <= v["error_before"] + 1e-12 for v in layers)  # no smoothing is a candidate


def test_smoothing_lowers_the_quantized_error_of_outlier_channels():
    errors = {}
    for alpha in ("off", "auto"):
        model = _outlier_llama()
        result = compress(model, CompressionConfig(quant_mode="int8", dataset=_samples(), smooth_quant_alpha=alpha),
                          example_input=EXAMPLE)
        layers = result.results["activation_quant"].summary["layers"]
        errors[alpha] = np.mean([v["error"] for n, v in layers.items() if "q_proj" in n or "gate_proj" in n])
    assert errors["auto"] < 0.5 * errors["off"]


# lowering ---------------------------------------------------------------------------------------------

def _artifact(tmp_path, backend, mode, **kwargs):
    model = _outlier_llama()
    with torch.no_grad():
        ref = model(IDS).logits.numpy()
    data = _samples() if mode == "int8" else None
    result = compress(model, CompressionConfig(quant_mode=mode, dataset=data, **kwargs), output=tmp_path / "out",
                      backend=backend, example_input=EXAMPLE)
    got = build_registry().backend(backend).runner(tmp_path / "out").logits(IDS.numpy())
    return result, ref, got


def test_openvino_runs_the_linear_layers_on_u8_kernels(tmp_path):
    result, ref, got = _artifact(tmp_path, "openvino", "int8")
    assert _cosine(ref, got) > 0.999
    acts = result.report["activations"]
    # every Linear, lm_head included (its input: the final norm of the last block's output)
    # the attention stays float in a model with a KV cache (its past keys would be quantized again each step)
    assert acts == {"quant_mode": "int8", "marked": 15, "lowered": 15, "linear_layers": 15, "left_float_by_backend": [],
                    "attention": {"ops": 2, "marked": 0, "lowered": 0, "left_float_by_backend": []}}
    assert "KV cache" in result.results["activation_quant"].summary["attention"]["float"]["*"]
    model = ov.Core().read_model(tmp_path / "out" / "openvino_model.xml")
    ops = Counter(op.get_type_name() for op in model.get_ops())
    assert ops["FakeQuantize"] == 9  # per block: q/k/v (fused), o, gate/up (fused), down; lm_head
    compiled = ov.Core().compile_model(model, "CPU")
    kinds = Counter(op.get_rt_info()["runtimePrecision"].astype(str) for op in compiled.get_runtime_model().get_ops()
                    if op.get_rt_info()["layerType"].astype(str) == "FullyConnected")
    # all on u8 (or i8) activations, one per Linear: weights on u8 activations are not fused (lower.py)
    assert kinds["u8"] + kinds["i8"] == 15 and kinds["u8"] >= 1
    text = "\n".join(str(result.report.get(k)) for k in ("passes",))
    assert "smooth_quant" in text


@pytest.mark.parametrize("mode", ["int8", "int8-dynamic"])
def test_torch_runs_the_linear_layers_on_onednn_int8_kernels(tmp_path, mode):
    """The torch artifact: every Linear a W8A8Linear (u8 x s8 on oneDNN, the activation quantized in the
    module as the IR's quantizer does), reloaded from the folder."""
    from qcompiler.plugins.torch_kernels import load_model
    from qcompiler.plugins.torch_kernels.modules import W8A8Linear

    result, ref, got = _artifact(tmp_path, "torch", mode)
    assert _cosine(ref, got) > (0.995 if mode == "int8-dynamic" else 0.999)
    acts = result.report["activations"]
    assert acts["marked"] == acts["lowered"] == acts["linear_layers"] == 15 and not acts["left_float_by_backend"]
    model = load_model(tmp_path / "out")
    assert sum(isinstance(m, W8A8Linear) for m in model.modules()) == 15
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 0


@pytest.mark.parametrize("mode, onnx_format, nodes", [
    ("int8", None, {"QuantizeLinear": 9, "MatMulIntegerToFloat": 15}),
    ("int8", "qdq", {"QuantizeLinear": 9, "DequantizeLinear": 9 + 15}),
    ("int8-dynamic", None, {"DynamicQuantizeLinear": 9, "MatMulIntegerToFloat": 15}),
])
def test_onnxruntime_runs_the_linear_layers_on_integer_kernels(tmp_path, mode, onnx_format, nodes):
    options = {"format": onnx_format} if onnx_format else {}
    model = _outlier_llama()
    with torch.no_grad():
        ref = model(IDS).logits.numpy()
    result = compress(model, CompressionConfig(quant_mode=mode, dataset=_samples() if mode == "int8" else None),
                      output=tmp_path / "out", backend="onnx", backend_options=options, example_input=EXAMPLE)
    got = build_registry().backend("onnx").runner(tmp_path / "out").logits(IDS.numpy())
    assert _cosine(ref, got) > (0.995 if mode == "int8-dynamic" else 0.999)  # dynamic: no data, no smoothing
    found = Counter(n.op_type for n in onnx.load(tmp_path / "out" / "model.onnx").graph.node)
    assert {k: found[k] for k in nodes} == nodes
    acts = result.report["activations"]
    assert acts["marked"] == acts["lowered"] == 15


def test_a_layer_whose_error_is_too_large_falls_back_to_float_activations(tmp_path, monkeypatch):
    from qcompiler.passes import activation_quant

    monkeypatch.setattr(activation_quant.StaticActivations, "options_from",
                        classmethod(lambda cls, config: cls.Options(max_error=0.0, max_error_output=0.0)))
    result, ref, got = _artifact(tmp_path, "onnx", "int8")
    summary = result.results["activation_quant"].summary
    assert summary["quantized"] == 0 and len(summary["fallback"]) == 15
    assert result.report["activations"]["lowered"] == 0
    assert "MatMulIntegerToFloat" not in {n.op_type for n in onnx.load(tmp_path / "out" / "model.onnx").graph.node}
    assert _cosine(ref, got) > 0.9995  # int8 weights alone


def test_non_finite_activations_name_the_layer(tmp_path):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[5] = float("inf")
    with pytest.raises(QCompilerError, match=r"layers\.1\.mlp\.(gate|up)_proj.* not finite"):
        compress(model, CompressionConfig(quant_mode="int8", dataset=_samples(), smooth_quant_alpha="off"),
                 output=tmp_path / "out", example_input=EXAMPLE)
    assert not (tmp_path / "out").exists()


def test_lm_head_statistics_are_checked_against_the_models_own_forward(tmp_path):
    """A model that changes the final norm's output before lm_head (here: doubles it) gets no statistics
    for lm_head from the head pass (the engine would otherwise give a range half the real one): lm_head
    keeps float activations, and the report says why."""
    model = tiny_llama()
    model.lm_head.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    result = compress(model, CompressionConfig(quant_mode="int8", dataset=_samples(), smooth_quant_alpha="off"),
                      example_input=EXAMPLE)
    summary = result.results["activation_quant"].summary
    assert summary["quantized"] == 14
    assert "does not read LlamaRMSNorm" in summary["float_activations"]["lm_head.weight"]


def _initializers_as_in_out(path, out):
    """The ONNX model with every MatMul weight stored [in, out] (no Transpose before the MatMul), as
    exporters that fold the transpose of a Linear's weight write it."""
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    dropped = []
    for node in model.graph.node:
        t = producers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if t is not None and t.op_type == "Transpose" and t.input[0] in inits:
            array = numpy_helper.to_array(inits[t.input[0]]).T.copy()
            inits[t.input[0]].CopyFrom(numpy_helper.from_array(array, t.input[0]))
            node.input[1] = t.input[0]
            dropped.append(t)
    for t in dropped:
        model.graph.node.remove(t)
    assert dropped
    onnx.save(model, str(out))
    return out


@pytest.mark.parametrize("layout", ["exported", "in_out"])
def test_an_onnx_input_takes_static_and_dynamic_activations(tmp_path, layout):
    """An existing ONNX model: the calibration engine runs it whole on onnxruntime with its MatMul inputs
    as extra outputs; SmoothQuant carries its scales in the activation quantizers (an ONNX graph's norm
    weights are not weights of the IR). Either weight layout: [out, in] behind a Transpose (qcompiler's and
    torch's export) or [in, out] (exporters that fold the transpose)."""
    model = _outlier_llama()
    with torch.no_grad():
        ref = model(IDS).logits.numpy()
    compress(model, CompressionConfig(mode=None), output=tmp_path / "fp32", backend="onnx", example_input=EXAMPLE)
    source = tmp_path / "fp32" / "model.onnx"
    if layout == "in_out":
        source = _initializers_as_in_out(source, tmp_path / "fp32" / "in_out.onnx")
    runner = build_registry().backend("onnx").runner
    result = compress(source, CompressionConfig(quant_mode="int8", dataset=_samples()), output=tmp_path / "static",
                      backend="onnx")
    assert result.report["activations"]["lowered"] == result.report["activations"]["linear_layers"] == 15
    assert result.results["smooth_quant"].summary["applied"]["explicit"] > 0
    assert _cosine(ref, runner(tmp_path / "static").logits(IDS.numpy())) > 0.999
    result = compress(source, CompressionConfig(quant_mode="int8-dynamic"), output=tmp_path / "dyn", backend="onnx")
    assert result.report["activations"]["lowered"] == 15
    assert _cosine(ref, runner(tmp_path / "dyn").logits(IDS.numpy())) > 0.99


def test_an_onnx_input_refuses_passes_that_rewrite_it_before_running_it(tmp_path):
    compress(tiny_llama(), CompressionConfig(mode=None), output=tmp_path / "fp32", backend="onnx",
             example_input=EXAMPLE)
    with pytest.raises(QCompilerError, match="gptq run.* with rewritten weights: start from the transformers model"):
        compress(tmp_path / "fp32" / "model.onnx", CompressionConfig(quant_mode="int8", dataset=_samples(), gptq=True),
                 output=tmp_path / "static", backend="onnx")
    assert not (tmp_path / "static").exists()


def test_gptq_with_w8a8_keeps_lm_head_on_u8_activations(tmp_path):
    """With --gptq each block runs on the compressed blocks' outputs; the check that lm_head reads the
    final norm of the last block's output is made on the float model's own forward, so lm_head still gets
    its statistics (it used to fail the check and stay float)."""
    result, ref, got = _artifact(tmp_path, "onnx", "int8", gptq=True)
    assert result.results["activation_quant"].summary["quantized"] == 15
    assert len(result.results["gptq"].summary["layers"]) == 15
    assert _cosine(ref, got) > 0.999
