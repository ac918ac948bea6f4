"""--weight-format keep: an already-quantized input (GPTQ, AWQ, auto_round, compressed-tensors
checkpoint; GGUF blocks) lowered with its own codes, compared with the input decoded independently."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_llama, tiny_tokenizer
from qcompiler.config import CompressionConfig
from qcompiler.errors import QCompilerError
from qcompiler.pipeline import compress
from qcompiler.plugins.checkpoints.read import load_decoded
from qcompiler.registry import build_registry
from test_gguf import bpe_tokenizer

IDS = np.array([[5, 17, 99, 3, 200, 42, 7, 8]])
KEEP = CompressionConfig(mode=None, keep=True)


@pytest.fixture(scope="module")
def float_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("keep") / "model"
    tiny_llama(tie=True).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(float_folder, tmp_path_factory):
    """Checkpoints of the tiny model in each format (written by qcompiler, read back as any writer's)."""
    base = tmp_path_factory.mktemp("ckpt")
    out = {}
    for fmt, mode, group in [("gptq", "int4_sym", 32), ("gptq_v2", "int4_asym", 32), ("awq", "int4_asym", 32),
                             ("auto_round", "int4_sym", 32), ("compressed-tensors", "int8_sym", None)]:
        out[fmt] = base / fmt
        compress(float_folder, CompressionConfig(mode=mode, group_size=group), output=out[fmt], backend=fmt)
    return out


def _logits(artifact):
    return build_registry().backend_for_artifact(artifact).runner(artifact).logits(IDS)


def _reference(model):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(IDS)).logits.numpy()


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2", "awq", "auto_round", "compressed-tensors"])
def test_checkpoint_codes_lowered_to_openvino_compute_the_checkpoint(checkpoints, tmp_path, fmt):
    out = tmp_path / "ov"
    result = compress(checkpoints[fmt], KEEP, output=out, backend="openvino")
    kept = result.results["keep"].summary["kept"]
    assert sum(kept.values()) == 14  # every Linear but the tied embedding / lm_head, stored float
    np.testing.assert_allclose(_logits(out), _reference(load_decoded(checkpoints[fmt])), atol=2e-5)


