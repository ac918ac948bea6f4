"""Calibration data, the calibration engine, and the data-aware passes on tiny random models."""

import numpy as np
import pytest
import torch

from qcompiler import CompressionConfig, compress
from qcompiler.calibration import CalibrationData, from_text_file, load
from qcompiler.config import Mode
from qcompiler.errors import QCompilerError
from qcompiler.passes.gptq import gptq
from qcompiler.weight_fit import estimate
from qcompiler.quant import quantize
from tests.conftest import tiny_llama, tiny_tokenizer


def _samples(n=8, seqlen=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (seqlen,), generator=g) for _ in range(n)]


def _apply(model, result):
    """The model computing what the compressed IR computes (decoded weights, rewritten floats)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for c in result.graph.parameter_constants():
        name = c.attrs["weight"]
        if c.meta.get("compressed") is not None:
            params[name].data = c.meta["compressed"].dequantize().to(params[name].dtype)
        elif c.meta.get("rewritten"):
            params[name].data = result.graph.weight(c).clone()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _registry_with(*passes):
    """The installed plugins plus a plugin registering `passes` (pass classes defined in a test)."""
    from qcompiler.hookspecs import hookimpl
    from qcompiler.registry import build_registry

    class Plugin:
        @hookimpl
        def qcompiler_register_passes(self):
            return list(passes)

    return build_registry(plugins=[Plugin()])


# calibration data -------------------------------------------------------------------------------
def test_text_file_takes_the_first_consecutive_chunks(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("abcdefghij" * 10)
    data = from_text_file(text, tiny_tokenizer(), 3, 7)
    ids = tiny_tokenizer()(text.read_text(), add_special_tokens=False)["input_ids"]
    assert [s.tolist() for s in data.samples] == [ids[0:7], ids[7:14], ids[14:21]]
    assert data.describe()["tokens"] == 21 and len(data.digest()) == 40


def test_short_text_says_how_many_tokens(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello")
    with pytest.raises(QCompilerError, match=r"has 5 tokens; 4 samples of 8 need 32"):
        from_text_file(text, tiny_tokenizer(), 4, 8)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_samples": 0}, "--num-samples 0"),
    ({"gptq": True, "lora_correction": True}, "cannot be combined"),
    ({"mode": "int8_asym", "scale_estimation": True}, "scale estimation refits 4-bit scales"),
    ({"mode": "mxfp4", "gptq": True}, "mxfp4 is not one of them: drop --gptq"),
    ({"mode": "int8_asym", "lora_correction": True}, "LoRA correction corrects 4-bit layers"),
    ({"mode": "mxfp4", "lora_correction": True}, "mxfp4 is not one of them: drop --lora-correction"),
    ({"mode": "mxfp4", "awq": True}, "AWQ is not available for mxfp4"),
    ({"lora_correction": True, "passes": {"lora_correction": {"rank": 0}}}, "--lora-rank 0 is below 1"),
    ({"lora_correction": True, "passes": {"lora_correction": {"rnk": 4}}},
     "has no option 'rnk' \\(its options: rank, damp\\)"),
    ({"gptq": True, "passes": {"gptq": {"damp": "much"}}}, "--gptq-damp takes float, not 'much'"),
    ({"gptq": True, "passes": {"gptq": {"damp": 0}}}, "--gptq-damp 0.0 must be above 0"),
])
def test_impossible_data_aware_options(kwargs, message):
    with pytest.raises(QCompilerError, match=message):
        CompressionConfig(**{"mode": "int4_sym", "dataset": "x.txt", **kwargs})


def test_a_builtin_switch_is_its_config_field():
    on = CompressionConfig(mode="int4_sym", dataset="x.txt", gptq=True, passes={"gptq": {"damp": 0.05}})
    assert on.switched_on()["gptq"] == {"damp": 0.05}
    assert "gptq" not in on.replace(gptq=False, passes={}).switched_on()
    with pytest.raises(QCompilerError, match="sets options of gptq, which is off"):
        on.replace(gptq=False)
    with pytest.raises(QCompilerError, match=r"passes\['gptq'\] is True: give a dict"):
        CompressionConfig(mode="int4_sym", dataset="x.txt", gptq=True, passes={"gptq": True})
    with pytest.raises(QCompilerError, match="is not one a user switches on through passes"):
        CompressionConfig(mode="int4_sym", passes={"awq": {}})


def test_scale_estimation_is_on_by_default_with_data_and_can_be_turned_off():
    from qcompiler.cli import _parser, config_from_args
    from qcompiler.passes.gptq import GPTQ
    from qcompiler.passes.scale_estimation import ScaleEstimation

    with_data = CompressionConfig(mode="int4_sym", dataset="x.txt")
    assert with_data.scale_estimation is None and "scale_estimation" in with_data.switched_on()
    assert ScaleEstimation.options_from(with_data).by_default
    assert ScaleEstimation.options_from(with_data.replace(scale_estimation=True)).by_default is False
    assert "scale_estimation" not in with_data.replace(scale_estimation=False).switched_on()
    assert "scale_estimation" not in CompressionConfig(mode="int4_sym").switched_on()  # no data
    assert "scale_estimation" not in CompressionConfig(mode="mxfp4", dataset="x.txt").switched_on()  # a mode it lacks
    gptq = with_data.replace(gptq=True)
    assert ScaleEstimation.options_from(gptq) is None and GPTQ.options_from(gptq).scale_estimation
    assert not GPTQ.options_from(gptq.replace(scale_estimation=False)).scale_estimation
    with pytest.raises(QCompilerError, match="sets options of scale_estimation, which is off"):
        with_data.replace(scale_estimation=False, passes={"scale_estimation": {"scale_steps": 5}})

    def parsed(*flags):
        return config_from_args(_parser().parse_args(["compress", "m", "--weight-format", "int4", "--group-size",
                                                      "64", "--dataset", "x.txt", *flags]))[0].scale_estimation

    assert parsed() is None and parsed("--scale-estimation") is True and parsed("--no-scale-estimation") is False


def test_an_unknown_pass_is_refused_before_loading():
    from qcompiler.pipeline import build_passes
    from qcompiler.registry import build_registry

    cfg = CompressionConfig(mode="int4_sym", passes={"nope": {}})  # maybe a plugin of another registry
    with pytest.raises(QCompilerError, match="unknown pass 'nope': installed passes are .*gptq"):
        build_passes(cfg, build_registry())


def test_a_plugin_pass_declares_its_options_once(tmp_path):
    """Its flag and option reach the command line, CompressionConfig and the report from one declaration."""
    import dataclasses as dc

    from qcompiler import pass_options
    from qcompiler.passmanager import Pass, PassResult

    @dc.dataclass(frozen=True)
    class ShrinkOptions:
        strength: float = dc.field(default=1.0, metadata={"help": "how much", "min": 0})

    class Shrink(Pass):
        name, flag, help, needs_data = "shrink", "--shrink", "scale every norm weight", True
        conflicts = ("gptq",)
        Options = ShrinkOptions

        def run(self, graph, ctx):
            return PassResult(True, {"strength seen": self.options.strength})

    registry = _registry_with(Shrink)
    import argparse

    parser = argparse.ArgumentParser()
    pass_options.add_flags(parser, registry)
    args = parser.parse_args(["--shrink", "--shrink-strength", "0.5"])
    assert pass_options.from_args(args, registry)["shrink"] == {"strength": 0.5}
    with pytest.raises(QCompilerError, match="--shrink-strength is an option of --shrink"):
        pass_options.from_args(parser.parse_args(["--shrink-strength", "2"]), registry)
    cfg = CompressionConfig(mode="int4_sym", group_size=32, passes={"shrink": {"strength": 2}}, dataset=_samples())
    result = compress(tiny_llama(), cfg, registry=registry)
    assert result.results["shrink"].summary["strength seen"] == 2.0
    assert result.results["shrink"].summary["options"] == {"strength": 2.0}
    from qcompiler.pipeline import build_passes

    for bad, message in (({"strength": -1}, "--shrink-strength -1.0 is below 0"),):
        with pytest.raises(QCompilerError, match=message):
            build_passes(cfg.replace(passes={"shrink": bad}), registry)
    with pytest.raises(QCompilerError, match="--shrink need calibration data"):
        build_passes(CompressionConfig(mode="int4_sym", passes={"shrink": {}}), registry)
    with pytest.raises(QCompilerError, match="--shrink and --gptq cannot be combined"):
        build_passes(cfg.replace(gptq=True), registry)


def test_data_aware_options_need_data():
    with pytest.raises(QCompilerError, match="--scale-estimation, --gptq need calibration data"):
        CompressionConfig(mode="int4_sym", scale_estimation=True, gptq=True)
    with pytest.raises(QCompilerError, match="need calibration data"):
        CompressionConfig(mode="int4_sym", sensitivity_metric="max_activation_variance", ratio=0.8)
    with pytest.raises(QCompilerError, match="--lora-correction need calibration data"):
        CompressionConfig(mode="int4_sym", lora_correction=True)
    assert CompressionConfig(mode="int4_sym", awq=True).dataset is None  # data-free AWQ stays


def test_hub_dataset_name_is_refused_offline():
    with pytest.raises(QCompilerError, match="'wikitext2' is not available offline"):
        load("wikitext2", tiny_tokenizer(), 2, 8)


def test_auto_data_is_generated_by_the_model_and_deterministic():
    from qcompiler.plugins.torch.blocks import TorchBlockExecutor

    model = tiny_llama()
    executor = TorchBlockExecutor(model, [], tiny_tokenizer())
    a = load("auto", None, 3, 10, generate=executor.generate, seed=1)
    b = load("auto", None, 3, 10, generate=executor.generate, seed=1)
    assert [s.tolist() for s in a.samples] == [s.tolist() for s in b.samples]
    assert all(len(s) == 10 for s in a.samples)


# the engine -------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_engine_statistics_match_the_full_model(family, monkeypatch, tmp_path):
    """Block-by-block statistics equal those of hooks on the whole model's forward (in float32; with
    bf16 MatMuls, which this machine runs natively, they are close): across batches of samples, for
    q/k/v sharing one input, and for gemma2, whose layers alternate sliding-window and full attention
    (sequences longer than its window of 4)."""
    from transformers import AutoModelForCausalLM

    from qcompiler.engine import CalibrationEngine
    from qcompiler.plugins.torch import TorchFrontend
    from tests.families import build

    monkeypatch.setenv("QCOMPILER_CALIBRATION_FP32", "1")
    model = AutoModelForCausalLM.from_pretrained(build(family, tmp_path / "m"), dtype=torch.float32).eval()
    model.config.use_cache = False
    source = TorchFrontend().load(model)
    graph = TorchFrontend().trace(source)
    data = CalibrationData(_samples(20, 12), "test")  # two batches
    engine = CalibrationEngine(TorchFrontend().executor(source, graph), data)
    names = [f"model.layers.{i}.{m}.weight" for i in (0, 1)
             for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")]
    got = {}
    engine.sweep({n: frozenset({"abs_max", "hessian"}) for n in names},
                 lambda block, stats: got.update({n: stats[n] for n in stats}))
    seen = {n: [] for n in names}
    modules = dict(model.named_modules())
    hooks = [modules[n.rsplit(".", 1)[0]].register_forward_pre_hook(
        lambda m, args, n=n: seen[n].append(args[0].reshape(-1, args[0].shape[-1]))) for n in names]
    for s in data.samples:
        _logits(model, s[None])
    for h in hooks:
        h.remove()
    for n in names:
        x = torch.cat(seen[n])
        assert got[n].tokens == x.shape[0]
        assert torch.allclose(got[n].abs_max, x.abs().amax(0), atol=1e-5), n
        assert torch.allclose(got[n].hessian, x.t() @ x, rtol=1e-4, atol=1e-3), n
    assert engine.block_forwards == 2


# the algorithms ---------------------------------------------------------------------------------
def test_gptq_beats_rtn_on_the_output_error():
    g = torch.Generator().manual_seed(0)  # correlated inputs, as activations are: GPTQ's error feedback uses them
    x = torch.randn(512, 32, generator=g) @ torch.randn(32, 128, generator=g) + 0.1 * torch.randn(512, 128, generator=g)
    w = torch.randn(64, 128, generator=g)
    for mode in (Mode.INT4_SYM, Mode.INT4_ASYM):
        cw, before, after = gptq(w, x.t() @ x / 512, mode, 32)
        assert cw.codes.shape == (64, 4, 32) and after < 0.8 * before
        out_rtn = x @ quantize(w, (1,), mode, 32).dequantize().t()
        out_gptq = x @ cw.dequantize().t()
        assert (out_gptq - x @ w.t()).pow(2).sum() < (out_rtn - x @ w.t()).pow(2).sum()


def test_scale_estimation_never_worse_than_rtn():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 128, generator=g) * torch.linspace(0.1, 3, 128)
    w = torch.randn(64, 128, generator=g)
    for mode in (Mode.INT4_SYM, Mode.INT4_ASYM, Mode.NF4):
        from qcompiler.weight_fit import hessian_blocks

        cw, before, after = estimate(w, hessian_blocks(x.t() @ x / len(x), 32), x.abs().amax(0), mode, 32)
        assert after <= before and cw.scale.dtype == torch.float16
        assert after < before  # a refit finds something on outlier channels


def test_awq_with_data_keeps_the_float_function():
    """The scales fold into the norms and the first MatMuls: before rounding, the function is unchanged."""
    model = tiny_llama()
    reference = _logits(model, _samples(1, 12, seed=5)[0][None])
    config = CompressionConfig(mode="int4_sym", group_size=32, awq=True, dataset=_samples(), num_samples=8)
    result = compress(model, config)
    awq = result.results["awq_data"].summary
    assert awq["matched"] == {"gated": 2, "relu": 0, "norm": 4} and sum(awq["applied"].values()) > 0
    # scale estimation follows (on by default with data): each site's scale was chosen after its refit
    assert len(awq["layers"]) == 6 and all("error_refit" in v for v in awq["layers"].values())
    params = dict(model.named_parameters())
    for c in result.graph.parameter_constants():
        if c.meta.get("rewritten"):
            params[c.attrs["weight"]].data = result.graph.weight(c).clone()
    assert torch.allclose(_logits(model, _samples(1, 12, seed=5)[0][None]), reference, atol=1e-4)


def test_awq_without_scale_estimation_chooses_by_round_to_nearest():
    config = CompressionConfig(mode="int4_sym", group_size=32, awq=True, dataset=_samples(), num_samples=8,
                               scale_estimation=False)
    layers = compress(tiny_llama(), config).results["awq_data"].summary["layers"]
    assert len(layers) == 6 and not any("error_refit" in v for v in layers.values())
    assert all(v["error_after"] <= v["error_before"] for v in layers.values())


def test_data_aware_passes_lower_the_error_of_the_model(monkeypatch):
    monkeypatch.setenv("QCOMPILER_CALIBRATION_FP32", "1")
    model = tiny_llama(seed=1)
    ids = _samples(1, 32, seed=9)[0][None]
    reference = _logits(model, ids)
    errors = {}
    for name, extra in (("rtn", {}), ("gptq", {"gptq": True}), ("se", {"scale_estimation": True})):
        m = tiny_llama(seed=1)
        cfg = CompressionConfig(mode="int4_asym", group_size=32, **({"dataset": _samples(16, 32)} if extra else {}),
                                **extra)
        result = compress(m, cfg)
        _apply(m, result)
        errors[name] = float((_logits(m, ids) - reference).pow(2).mean())
        if extra:
            layers = result.results[name if name == "gptq" else "scale_estimation"].summary["layers"]
            assert len(layers) == 14
            if name == "se":  # it keeps round to nearest's scale where no refit is better
                assert all(v["error_after"] <= v["error_rtn"] + 1e-9 for v in layers.values())
            else:
                assert sum(v["error_after"] for v in layers.values()) < sum(v["error_rtn"] for v in layers.values())
    assert errors["gptq"] < errors["rtn"] and errors["se"] < errors["rtn"]


def test_sensitivity_metric_with_data_picks_by_activations():
    model = tiny_llama()
    cfg = CompressionConfig(mode="int4_sym", group_size=32, ratio=0.5, dataset=_samples(), num_samples=8)
    result = compress(model, cfg)
    summary = result.results["precision"].summary
    assert summary["sensitivity_metric"] == "max_activation_variance"
    assert 0 < summary["primary"] < summary["ratio_defining"]
    data_free = compress(tiny_llama(), CompressionConfig(mode="int4_sym", group_size=32, ratio=0.5))
    assert data_free.results["precision"].summary.get("sensitivity_metric") == "weight_quantization_error"


def test_report_records_the_calibration(tmp_path):
    from tests.families import build

    folder = build("llama", tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    cfg = CompressionConfig(mode="int4_sym", group_size=32, awq=True, scale_estimation=True, dataset=str(text),
                            num_samples=4, seqlen=32)
    result = compress(folder, cfg, output=tmp_path / "out", backend="torch")
    calib = result.report["calibration"]
    assert calib["samples"] == 4 and calib["seqlen"] == 32 and calib["source"].startswith("t.txt")
    assert result.report["passes"]["scale_estimation"]["estimated"] > 0


# every backend receives rewritten non-MatMul weights --------------------------------------------
class _ScaleNorm:
    """A plugin pass that rewrites a norm weight (not a MatMul weight)."""

    from qcompiler.hookspecs import hookimpl

    @hookimpl
    def qcompiler_register_passes(self):
        from qcompiler.passmanager import Pass, PassResult

        class ScaleNorm(Pass):
            name = "scale_norm"

            def run(self, graph, ctx):
                const = graph.node("model.layers.0.input_layernorm.weight")
                graph.set_weight(const, graph.weight(const) * 3.0)
                return PassResult(True)

        return [ScaleNorm]


@pytest.mark.parametrize("backend", ["openvino", "onnx", "torch"])
def test_a_rewritten_norm_weight_reaches_every_backend(backend, tmp_path):
    from qcompiler.registry import build_registry
    from tests.families import build

    folder = build("llama", tmp_path / "m")
    registry = build_registry(plugins=[_ScaleNorm()])
    cfg = CompressionConfig(mode=None, extra_passes=("scale_norm",))
    result = compress(folder, cfg, output=tmp_path / "out", backend=backend, registry=registry)
    # OpenVINO converts the float graph beside the passes; a rewritten norm makes it convert again
    assert "convert_beside_passes" not in result.report["backend_seconds"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight.mul_(3.0)
    ids = np.array([[5, 17, 42, 99, 3, 7]])
    expected = _logits(model, torch.from_numpy(ids)).numpy()[0]
    got = registry.backend(backend).runner(tmp_path / "out").logits(ids)[0]
    assert np.abs(got - expected).max() < 1e-3


class _InsertMultiply:
    """A plugin pass that inserts a node: the output of layer 0's down_proj times a new per-channel
    weight, and, compressed with everything else, an int8 low-rank term B(A(x)) on its o_proj."""

    from qcompiler.hookspecs import hookimpl

    @hookimpl
    def qcompiler_register_passes(self):
        from qcompiler.passmanager import Pass, PassResult
        from qcompiler.rewrites import module_output

        class InsertMultiply(Pass):
            name = "insert_multiply"

            def run(self, graph, ctx):
                path = "model.layers.0.mlp.down_proj"
                _, y = module_output(graph, path)
                scale = graph.insert_weight(f"{path}.gain", _gain(y.meta["shape"][-1]))
                graph.replace_uses(y, graph.insert("Multiply", [y, scale], name=f"{path}/gain",
                                                   meta={"epilogue_of": path}))
                return PassResult(True)

        return [InsertMultiply]


def _gain(n):
    return torch.linspace(0.5, 2.0, n)


@pytest.mark.parametrize("backend", ["openvino", "onnx", "torch"])
def test_an_inserted_multiply_reaches_every_backend(backend, tmp_path):
    from qcompiler.registry import build_registry
    from tests.families import build

    folder = build("llama", tmp_path / "m")
    registry = build_registry(plugins=[_InsertMultiply()])
    compress(folder, CompressionConfig(mode=None, extra_passes=("insert_multiply",)), output=tmp_path / "out",
             backend=backend, registry=registry)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    down = model.model.layers[0].mlp.down_proj
    down.register_forward_hook(lambda m, args, out: out * _gain(out.shape[-1]))
    ids = np.array([[5, 17, 42, 99, 3, 7]])
    expected = _logits(model, torch.from_numpy(ids)).numpy()[0]
    plain = _logits(AutoModelForCausalLM.from_pretrained(folder).eval(), torch.from_numpy(ids)).numpy()[0]
    got = registry.backend(backend).runner(tmp_path / "out").logits(ids)[0]
    assert np.abs(plain - expected).max() > 1e-2  # the change is visible
    assert np.abs(got - expected).max() < 1e-3


@pytest.mark.parametrize("how, message", [
    ("weight_read_by_the_model", "is read by model.layers.0.mlp.up_proj/MatMul, a node of the model"),
    ("some_readers_left", "still reads the output of model.layers.0.mlp.up_proj"),
])
def test_inserted_nodes_a_backend_cannot_lower_exactly_are_refused(how, message, tmp_path):
    from qcompiler.passmanager import Pass, PassResult
    from qcompiler.rewrites import module_output
    from tests.families import build

    class Bad(Pass):
        name = "bad"

        def run(self, graph, ctx):
            path = "model.layers.0.mlp.up_proj"
            x, y = module_output(graph, path)
            if how == "weight_read_by_the_model":
                old = y.inputs[1]
                new = graph.insert_weight(f"{path}.other", graph.weight(old) * 2)
                y.inputs = (y.inputs[0], new)
            else:
                gain = graph.insert_weight(f"{path}.gain", torch.ones(y.meta["shape"][-1]))
                scaled = graph.insert("Multiply", [y, gain], meta={"epilogue_of": path})
                reader = next(r for r in graph.consumers()[y] if r is not scaled)  # act(gate) * up
                reader.inputs = (scaled, y)  # reads the inserted node and still the module's own output
            return PassResult(True)

    folder = build("llama", tmp_path / "m")
    with pytest.raises(QCompilerError, match=message):
        compress(folder, CompressionConfig(mode=None, extra_passes=("bad",)), output=tmp_path / "out",
                 backend="openvino", registry=_registry_with(Bad))
    assert not (tmp_path / "out").exists()


def test_an_inserted_node_outside_an_epilogue_is_refused_before_writing(tmp_path):
    from qcompiler.passmanager import Pass, PassResult
    from tests.families import build

    class Stray(Pass):
        name = "stray"

        def run(self, graph, ctx):
            up = next(u.op for u in graph.weight_uses() if u.op.name.startswith("model.layers.0.mlp.up_proj"))
            gate = next(u.op for u in graph.weight_uses() if u.op.name.startswith("model.layers.0.mlp.gate_proj"))
            graph.replace_uses(up, graph.insert("Add", [up, gate], meta={"epilogue_of": "model.layers.0.mlp.up_proj"}))
            return PassResult(True)

    folder = build("llama", tmp_path / "m")
    registry = _registry_with(Stray)
    for backend in ("openvino", "onnx", "torch"):
        with pytest.raises(QCompilerError, match="reads model.layers.0.mlp.gate_proj"):
            compress(folder, CompressionConfig(mode=None, extra_passes=("stray",)), output=tmp_path / backend,
                     backend=backend, registry=registry)
        assert not (tmp_path / backend).exists()


def test_statistics_cache_is_reused_only_for_the_same_model_and_data(tmp_path):
    cache = tmp_path / "stats"
    cfg = CompressionConfig(mode="int4_sym", group_size=32, awq=True, scale_estimation=True, dataset=_samples(),
                            statistics_path=str(cache))
    first = compress(tiny_llama(), cfg)
    second = compress(tiny_llama(), cfg)
    assert first.calibration["statistics_cache"] == ["collected"] and first.calibration["block_forwards"] == 2
    assert second.calibration["statistics_cache"][0].startswith("reused") and second.calibration["block_forwards"] == 0
    for a, b in zip(first.graph.weight_constants(), second.graph.weight_constants()):
        assert a.meta["compressed"].same_codes(b.meta["compressed"])
    other_data = compress(tiny_llama(), cfg.replace(dataset=_samples(seed=3)))
    other_model = compress(tiny_llama(seed=2), cfg)
    for run in (other_data, other_model):
        assert run.calibration["statistics_cache"][0].startswith("collected (statistics of another")
        assert run.calibration["block_forwards"] == 2
    entry = next(p for p in cache.iterdir() if (p / "key.json").is_file())
    next(entry.glob("*.pt")).write_bytes(b"not a torch file")
    broken = {p.name for p in cache.iterdir()}
    with pytest.raises(QCompilerError, match="cannot be read"):
        for _ in range(4):  # whichever entry was damaged, one of the runs above reads it
            for model, data in ((tiny_llama(), _samples()), (tiny_llama(), _samples(seed=3)),
                                (tiny_llama(seed=2), _samples())):
                compress(model, cfg.replace(dataset=data))
    assert {p.name for p in cache.iterdir()} == broken


@pytest.mark.parametrize("name, message", [
    ("model.xml", "openvino frontend cannot run a model on calibration data"),
    # the ONNX executor runs the model as it is: statistics only, never with rewritten weights
    ("model.onnx", "onnx frontend runs a model on calibration data only as it is.*awq_data.* with rewritten weights"),
])
def test_frontends_without_a_block_executor_refuse_data_before_loading(tmp_path, name, message):
    model = tmp_path / name
    model.write_bytes(b"not read: the refusal comes first")
    cfg = CompressionConfig(mode="int4_sym", awq=True, dataset=_samples())
    with pytest.raises(QCompilerError, match=message):
        compress(model, cfg, output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


# LoRA correction -------------------------------------------------------------------------------
def test_lora_correction_is_the_best_rank_r_fit_on_the_data():
    from qcompiler.passes.lora_correction import correct

    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g)
    x = torch.randn(512, 64, generator=g) * torch.linspace(0.1, 3.0, 64)
    h = x.t() @ x / 512
    deq = quantize(w, (1,), Mode.INT4_SYM, 32).dequantize()
    a, b, before, after = correct(w, deq, h, rank=8, damp=0.0)
    assert a.mode is Mode.INT8_ASYM and tuple(a.codes.reshape(8, -1).shape) == (8, 64) and b.matrix_shape == (48, 8)
    d = w - deq
    rest = d - b.dequantize() @ a.dequantize()
    assert after == pytest.approx(float(((rest @ h) * rest).sum() / ((w @ h) * w).sum()), rel=1e-4)
    # no other rank-8 term does much better: the truncated SVD of D L without rounding is the optimum
    low = torch.linalg.cholesky(h.double())
    u, s, vt = torch.linalg.svd(d.double() @ low)
    best = (u[:, :8] * s[:8]) @ vt[:8] @ torch.linalg.inv(low)
    optimum = float((((d - best) @ h.double()) * (d - best)).sum() / ((w @ h) * w).sum())
    assert optimum <= after <= optimum * 1.05 and after < 0.8 * before


@pytest.mark.parametrize("backend", ["openvino", "onnx", "torch"])
def test_lora_adapters_reach_every_backend_as_int8_matmuls(backend, tmp_path):
    """The artifact computes the compressed weights plus the adapters, exactly where the backend runs in
    fp32 (OpenVINO); ONNX (int8 activations) and torch (bf16) come closer to the float model than
    without the adapters."""
    from transformers import AutoModelForCausalLM

    from qcompiler.registry import build_registry
    from qcompiler.rewrites import in_module
    from tests.families import build

    folder = build("llama", tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    cfg = CompressionConfig(mode="int4_sym", group_size=32, scale_estimation=True, dataset=str(text),
                            num_samples=8, seqlen=32)
    registry = build_registry()
    ids = np.array([[5, 17, 42, 99, 3, 7, 64, 12]])
    float_logits = _logits(AutoModelForCausalLM.from_pretrained(folder).eval(), torch.from_numpy(ids)).numpy()[0]
    errors = {}
    for lora in (False, True):
        out = tmp_path / f"out{lora}"
        result = compress(folder, cfg.replace(lora_correction=lora), output=out, backend=backend)
        errors[lora] = np.abs(registry.backend(backend).runner(out).logits(ids)[0] - float_logits).max()
    summary = result.report["passes"]["lora_correction"]
    assert summary["corrected"] == 14 and summary["rank"] == 8
    assert set(summary["skipped"]) == {"model.embed_tokens.weight", "lm_head.weight"}  # 8-bit backup
    assert result.report["adapters"]["tensors"] == 28
    assert all(v["error_after"] < v["error_rtn"] for v in summary["layers"].values())
    assert errors[True] < errors[False]
    if backend == "openvino":  # fp32 inference: the artifact is the dequantized model plus the adapters
        graph = compress(folder, cfg.replace(lora_correction=True)).graph  # in memory: the codes are kept
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        params = dict(model.named_parameters())
        for const in graph.weight_constants():
            if "compressed" in const.meta and not const.meta.get("adapter_of"):
                cw = const.meta["compressed"]
                params[const.attrs["weight"]].data = cw.dequantize().reshape(params[const.attrs["weight"]].shape)
        with in_module(model, graph):
            expected = _logits(model, torch.from_numpy(ids)).numpy()[0]
        got = registry.backend(backend).runner(tmp_path / "outTrue").logits(ids)[0]
        assert np.abs(got - expected).max() < 1e-3
        xml = (tmp_path / "outTrue" / "openvino_model.xml").read_text()
        assert xml.count("lora_A") >= 14 and 'element_type="u8"' in xml


@pytest.mark.parametrize("backend, options, message", [
    ("torch", {"group_size": 16}, "torch's int4 CPU kernel takes groups of"),
    ("onnx", {"mode": "nf4", "all_layers": True}, "NF4 embeddings have no onnxruntime kernel"),
])
def test_backend_refuses_an_assigned_format_before_any_data_aware_pass(backend, options, message, tmp_path,
                                                                       monkeypatch):
    import qcompiler.passes.gptq as gptq_module
    from tests.families import build

    def never(*args, **kwargs):
        raise AssertionError("GPTQ ran before the backend's format check")

    monkeypatch.setattr(gptq_module, "gptq", never)
    folder = build("llama", tmp_path / "m")
    cfg = CompressionConfig(**{"mode": "int4_sym", "group_size": 32, "gptq": True, "dataset": _samples(), **options})
    with pytest.raises(QCompilerError, match=message):
        compress(folder, cfg, output=tmp_path / "out", backend=backend)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode, refit", [(Mode.INT4_SYM, False), (Mode.INT4_ASYM, True)])
def test_gptq_rows_are_independent_so_weights_sharing_an_input_stack(mode, refit):
    """GPTQ rounds q, k and v (one input, one Hessian) as one stacked matrix: the same codes as one by one."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g) * torch.linspace(0.2, 2.0, 64)
    h = x.t() @ x / 256
    w1, w2 = torch.randn(32, 64, generator=g), torch.randn(16, 64, generator=g)
    fit = None
    if refit:
        fit = lambda group, cols: estimate(group, h[cols, cols][None], x.abs().amax(0)[cols], mode, -1)[0]  # noqa: E731
    both, _, _ = gptq(torch.cat([w1, w2]), h, mode, 32, refit=fit, errors=False)
    one, _, _ = gptq(w1, h, mode, 32, refit=fit)
    two, _, _ = gptq(w2, h, mode, 32, refit=fit)
    assert torch.equal(both.codes[:32], one.codes) and torch.equal(both.codes[32:], two.codes)
    assert torch.equal(both.scale[:32], one.scale) and torch.equal(both.scale[32:], two.scale)


