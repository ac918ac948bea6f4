"""The ONNX and OpenVINO frontends: existing models in, the same codes as the torch frontend out."""

import re

import numpy as np
import onnx
import pytest
import torch

from qcompiler import CompressionConfig, QCompilerError, compress
from qcompiler.generate import token_chooser
from qcompiler.plugins.onnx import ONNXRunner
from qcompiler.plugins.openvino import OpenVINORunner
from qcompiler.quant import compressed_by_content
from tests.conftest import tiny_llama
from tests.test_openvino_backend import IDS

CONFIGS = [
    CompressionConfig(mode="int4_asym", group_size=32, ratio=0.8, awq=True),
    CompressionConfig(mode="int8_sym"),
    CompressionConfig(mode="nf4", group_size=32, all_layers=True),
]
FILES = {"openvino": "openvino_model.xml", "onnx": "model.onnx"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny LLaMA (tied embedding), and its float OpenVINO and ONNX exports with a KV cache."""
    model = tiny_llama(tie=True)
    root = tmp_path_factory.mktemp("exported")
    for backend, name in FILES.items():
        compress(model, CompressionConfig(mode=None), output=root / backend, backend=backend)
    return model, {backend: root / backend / name for backend, name in FILES.items()}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.mode.value)
@pytest.mark.parametrize("frontend", FILES)
def test_codes_are_bit_identical_to_the_torch_frontend(exported, tmp_path, frontend, config):
    model, files = exported
    if frontend == "onnx" and config.all_layers:  # nf4 embeddings have no onnxruntime kernel
        config = config.replace(all_layers=False)
    want = compressed_by_content(compress(model, config).graph)
    got = compressed_by_content(compress(files[frontend], config, output=tmp_path / "o").graph)
    assert want.keys() == got.keys()
    for key, cw in want.items():
        other = got[key]
        assert (cw is None) == (other is None)
        if cw is not None:
            assert cw.mode == other.mode and cw.group_size == other.group_size
            assert torch.equal(cw.codes, other.codes) and torch.equal(cw.scale, other.scale)
            assert (cw.zero_point is None and other.zero_point is None) or torch.equal(cw.zero_point, other.zero_point)


def test_onnx_model_keeps_its_interface_and_generates(exported, tmp_path):
    model, files = exported
    compress(files["onnx"], CompressionConfig(mode="int4_sym", group_size=32), output=tmp_path / "o")
    before, after = onnx.load(str(files["onnx"])).graph, onnx.load(str(tmp_path / "o" / "model.onnx")).graph
    assert [i.name for i in before.input] == [i.name for i in after.input]
    assert [o.name for o in before.output] == [o.name for o in after.output]
    assert sum(n.op_type == "MatMulNBits" for n in after.node) == 15  # 14 in 4 bits, lm_head in 8
    runner = ONNXRunner(tmp_path / "o" / "model.onnx")
    ids = runner.generate([5, 17, 200], 4, token_chooser())
    assert len(ids) == 4 and np.isfinite(runner.logits(IDS)).all()


def test_openvino_model_keeps_its_state_and_generates(exported, tmp_path):
    import openvino as ov

    model, files = exported
    compress(files["openvino"], CompressionConfig(mode="int4_sym", group_size=32), output=tmp_path / "o")
    before = ov.Core().read_model(str(files["openvino"]))
    after = ov.Core().read_model(str(tmp_path / "o" / "openvino_model.xml"))
    assert [p.get_any_name() for p in before.inputs] == [p.get_any_name() for p in after.inputs]
    assert len(after.get_sinks()) == len(before.get_sinks()) == 4  # 2 layers x keys, values
    # 14 int4 weights in 8 constants: q/k/v and gate/up each fused into one
    assert sum(op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i4 for op in after.get_ops()) == 8
    fp32, int4 = OpenVINORunner(files["openvino"]), OpenVINORunner(tmp_path / "o" / "openvino_model.xml")
    assert len(int4.generate([5, 17, 200], 4, token_chooser())) == 4
    assert np.abs(fp32.logits(IDS) - int4.logits(IDS)).max() < 0.2 * np.abs(fp32.logits(IDS)).max()


def test_the_default_backend_is_the_input_format(exported, tmp_path):
    _, files = exported
    result = compress(files["onnx"], CompressionConfig(mode="int8_asym"), output=tmp_path / "o")
    assert result.report["backend"] == "onnx"


def test_an_onnx_model_cannot_go_to_openvino(exported, tmp_path):
    _, files = exported
    with pytest.raises(QCompilerError, match="use --backend onnx for an ONNX model"):
        compress(files["onnx"], CompressionConfig(mode="int8_asym"), output=tmp_path / "o", backend="openvino")
    assert list(tmp_path.iterdir()) == []


def _corrupt(path, how):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3] if how == "truncated" else b"\x08\x07garbage" + data[50:200])


@pytest.mark.parametrize("how", ["truncated", "garbage"])
@pytest.mark.parametrize("frontend,victim,message", [
    ("onnx", "model.onnx", "cannot read the ONNX model"),
    ("openvino", "openvino_model.xml", "cannot read the OpenVINO model"),
    ("openvino", "openvino_model.bin", "cannot read the OpenVINO model"),
])
def test_corrupt_models_are_one_line_errors(exported, tmp_path, frontend, victim, message, how):
    import shutil

    shutil.copytree(exported[1][frontend].parent, tmp_path / "m")
    _corrupt(tmp_path / "m" / victim, how)
    with pytest.raises(QCompilerError, match=message):
        compress(tmp_path / "m" / FILES[frontend], CompressionConfig(), output=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_missing_bin_is_named(exported, tmp_path):
    import shutil

    shutil.copy(exported[1]["openvino"], tmp_path / "m.xml")
    with pytest.raises(QCompilerError, match=re.escape("m.bin is missing")):
        compress(tmp_path / "m.xml", CompressionConfig(), output=tmp_path / "o")


def test_onnx_model_without_matmul_weights_is_refused(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph), str(tmp_path / "relu.onnx"))
    with pytest.raises(QCompilerError, match="has no MatMul with a constant float weight"):
        compress(tmp_path / "relu.onnx", CompressionConfig(), output=tmp_path / "o")
    assert not (tmp_path / "o").exists()
