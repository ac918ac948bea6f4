import re

import numpy as np
import pytest
import torch

from qcompiler import CompressionConfig, QCompilerError, compress
from qcompiler.plugins.torch_kernels import load_model
from qcompiler.plugins.torch_kernels.modules import Int4Linear, Int8Linear
from tests.conftest import tiny_llama
from tests.test_openvino_backend import IDS, reference_logits


@pytest.mark.parametrize("config,cls", [
    (CompressionConfig(mode="int4_sym", group_size=32), Int4Linear),
    (CompressionConfig(mode="int4_asym", group_size=32), Int4Linear),
    (CompressionConfig(mode="int8_sym"), Int8Linear),
    (CompressionConfig(mode="int8_asym"), Int8Linear),
])
def test_int_kernels_compute_the_decoded_model(tmp_path, config, cls):
    model = tiny_llama()
    result = compress(model, config, output=tmp_path / "pt", backend="torch")
    loaded = load_model(tmp_path / "pt")
    layers = [m for m in loaded.modules() if isinstance(m, cls)]
    assert len(layers) == (14 if cls is Int4Linear else 15)  # int8 also takes lm_head
    with torch.no_grad():
        got = loaded(input_ids=torch.from_numpy(IDS)).logits.numpy()
    want = reference_logits(model, result)
    assert np.abs(got - want).max() < 2e-2 * np.abs(want).max()  # bf16 activations


def test_generate_keeps_working_with_the_kv_cache(tmp_path):
    from qcompiler.generate import token_chooser
    from qcompiler.plugins.torch_kernels import TorchKernelsRunner

    compress(tiny_llama(tie=True), CompressionConfig(mode="int4_sym", group_size=32), output=tmp_path / "pt",
             backend="torch")
    loaded = load_model(tmp_path / "pt")
    prompt = torch.tensor([[5, 17, 200, 3]])
    hf = loaded.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    ours = TorchKernelsRunner(loaded).generate(prompt[0].tolist(), 6, token_chooser())
    assert hf[0, 4:].tolist() == ours


@pytest.mark.parametrize("config,message", [
    (CompressionConfig(mode="nf4", group_size=32), "torch has no CPU kernel for nf4"),
    (CompressionConfig(mode="int4_sym", group_size=16), "takes groups of (32, 64, 128, 256)"),
])
def test_modes_without_a_kernel_are_refused(tmp_path, config, message):
    with pytest.raises(QCompilerError, match=re.escape(message)):
        compress(tiny_llama(), config, output=tmp_path / "pt", backend="torch")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signed", [True, False])
def test_4bit_codes_are_stored_two_per_byte(signed):
    from qcompiler.plugins.torch_kernels import pack_nibbles, unpack_nibbles

    low, high = (-8, 8) if signed else (0, 16)
    codes = torch.randint(low, high, (3, 5, 7), dtype=torch.int8 if signed else torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == (codes.numel() + 1) // 2
    assert torch.equal(unpack_nibbles(packed, tuple(codes.shape), signed), codes)


def test_int4_artifact_is_smaller_than_int8(tmp_path):
    model = tiny_llama()
    for name, config in (("int8", CompressionConfig(mode="int8_sym")),
                         ("int4", CompressionConfig(mode="int4_sym", group_size=32, backup_mode="int8_sym"))):
        compress(model, config, output=tmp_path / name, backend="torch")
    size = {name: (tmp_path / name / "model.safetensors").stat().st_size for name in ("int8", "int4")}
    assert size["int4"] < 0.75 * size["int8"]