def test_awq_rewrites_go_in_place_only_into_a_model_qcompiler_loaded(tmp_path):
    """A folder's model is qcompiler's own: AWQ writes its scaled weights into it (no second copy) and
    computes what it computes on an in-memory model; a model the caller passed is left as it was."""
    config = CompressionConfig(mode="int4_sym", group_size=32, awq=True, dataset=_samples(), num_samples=8)
    user = tiny_llama()
    before = {n: p.detach().clone() for n, p in user.named_parameters()}
    in_memory = compress(user, config)
    assert not in_memory.graph.owns_weights
    assert all(torch.equal(p, before[n]) for n, p in user.named_parameters())
    folder = tmp_path / "model"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    loaded = compress(folder, config)
    graph = loaded.graph
    assert graph.owns_weights
    params = {n: p for n, p in loaded.source.model.named_parameters()}
    rewritten = [c for c in graph.parameter_constants() if c.meta.get("rewritten")]
    assert rewritten and all(graph.weight(c).data_ptr() == params[c.attrs["weight"]].data_ptr() for c in rewritten)
    consts = {c.attrs["weight"]: c for c in in_memory.graph.parameter_constants()}
    for c in rewritten:
        assert torch.allclose(graph.weight(c), in_memory.graph.weight(consts[c.attrs["weight"]]), atol=1e-6)
        cw, other = c.meta.get("compressed"), consts[c.attrs["weight"]].meta.get("compressed")
        assert (cw is None) == (other is None) and (cw is None or torch.equal(cw.codes, other.codes))


