"""Checkpoint formats (gptq, gptq_v2, awq, auto_round, compressed-tensors): written from the IR's codes
without quantizing again, decoded back to the same codes, and refused where a format cannot hold a mode."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_llama, tiny_tokenizer
from qcompiler.config import CompressionConfig
from qcompiler.errors import QCompilerError
from qcompiler.pipeline import compress
from qcompiler.plugins.checkpoints import layouts
from qcompiler.plugins.checkpoints.read import load_decoded
from qcompiler.registry import build_registry

CASES = [("gptq", "int4_sym"), ("gptq_v2", "int4_asym"), ("gptq", "int3_sym"),
         ("gptq_v2", "int2_asym"), ("gptq", "int8_sym"), ("awq", "int4_asym"), ("awq", "int4_sym"),
         ("auto_round", "int4_sym"), ("auto_round", "int4_asym"), ("auto_round", "int2_sym"),
         ("compressed-tensors", "int4_sym"), ("compressed-tensors", "int4_asym"), ("compressed-tensors", "int3_asym")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    model = tiny_llama(tie=True)
    with torch.no_grad():  # one q_proj row all positive: its asymmetric zero point is 0 (GPTQ v1 cannot store it)
        model.model.layers[1].self_attn.q_proj.weight[3].abs_()
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _compress(folder, mode, fmt, tmp_path, group=32, **config):
    result = compress(folder, CompressionConfig(mode=mode, group_size=group, **config))
    codes = {c.attrs["weight"]: c.meta["compressed"] for c in result.graph.weight_constants()
             if "compressed" in c.meta}
    reference = {name: cw.dequantize() for name, cw in codes.items()}
    out = tmp_path / fmt
    result.save(out, backend=fmt)
    return out, codes, reference, result


@pytest.mark.parametrize("fmt,mode", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_checkpoint_holds_the_ir_codes_bit_for_bit(folder, tmp_path, fmt, mode):
    out, codes, reference, _ = _compress(folder, mode, fmt, tmp_path, group=-1 if mode.startswith("int8") else 32)
    backend = build_registry().backend(fmt)
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    assert q["qcompiler_format"] == fmt and backend.can_load(out)
    tensors = load_file(str(out / "model.safetensors"))
    layout = backend.layout(codes["model.layers.0.mlp.down_proj.weight"].mode)
    quantized = 0
    for name, cw in codes.items():
        path = name[: -len(".weight")]
        if name in tensors:  # the tied embedding (int8 backup, or int8 itself): float, its decoded values
            assert not any(k.startswith(path + ".q") or k.startswith(path + ".weight_p") for k in tensors)
            stored = tensors[name].float()
            assert torch.allclose(stored, reference[name], rtol=1e-3, atol=1e-6)
            continue
        suffixes = ("qweight", "qzeros", "scales", "g_idx", "weight_packed", "weight_scale", "weight_zero_point")
        parts = {s: tensors[f"{path}.{s}"] for s in suffixes if f"{path}.{s}" in tensors}
        n, k = cw.matrix_shape
        u, z, s = layouts.decode(layout, parts, cw.mode.bits, n, k, cw.mode.asymmetric)
        eu, ez, es = layouts.parts(cw)
        assert np.array_equal(u, eu) and np.array_equal(z, ez) and np.array_equal(s, es.astype(np.float32)), name
        assert torch.equal(torch.from_numpy(layouts.dequantize(u, z, s)), reference[name].float())
        quantized += 1
    assert quantized == 14  # 7 Linears per block, 2 blocks; the tied lm_head stays with the embedding
    if fmt in ("gptq", "gptq_v2"):
        assert q["format"] == fmt and q["bits"] == int(mode[3]) and q["sym"] == mode.endswith("_sym")
        assert json.loads((out / "quantize_config.json").read_text()) == q
        g = 192 if mode.startswith("int8") else 32
        assert tensors["model.layers.0.mlp.down_proj.g_idx"].tolist() == [i // g for i in range(192)]
    if fmt == "auto_round":
        assert q["packing_format"] == ("auto_round:auto_awq" if mode == "int4_asym" else "auto_round:auto_gptq")
    if fmt == "compressed-tensors":
        weights = q["config_groups"]["group_0"]["weights"]
        assert weights["num_bits"] == int(mode[3]) and weights["symmetric"] == mode.endswith("_sym")
        assert q["ignore"] == ["lm_head"]
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32  # the model's own dtype
    assert out.joinpath("tokenizer.json").is_file()


@pytest.mark.parametrize("fmt", ["gptq_v2", "compressed-tensors"])
def test_decoded_checkpoint_computes_what_the_ir_computes(folder, tmp_path, fmt):
    """The checkpoint decoded by `layouts` alone gives the logits of the float model with the IR's
    decoded weights (the torch model the frontend loaded, every compressed weight replaced)."""
    out, codes, reference, result = _compress(folder, "int4_asym", fmt, tmp_path)
    model = load_decoded(out)
    expected = tiny_llama(tie=True)
    state = dict(expected.named_parameters())
    with torch.no_grad():
        state["model.layers.1.self_attn.q_proj.weight"][3].abs_()
        for name, value in reference.items():
            state[name].copy_(value)
    ids = torch.tensor([[5, 17, 80, 3, 200, 9, 41]])
    with torch.no_grad():
        got = model(input_ids=ids).logits
        want = expected(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()


def test_gptq_v1_refuses_a_zero_point_of_zero(folder, tmp_path):
    with pytest.raises(QCompilerError, match="zero point of 0, which GPTQ v1 cannot store.*gptq_v2"):
        _compress(folder, "int4_asym", "gptq", tmp_path)
    assert not (tmp_path / "gptq").exists()


@pytest.mark.parametrize("fmt,mode,group,message", [
    ("gptq", "nf4", 32, "gptq format cannot store nf4"),
    ("awq", "int3_sym", 32, "awq format cannot store int3_sym"),
    ("awq", "int4_asym", -1, "awq stores groups"),
    ("auto_round", "int2_asym", 32, "auto_round format cannot store int2_asym"),
    ("compressed-tensors", "mxfp4", 32, "cannot store mxfp4"),
    ("gptq", None, None, "fp32 compresses none"),
])
def test_a_mode_the_format_cannot_hold_is_refused_before_any_work(folder, tmp_path, fmt, mode, group, message):
    with pytest.raises(QCompilerError, match=message):
        compress(folder, CompressionConfig(mode=mode, group_size=group), output=tmp_path / "out", backend=fmt)
    assert not (tmp_path / "out").exists()


def test_cli_format_writes_a_checkpoint_and_contradicting_backend_is_refused(folder, tmp_path, capsys):
    from qcompiler.cli import main

    out = tmp_path / "ct"
    assert main(["compress", str(folder), "--weight-format", "int4", "--sym", "--group-size", "32",
                 "--format", "compressed-tensors", "-o", str(out), "--quiet"]) == 0
    assert "stored in float with their decoded values" in capsys.readouterr().out
    report = json.loads((out / "qcompiler_report.json").read_text())
    assert report["backend"] == "compressed-tensors"
    assert [r["weight"] for r in report["stored_float"]] == ["model.embed_tokens.weight"]
    assert main(["compress", str(folder), "--format", "gptq", "--backend", "onnx", "-o", str(tmp_path / "x")]) == 2
    assert "--format gptq contradicts --backend onnx" in capsys.readouterr().err
