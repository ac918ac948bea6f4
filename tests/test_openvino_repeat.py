"""OpenVINO graphs built from four converted blocks repeated (plugins/openvino/repeat.py).

The repeated graph must compute exactly what converting every block computes: same inputs and
outputs in the same order, same logits and present cache from a random past; families whose blocks
differ are never repeated (no Repeat offered, or the block check refuses and every block is
converted); and a compressed artifact is byte for byte the one the full conversion gives.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from qcompiler import CompressionConfig, compress
from qcompiler.plugins.openvino.repeat import repeated
from qcompiler.plugins.openvino.stateful import convert_stateful
from qcompiler.plugins.torch import TorchFrontend, repeat
from tests import families

LAYERS = 6
# family -> whether its blocks are repeated (gpt2: the converter folds Conv1D's W.T into new constants,
# so blocks 1 and 2 read different unnamed weights and the check refuses)
EXPECTED = {"llama": True, "qwen3": True, "phi3": True, "falcon": True, "mistral": True, "qwen3_moe": True,
            "gpt2": False}


def _model(family: str, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in {**families.COMMON, **families.FAMILIES[family], "num_hidden_layers": LAYERS,
                                **extra}.items() if v is not None}
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **fields)).eval()


def _outputs(ov_model, past_len: int = 3, seq: int = 5) -> dict[str, np.ndarray]:
    import openvino as ov

    compiled = ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(3, 250, (1, seq)), "attention_mask": np.ones((1, seq + past_len), np.int64),
            "position_ids": np.arange(past_len, past_len + seq)[None]}
    for port in ov_model.inputs[3:]:
        shape = port.get_partial_shape()
        feed[port.get_any_name()] = rng.standard_normal(
            [1, shape[1].get_length(), past_len, shape[3].get_length()]).astype(np.float32)
    result = compiled(feed)
    return {port.get_any_name(): result[port] for port in compiled.outputs}


@pytest.mark.parametrize("family", list(EXPECTED))
def test_repeated_blocks_compute_what_every_block_converted_does(family):
    spec = TorchFrontend().load(_model(family)).export_spec()
    assert spec.repeat().layers == LAYERS
    assert (repeated(spec.repeat, family) is not None) == EXPECTED[family]
    built = convert_stateful(spec, family, stateful=False)
    spec.repeat = None
    full = convert_stateful(spec, family, stateful=False)
    assert [p.get_any_name() for p in built.inputs] == [p.get_any_name() for p in full.inputs]
    names = [n for op in built.get_ops() if op.get_type_name() != "Result" for o in op.outputs() for n in o.get_names()]
    assert len(names) == len(set(names))  # runtimes and NNCF find outputs by tensor name
    got, want = _outputs(built), _outputs(full)
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-5, err_msg=name)


def test_blocks_of_different_kinds_are_not_offered():
    """Gemma 3 alternates sliding and full attention: its layer_types differ, no Repeat."""
    assert TorchFrontend().load(_model("gemma3_text")).export_spec().repeat() is None
    model = _model("llama")
    model.model.layers[4].self_attn.scaling = 0.5  # one block's plain attribute differs
    assert TorchFrontend().load(model).export_spec().repeat() is None


def test_traced_copy_leaves_the_model_alone():
    model = _model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = TorchFrontend().load(model).export_spec()
    assert len(spec.repeat().spec.module.model.model.layers) == repeat.TRACED
    assert len(model.model.layers) == LAYERS and model.config.num_hidden_layers == LAYERS
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("config", [CompressionConfig(mode="int4_sym", group_size=32, awq=True),
                                    CompressionConfig(mode="int8_asym")], ids=["int4_awq", "int8"])
def test_compressed_artifact_is_the_full_conversions(config, tmp_path, monkeypatch):
    """From a lazily loaded folder (placeholders for the large weights), with AWQ scaling the norms
    (rewritten small parameters, which the traced copy holds as markers): the same compressed
    constants (codes, scales, zero points) and the same logits as when every block is converted.
    (The .bin is not byte-equal: the repeated blocks share the converter's small shape constants.)"""
    import openvino as ov

    from qcompiler.plugins.openvino import OpenVINOBackend
    from qcompiler.plugins.torch import lazy
    from tests.conftest import tiny_tokenizer

    folder = tmp_path / "model"
    _model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    monkeypatch.setattr(lazy, "MIN_PLACEHOLDER", 1)
    compress(folder, config, output=tmp_path / "repeated", backend="openvino")
    monkeypatch.setattr(repeat, "MIN_LAYERS", LAYERS + 1)
    compress(folder, config, output=tmp_path / "full", backend="openvino")

    def compressed(out: str) -> list:
        model = ov.Core().read_model(tmp_path / out / "openvino_model.xml")
        return sorted((str(n.get_output_element_type(0)), tuple(n.get_output_shape(0)),
                       hashlib.sha1(n.get_data().tobytes()).hexdigest()) for n in model.get_ops()
                      if n.get_type_name() == "Constant" and (n.get_output_element_type(0).bitwidth in (4, 8)
                                                              or n.get_output_element_type(0) == ov.Type.f16))

    assert compressed("repeated") == compressed("full") and len(compressed("full")) > 4 * LAYERS
    ids = np.array([[5, 17, 100, 3, 99, 42]])
    logits = [OpenVINOBackend().runner(tmp_path / out).logits(ids) for out in ("repeated", "full")]
    np.testing.assert_array_equal(logits[0], logits[1])


def test_repeated_model_outlives_its_source():
    """The repeated blocks' constants share the torch tensors' memory and hold them: the OpenVINO model
    still computes the same after the torch model is gone (NNCF's benchmark drops it)."""
    import gc

    model = _model("llama")
    spec = TorchFrontend().load(model).export_spec()
    built = repeated(spec.repeat, "llama")
    want = _outputs(built)
    del model, spec
    gc.collect()
    junk = [torch.randn(1 << 20) for _ in range(16)]  # reuse the freed memory
    got = _outputs(built)
    del junk
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