@pytest.mark.parametrize("cached", [False, True])
def test_the_ratio_sweep_keeps_what_scale_estimation_reads(cached, monkeypatch, tmp_path):
    """With --ratio and an activation metric, the precision pass's sweep of the float model also collects
    scale estimation's statistics for every weight that may get 4 bits, so the float model runs once;
    the codes are those of two sweeps. With a statistics cache, a second run runs no block."""
    from qcompiler.passes.scale_estimation import ScaleEstimation

    cfg = CompressionConfig(mode="int4_sym", group_size=32, ratio=0.5, dataset=_samples(),
                            **({"statistics_path": str(tmp_path / "stats")} if cached else {}))
    once = compress(tiny_llama(), cfg)
    assert once.calibration["block_forwards"] == 2  # tiny_llama has 2 blocks
    assert once.results["scale_estimation"].summary["estimated"] == once.results["precision"].summary["primary"] > 0
    if cached:
        again = compress(tiny_llama(), cfg)
        assert again.calibration["block_forwards"] == 0
        for a, b in zip(once.graph.weight_constants(), again.graph.weight_constants()):
            assert (a.meta.get("compressed") is None) == (b.meta.get("compressed") is None)
            assert a.meta.get("compressed") is None or a.meta["compressed"].same_codes(b.meta["compressed"])
    monkeypatch.setattr(ScaleEstimation, "prefetch", lambda self, graph, ctx, formats: {})
    twice = compress(tiny_llama(), cfg.replace(statistics_path=None))
    assert twice.calibration["block_forwards"] == 4
    compressed = 0
    for a, b in zip(once.graph.weight_constants(), twice.graph.weight_constants()):
        assert (a.meta.get("compressed") is None) == (b.meta.get("compressed") is None)
        if a.meta.get("compressed") is not None and a.meta["format"].mode is Mode.INT4_SYM:
            assert a.meta["compressed"].same_codes(b.meta["compressed"])
            compressed += 1
    assert compressed == once.results["precision"].summary["primary"]
