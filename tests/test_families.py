"""Every LLM family transformers builds, on every backend (tiny random models, nothing downloaded).

Per family and backend: the fp32 artifact generates the same 16 greedy tokens as the float
transformers model (through the backend's own KV cache, past the sliding window of the families
that have one); int8, which rewrites every weight, keeps the logits close; int4 (sym with data-free
AWQ, and asym) compresses and runs; the report's parameter counts add up to the model's. A
tracing export costs about 3 s even for these tiny models, so OpenVINO and ONNX run the compressed
formats for the families whose layers differ most (`FULL`: Conv1D, fused and transposed weights,
parallel blocks, sliding windows) and fp32 for the rest; torch runs every format for every
family. OpenVINO artifacts come from lazily loaded folders, as real models' do. What does not work
yet is refused in one line that says why (`families.UNSUPPORTED`), never a traceback or an
artifact that silently skips weights. The AWQ pattern count per family is checked too.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qcompiler import CompressionConfig, QCompilerError, compress
from qcompiler.plugins.torch import TorchFrontend, lazy
from qcompiler.registry import build_registry
from tests import families

PROMPT = [5, 17, 100, 3, 99, 42]
NEW_TOKENS = 16
CONFIGS = {
    "fp32": CompressionConfig(mode=None),
    "int8": CompressionConfig(mode="int8_asym"),
    "int4_sym_awq": CompressionConfig(mode="int4_sym", group_size=32, awq=True),
    "int4_asym": CompressionConfig(mode="int4_asym", group_size=32),
}
# Conv1D, fused qkv, sliding window, parallel blocks, batched experts ([experts, out, in] and [experts, in, out])
FULL = ("llama", "gpt2", "falcon", "gemma2", "phi", "gpt_neox", "qwen3_moe", "gpt_oss")


def _configs(family: str, backend: str) -> list[str]:
    return list(CONFIGS) if backend == "torch" or family in FULL else ["fp32"]


@pytest.fixture(autouse=True)
def every_matrix_lazy(monkeypatch):
    """OpenVINO artifacts come from lazily loaded folders (placeholders for every Linear / Embedding
    weight, whatever its size), as real models do."""
    monkeypatch.setattr(lazy, "MIN_PLACEHOLDER", 1)


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    built = {}

    def get(model_type: str):
        if model_type not in built:
            from transformers import AutoModelForCausalLM

            folder = families.build(model_type, root / model_type)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([PROMPT])).logits[0].numpy()
            built[model_type] = (folder, families.greedy(model, PROMPT, NEW_TOKENS), logits,
                                 sum(p.numel() for p in model.parameters()))
        return built[model_type]

    return get


def _refusal(family: str, backend: str, name: str) -> str | None:
    fmt = "fp32" if name == "fp32" else "int8"  # every compressed format meets the same refusal
    return families.UNSUPPORTED.get((family, backend, fmt)) or (
        families.UNSUPPORTED.get((family, backend, "fp32")) if name != "fp32" else None)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("backend", ["openvino", "onnx", "torch"])
@pytest.mark.parametrize("family", list(families.FAMILIES))
def test_family_on_backend(family, backend, family_dir, tmp_path):
    folder, want_tokens, want_logits, n_params = family_dir(family)
    for name in _configs(family, backend):
        config, out = CONFIGS[name], tmp_path / name
        refusal = _refusal(family, backend, name)
        if refusal is not None:
            with pytest.raises(QCompilerError, match=refusal):
                compress(folder, config, output=out, backend=backend)
            assert not out.exists()
            continue
        compress(folder, config, output=out, backend=backend)
        report = json.loads((out / "qcompiler_report.json").read_text())
        assert report["parameters"]["total"] == n_params, name
        runner = build_registry().backend(backend).runner(out)
        logits = runner.logits(np.array([PROMPT]))[0]
        assert np.isfinite(logits).all(), name
        if name == "fp32":
            assert np.abs(logits - want_logits).max() < 1e-3 * np.abs(want_logits).max()
            tokens = runner.generate(list(PROMPT), NEW_TOKENS, lambda row: int(np.argmax(row)), None)
            assert [int(t) for t in tokens] == want_tokens
        elif name == "int8":
            assert _cosine(logits, want_logits) > 0.99
        else:
            assert report["table"] and any(r["format"].startswith("int4") for r in report["table"])


@pytest.mark.parametrize("family", list(families.FAMILIES))
def test_awq_patterns_found_per_family(family, family_dir):
    """The AWQ pattern (MatMul -> Multiply -> MatMul, also with gate and up fused in one weight whose
    output is split) is found by the pattern language in every gated MLP, whatever its activation, and
    nowhere else (`families.AWQ_MATCHES` says why per family)."""
    from qcompiler.scale_sites import gated_matches

    folder = family_dir(family)[0]
    frontend = TorchFrontend()
    graph = frontend.trace(frontend.load(folder))
    matches, _ = gated_matches(graph)
    expected, _why = families.AWQ_MATCHES[family]
    assert len(matches) == expected
    assert all(m["second"].name.endswith(("down_proj/MatMul", "fc2/MatMul")) for m in matches)
    if family == "phi3":  # the fused gate_up_proj's up half (its second half of rows) takes 1/s
        width = graph.tensor(matches[0]["w2"]).shape[1]
        assert all(m["rows"] == (width, 2 * width) for m in matches)
    if family in ("phi3", "opt"):
        from transformers import AutoModelForCausalLM

        result = compress(folder, CompressionConfig(mode="int4_sym", group_size=32, awq=True))  # data-free
        assert result.results["awq"].summary["applied"] == 2
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        params = dict(model.named_parameters())
        for c in result.graph.parameter_constants():
            if c.meta.get("rewritten"):
                params[c.attrs["weight"]].data = result.graph.weight(c).clone()
        with torch.no_grad():  # the folded float model computes what the original does
            logits = model(input_ids=torch.tensor([PROMPT])).logits[0].numpy()
        want = family_dir(family)[2]
        assert np.abs(logits - want).max() < 1e-3 * np.abs(want).max()


DATA = [torch.tensor([(7 * i + 3 * j) % 250 + 3 for j in range(16)]) for i in range(4)]
DATA_AWARE = CompressionConfig(mode="int4_sym", group_size=32, awq=True, scale_estimation=True, gptq=True,
                               dataset=DATA, num_samples=4, seqlen=16)
LORA = DATA_AWARE.replace(awq=False, gptq=False, lora_correction=True)


@pytest.mark.parametrize("family", list(families.FAMILIES))
def test_data_aware_on_every_family(family, family_dir, tmp_path):
    """AWQ + scale estimation + GPTQ, and scale estimation + LoRA correction, run block by block on every
    family; AWQ's folding keeps the float function; the torch artifact runs (OpenVINO and ONNX too for
    a few families, whose LoRA adapters are tested in test_calibration)."""
    from transformers import AutoModelForCausalLM

    folder, _, want_logits, _ = family_dir(family)
    backends = ["torch"] + (["openvino", "onnx"] if family in ("llama", "phi", "gpt2") else [])
    refused = False
    for backend in backends:
        refusal = _refusal(family, backend, "int4")
        out = tmp_path / backend
        if refusal is not None:
            with pytest.raises(QCompilerError, match=refusal):
                compress(folder, DATA_AWARE, output=out, backend=backend)
            assert not out.exists()
            refused = True
            continue
        result = compress(folder, DATA_AWARE, output=out, backend=backend)
        gptq = result.report["passes"]["gptq"]
        primary = [c for c in result.graph.weight_constants() if c.meta.get("role") == "primary"]
        assert gptq["quantized"] == len(primary) > 0
        logits = build_registry().backend(backend).runner(out).logits(np.array([PROMPT]))[0]
        assert np.isfinite(logits).all() and _cosine(logits, want_logits) > 0.5
    if refused:
        return  # the MoE families: their experts cannot be compressed yet, with or without data
    lora = compress(folder, LORA, output=tmp_path / "lora", backend="torch")
    corrected = lora.report["passes"]["lora_correction"]["corrected"]
    assert corrected == len(primary) and lora.report["adapters"]["tensors"] == 2 * corrected
    logits = build_registry().backend("torch").runner(tmp_path / "lora").logits(np.array([PROMPT]))[0]
    assert np.isfinite(logits).all() and _cosine(logits, want_logits) > 0.5
    awq_only = compress(folder, CompressionConfig(mode="int4_sym", group_size=32, awq=True, dataset=DATA,
                                                  scale_estimation=False))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    for c in awq_only.graph.parameter_constants():
        if c.meta.get("rewritten"):
            params[c.attrs["weight"]].data = awq_only.graph.weight(c).clone()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([PROMPT])).logits[0].numpy()
    assert np.abs(logits - want_logits).max() < 1e-3 * np.abs(want_logits).max()


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_moe_experts_compressed_per_expert_routers_in_backup(family, family_dir, tmp_path):
    """The batched expert weights ([experts, out, in], gpt-oss's [experts, in, out]) are traced as MatMul
    weights and compressed per expert (each expert's codes are what it gets alone); the routers take
    the backup precision; data-aware passes run on the rest and say why the experts are rounded to
    nearest; a data-aware ratio metric, which needs the experts' inputs, is refused in one line."""
    from qcompiler.quant import quantize

    folder = family_dir(family)[0]
    result = compress(folder, CompressionConfig(mode="int4_sym", group_size=32))  # the IR, codes kept
    experts = {c.attrs["weight"]: c for c in result.graph.weight_constants() if ".experts." in c.attrs["weight"]}
    assert len(experts) == 4 and all(c.meta["format"].mode.bits == 4 for c in experts.values())
    for name, const in experts.items():
        w, cw = result.graph.weight(const), const.meta["compressed"]
        decoded = cw.dequantize()
        assert decoded.shape == w.shape
        axes = result.graph.uses_by_weight()[const][0].reduction_axes
        for e in range(w.shape[0]):  # expert e alone, its input channels on the same axis
            alone = quantize(w[e], tuple(a - 1 for a in axes), cw.mode, 32).dequantize()
            assert torch.equal(decoded[e], alone), (name, e)
    routers = result.results["precision"].summary["routers_in_backup"]
    assert len(routers) == 2 and all(c.meta["format"].mode.bits == 8 and c.meta["role"] == "backup"
                                     for c in result.graph.weight_constants() if c.attrs["weight"] in routers)
    data = [torch.tensor([(7 * i + 3 * j) % 250 + 3 for j in range(16)]) for i in range(4)]
    aware = compress(folder, CompressionConfig(mode="int4_sym", group_size=32, awq=True, gptq=True, dataset=data,
                                               num_samples=4, seqlen=16), output=tmp_path / "aware", backend="openvino")
    gptq = aware.report["passes"]["gptq"]
    assert gptq["quantized"] > 0 and all(name in gptq["skipped"] for name in experts)
    logits = build_registry().backend("openvino").runner(tmp_path / "aware").logits(np.array([PROMPT]))[0]
    assert np.isfinite(logits).all() and _cosine(logits, family_dir(family)[2]) > 0.5
    with pytest.raises(QCompilerError, match="batched MoE expert weights"):
        compress(folder, CompressionConfig(mode="int4_sym", group_size=32, ratio=0.5, dataset=data, num_samples=4,
                                           seqlen=16), output=tmp_path / "metric", backend="openvino")
    assert not (tmp_path / "metric").exists()


def test_moe_onnx_model_imported_and_compressed(family_dir, tmp_path):
    """An exported MoE ONNX model (batched experts behind a Transpose of their last two axes) read by the
    ONNX frontend: experts compressed, routers (found by their TopK) in backup, logits kept at int8."""
    folder, _, want_logits, _ = family_dir("qwen3_moe")
    compress(folder, CONFIGS["fp32"], output=tmp_path / "fp32", backend="onnx")
    for name in ("int8", "int4_asym"):
        result = compress(tmp_path / "fp32" / "model.onnx", CONFIGS[name], output=tmp_path / name)
        experts = [c for c in result.graph.weight_constants() if ".experts." in c.attrs["weight"]]
        assert len(experts) == 4 and all(c.meta["format"] is not None for c in experts)
        logits = build_registry().backend("onnx").runner(tmp_path / name).logits(np.array([PROMPT]))[0]
        assert _cosine(logits, want_logits) > (0.99 if name == "int8" else 0.5)
    assert len(result.results["precision"].summary["routers_in_backup"]) == 2
