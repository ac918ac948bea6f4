import re
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from qcompiler import CompressionConfig, QCompilerError, compress
from qcompiler.plugins.onnx import ONNXRunner, export
from qcompiler.plugins.torch import TorchRunner
from tests.conftest import tiny_llama

PROMPT = [5, 17, 100, 3, 99, 42]
from tests.test_openvino_backend import IDS, reference_logits


def ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


EXACT = {"accuracy_level": 0}  # float activations: the artifact computes the decoded model to rounding


@pytest.mark.parametrize("config,options,op", [
    (CompressionConfig(mode="int8_asym"), EXACT, "MatMulNBits"),
    (CompressionConfig(mode="int8_sym"), EXACT, "MatMulNBits"),
    (CompressionConfig(mode="int4_sym", group_size=32), EXACT, "MatMulNBits"),
    (CompressionConfig(mode="int4_asym", group_size=64), EXACT, "MatMulNBits"),  # K=96 adjusts to 32
    (CompressionConfig(mode="nf4", group_size=32), EXACT, "MatMulBnb4"),
    # onnxruntime fuses DequantizeLinear -> MatMul into MatMulNBits at its default accuracy level 4
    (CompressionConfig(mode="int4_asym", group_size=32), {"format": "qdq"}, "DequantizeLinear"),
    (CompressionConfig(mode="int8_sym"), {"format": "qdq"}, "DequantizeLinear"),
])
def test_artifact_computes_the_decoded_model(tmp_path, config, options, op):
    model = tiny_llama(tie=True)
    result = compress(model, config, output=tmp_path / "o", backend="onnx", backend_options=options)
    got = ONNXRunner(tmp_path / "o" / "model.onnx").logits(IDS)
    want = reference_logits(model, result)
    assert np.abs(got - want).max() < (1e-4 if options == EXACT else 2e-2) * np.abs(want).max()
    counts = ops(tmp_path / "o" / "model.onnx")
    assert counts[op] >= 14 and counts["GatherBlockQuantized"] == 1


def test_accuracy_level_4_is_the_default_and_stays_close(tmp_path):
    model = tiny_llama()
    result = compress(model, CompressionConfig(mode="int4_sym", group_size=32), output=tmp_path / "o", backend="onnx")
    nodes = [n for n in onnx.load(str(tmp_path / "o" / "model.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert {onnx.helper.get_attribute_value(a) for n in nodes for a in n.attribute if a.name == "accuracy_level"} == {4}
    got = ONNXRunner(tmp_path / "o" / "model.onnx").logits(IDS)
    want = reference_logits(model, result)
    assert np.abs(got - want).max() < 2e-2 * np.abs(want).max()  # int8 activations


def test_tied_embedding_and_lm_head_share_their_codes(tmp_path):
    compress(tiny_llama(tie=True), CompressionConfig(mode="int8_asym"), output=tmp_path / "o", backend="onnx")
    graph = onnx.load(str(tmp_path / "o" / "model.onnx")).graph
    gather = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    users = [n.op_type for n in graph.node if gather.input[0] in n.input]
    assert sorted(users) == ["GatherBlockQuantized", "MatMulNBits"]


def test_fp32_export_matches_torch_and_generates_with_the_cache(tmp_path):
    from qcompiler.generate import token_chooser

    model = tiny_llama()
    compress(model, CompressionConfig(mode=None), output=tmp_path / "f", backend="onnx")
    runner = ONNXRunner(tmp_path / "f" / "model.onnx")
    assert np.abs(runner.logits(IDS) - TorchRunner(model).logits(IDS)).max() < 1e-4
    names = [i.name for i in runner.sess.get_inputs()]
    assert names[:4] == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key"]
    prompt = torch.tensor([[5, 17, 200, 3]])
    hf = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                        use_cache=True)
    assert runner.generate(prompt[0].tolist(), 6, token_chooser()) == hf[0, 4:].tolist()


def test_large_models_are_written_with_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "TWO_GB", 1000)
    compress(tiny_llama(), CompressionConfig(mode="int4_sym", group_size=32), output=tmp_path / "o", backend="onnx")
    assert (tmp_path / "o" / "model.onnx_data").stat().st_size > (tmp_path / "o" / "model.onnx").stat().st_size
    assert ONNXRunner(tmp_path / "o" / "model.onnx").logits(IDS).shape == (1, IDS.shape[1], 256)


@pytest.mark.parametrize("config,options,message", [
    (CompressionConfig(mode="mxfp4"), {}, "mxfp4 has no onnxruntime CPU kernel"),
    (CompressionConfig(mode="nf4", group_size=32), {"format": "qdq"}, "nf4 has no standard DequantizeLinear"),
    (CompressionConfig(mode="int4_sym", group_size=32), {"format": "gptq"}, "unknown ONNX format 'gptq'"),
    (CompressionConfig(mode="int4_sym", group_size=32), {"accuracy_level": 7}, "accuracy level 7 is not 0..4"),
    (CompressionConfig(mode="int4_sym", group_size=32), {"format": "qdq", "accuracy_level": 0}, "carries no accuracy"),
])
def test_what_onnxruntime_cannot_run_is_refused_before_any_work(tmp_path, config, options, message):
    with pytest.raises(QCompilerError, match=re.escape(message)):
        compress(tiny_llama(), config, output=tmp_path / "o", backend="onnx", backend_options=options)
    assert list(tmp_path.iterdir()) == []


def test_other_backends_take_no_onnx_options(tmp_path):
    with pytest.raises(QCompilerError, match="the openvino backend takes no option format"):
        compress(tiny_llama(), CompressionConfig(), output=tmp_path / "o", backend_options={"format": "qdq"})


def test_onnxruntime_genai_generates_from_the_artifact_folder(tmp_path):
    import onnxruntime_genai as og
    from transformers import AutoModelForCausalLM

    from tests import families

    folder = families.build("llama", tmp_path / "llama")
    compress(folder, CompressionConfig(mode=None), output=tmp_path / "onnx", backend="onnx")
    model = og.Model(str(tmp_path / "onnx"))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + 16, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(PROMPT)
    while not generator.is_done():
        generator.generate_next_token()
    got = [int(t) for t in generator.get_sequence(0)][len(PROMPT):]
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert got == families.greedy(reference, PROMPT, 16)