def test_reexported_gptq_holds_the_same_tensors(checkpoints, tmp_path):
    out = tmp_path / "again"
    compress(checkpoints["gptq"], KEEP, output=out, backend="gptq")
    before, after = load_file(str(checkpoints["gptq"] / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(before) == set(after)
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_checkpoint_to_onnx_and_torch(checkpoints, tmp_path):
    reference = _reference(load_decoded(checkpoints["awq"]))
    for backend in ("onnx", "torch"):
        out = tmp_path / backend
        options = {"accuracy_level": 1} if backend == "onnx" else {}  # fp32 activations: compare the weights alone
        compress(checkpoints["awq"], KEEP, output=out, backend=backend, backend_options=options)
        # torch's int4 CPU kernel takes bf16 activations (and bf16 scales): a bf16-sized tolerance there
        np.testing.assert_allclose(_logits(out), reference, atol=1e-4 if backend == "onnx" else 2e-2)


def test_act_order_codes_are_stored_float_with_the_reason(checkpoints, tmp_path):
    folder = tmp_path / "actorder"
    folder.mkdir()
    for f in checkpoints["gptq"].iterdir():
        if f.is_file() and not f.name.startswith("."):
            (folder / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(folder / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.g_idx"
    tensors[key] = torch.flip(tensors[key], [0]).contiguous()  # a permuted group order: act-order
    from safetensors.torch import save_file

    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "ov"
    result = compress(folder, KEEP, output=out, backend="openvino")
    floats = result.results["keep"].summary["stored_float"]
    assert [f["weight"] for f in floats] == ["model.layers.0.mlp.up_proj.weight"]
    assert "act-order" in floats[0]["reason"]
    np.testing.assert_allclose(_logits(out), _reference(load_decoded(folder)), atol=2e-5)


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    """GGUF files of a tiny LLaMA written by the gguf format, one per type."""
    from transformers import LlamaConfig, LlamaForCausalLM

    base = tmp_path_factory.mktemp("gguf")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=258, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         tie_word_embeddings=True)).eval()
    model.save_pretrained(base / "float")
    bpe_tokenizer().save_pretrained(base / "float")
    out = {}
    for file_type in ("q4_0", "q4_1", "q5_0"):
        out[file_type] = base / file_type
        compress(base / "float", CompressionConfig(), output=out[file_type], backend="gguf",
                 backend_options={"type": file_type})
        (out[file_type] / "qcompiler_report.json").unlink()  # a GGUF folder as users have them
        (out[file_type] / ".qcompiler-artifact").unlink(missing_ok=True)
    return out


def _gguf_reference(folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file="model.gguf", dtype=torch.float32).eval()
    return _reference(model)


@pytest.mark.parametrize("file_type, exact", [("q4_0", True), ("q4_1", False)])
def test_gguf_blocks_lowered_to_openvino(gguf_files, tmp_path, file_type, exact):
    out = tmp_path / "ov"
    result = compress(gguf_files[file_type], KEEP, output=out, backend="openvino")
    details = result.results["keep"].summary
    assert sum(details["kept"].values()) == 15  # 14 Linears + the tied embedding (q8_0 -> int8_sym g32)
    assert details["kept"]["q8_0 -> int8_sym"] == 1
    assert (details["approximate"] == []) == exact
    for a in details["approximate"]:
        assert a["rel_rms_diff"] < 2e-3
    np.testing.assert_allclose(_logits(out), _gguf_reference(gguf_files[file_type]), atol=2e-4 if exact else 3e-3)


def test_gguf_q4_1_to_onnx_takes_float_zero_points(gguf_files, tmp_path):
    out = tmp_path / "onnx"
    compress(gguf_files["q4_1"], KEEP, output=out, backend="onnx", backend_options={"accuracy_level": 1})
    np.testing.assert_allclose(_logits(out), _gguf_reference(gguf_files["q4_1"]), atol=3e-3)


def test_gguf_blocks_without_an_integer_grid_stay_float_and_kernels_that_cannot_run_a_kept_format_refuse(
        gguf_files, tmp_path):
    result = compress(gguf_files["q5_0"], KEEP, output=tmp_path / "ov", backend="openvino")
    floats = result.results["keep"].summary["stored_float"]
    assert len(floats) == 14 and all("q5_0 blocks have no 4- or 8-bit integer grid" in f["reason"] for f in floats)
    report = json.loads((tmp_path / "ov" / "qcompiler_report.json").read_text())
    assert report["passes"]["keep"]["kept"] == {"q8_0 -> int8_sym": 1}
    with pytest.raises(QCompilerError, match="int8 CPU kernel takes one scale per output channel; model.embed_tokens"):
        compress(gguf_files["q4_1"], KEEP, output=tmp_path / "torch", backend="torch")  # the tied q8_0 lm_head
    assert not (tmp_path / "torch").exists()


def test_keep_on_a_float_model_and_with_other_options_is_refused(float_folder, tmp_path):
    with pytest.raises(QCompilerError, match="this input stores none"):
        compress(float_folder, KEEP, output=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(QCompilerError, match="compresses nothing again"):
        CompressionConfig(mode=None, keep=True, ratio=0.5)


def test_cli_keep(checkpoints, tmp_path, capsys):
    from qcompiler.cli import main

    out = tmp_path / "cli"
    assert main(["compress", str(checkpoints["awq"]), "--weight-format", "keep", "-o", str(out), "--quiet"]) == 0
    assert "int4_asym, group size 32" in capsys.readouterr().out
    assert main(["compress", str(checkpoints["awq"]), "--weight-format", "keep", "--group-size", "64", "-o",
                 str(tmp_path / "x")]) == 2
    assert "drop --group-size" in capsys.readouterr().err
