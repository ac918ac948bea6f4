"""Weights left on disk until a pass needs them (plugins/torch/lazy.py): the OpenVINO artifact of a
safetensors folder is the one the eagerly loaded model gives, bit for bit."""

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qcompiler import CompressionConfig, compress
from qcompiler.config import LoadOptions
from qcompiler.plugins.torch import TorchFrontend, lazy
from tests.conftest import tiny_llama


@pytest.fixture(autouse=True)
def every_matrix_lazy(monkeypatch):
    monkeypatch.setattr(lazy, "MIN_PLACEHOLDER", 1)  # the tiny model's matrices are below the real threshold

CONFIGS = {
    "int4_sym": CompressionConfig(mode="int4_sym", group_size=32),
    "int4_ratio_awq": CompressionConfig(mode="int4_asym", group_size=32, ratio=0.6, awq=True),
    "int8": CompressionConfig(mode="int8_asym"),
    "fp32": CompressionConfig(mode=None),
    "backup_none": CompressionConfig(mode="int4_sym", group_size=32, backup_mode="none"),
}


def _bin(folder):
    return (folder / "openvino_model.bin").read_bytes()


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_lazy_artifact_equals_the_eager_one(tmp_path, name, tie):
    model = tiny_llama(tie=tie)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    lazy = compress(folder, CONFIGS[name], output=tmp_path / "lazy", backend="openvino")
    assert lazy.graph.placeholders, "the folder was not loaded lazily"
    eager = compress(tiny_llama(tie=tie), CONFIGS[name], output=tmp_path / "eager", backend="openvino")
    assert not eager.graph.placeholders
    assert _bin(tmp_path / "lazy") == _bin(tmp_path / "eager")
    a, b = (json.loads((tmp_path / d / "qcompiler_report.json").read_text()) for d in ("lazy", "eager"))
    assert a["table"] == b["table"] and a["parameters"] == b["parameters"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["int4_sym", "int4_ratio_awq", "int8"])
def test_a_half_precision_folder_gives_the_artifact_of_its_float32_copy(tmp_path, name, dtype):
    """Round to nearest reads a bf16 / f16 checkpoint's weights as stored (half the bytes) and
    widens them in the kernel: the artifact is the eagerly loaded float32 model's, bit for bit."""
    model = tiny_llama()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype))  # values a half checkpoint holds; the rotary buffer stays float32, as loaded
    folder = tmp_path / "model"
    copy.deepcopy(model).to(dtype).save_pretrained(folder)
    lazy = compress(folder, CONFIGS[name], output=tmp_path / "lazy", backend="openvino")
    assert lazy.graph.placeholders and lazy.graph.stored_source is not None
    compress(model, CONFIGS[name], output=tmp_path / "eager", backend="openvino")
    assert _bin(tmp_path / "lazy") == _bin(tmp_path / "eager")


def test_placeholders_stay_unread_and_values_come_from_the_files(tmp_path):
    model = tiny_llama()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    frontend = TorchFrontend()
    source = frontend.load(folder, options=LoadOptions(lazy_weights=True))
    graph = frontend.trace(source)
    q = next(c for c in graph.weight_constants() if c.attrs["weight"].endswith("layers.0.self_attn.q_proj.weight"))
    assert q.attrs["weight"] in graph.placeholders
    assert torch.equal(graph.weight(q), model.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(graph.stored_weight(q), graph.weight(q))  # a float32 file: the same values
    held = graph.tensor(q).view(-1)
    assert held[1:].abs().sum() == 0  # a zero placeholder (its first element marks it distinct)
    norm = dict(source.model.named_parameters())["model.norm.weight"]
    assert torch.equal(norm, model.model.norm.weight)  # small parameters are real


def test_a_folder_the_lazy_path_does_not_read_exactly_loads_eagerly(tmp_path):
    """bf16 files are read lazily (converted to float32 per weight); integer tensors send the whole
    folder the eager way."""
    model = tiny_llama()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tensors = {k: v for k, v in model.state_dict().items()}
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(folder / "model.safetensors"))
    source = TorchFrontend().load(folder, options=LoadOptions(lazy_weights=True))
    assert source.lazy is not None
    save_file({**tensors, "extra.int_table": torch.zeros(4, dtype=torch.int64)}, str(folder / "model.safetensors"))
    source = TorchFrontend().load(folder, options=LoadOptions(lazy_weights=True))
    assert source.lazy is None and np.isfinite(source.model.lm_head.weight.detach().numpy()).all()


def test_a_lazily_written_model_cannot_be_written_again_silently(tmp_path):
    """Its codes were packed into the OpenVINO model and dropped, its placeholders hold zeros: a second
    artifact would be wrong, so it is refused with the fix."""
    folder = tmp_path / "model"
    tiny_llama().save_pretrained(folder)
    result = compress(folder, CONFIGS["int4_sym"], output=tmp_path / "ov", backend="openvino")
    for backend in ("torch", "openvino"):
        with pytest.raises(Exception, match="compress again"):
            result.save(tmp_path / f"again-{backend}", backend=backend)
        assert not (tmp_path / f"again-{backend}").exists()


def _save(folder, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))


def test_a_tied_weight_stored_twice_with_different_values_loads_eagerly(tmp_path):
    """transformers unties such a checkpoint; the lazy path would tie it, so it steps aside."""
    model = tiny_llama(tie=True)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tensors = dict(model.state_dict())
    tensors["lm_head.weight"] = torch.randn_like(tensors["model.embed_tokens.weight"])
    _save(folder, tensors)
    source = TorchFrontend().load(folder, options=LoadOptions(lazy_weights=True))
    eager = TorchFrontend().load(folder)
    assert source.lazy is None
    assert torch.equal(source.model.lm_head.weight, eager.model.lm_head.weight)


def test_only_the_files_transformers_reads_are_read(tmp_path):
    model = tiny_llama()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    stale = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    save_file(stale, str(folder / "zz-stale-copy.safetensors"))
    source = TorchFrontend().load(folder, options=LoadOptions(lazy_weights=True))
    graph = TorchFrontend().trace(source)
    q = next(c for c in graph.weight_constants() if c.attrs["weight"].endswith("layers.0.self_attn.q_proj.weight"))
    assert torch.equal(graph.weight(q), model.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(graph.stored_weight(q), graph.weight(q))  # a float32 file: the same values
    assert torch.equal(dict(source.model.named_parameters())["model.norm.weight"], model.model.norm.weight)


def test_a_non_persistent_buffer_is_computed_not_read(tmp_path):
    model = tiny_llama()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tensors = dict(model.state_dict())
    tensors["model.rotary_emb.inv_freq"] = model.model.rotary_emb.inv_freq + 1.0  # a stray copy in the file
    _save(folder, tensors)
    source = TorchFrontend().load(folder, options=LoadOptions(lazy_weights=True))
    assert source.lazy is not None
    assert torch.equal(source.model.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)


def test_a_placeholder_also_read_by_another_op_gets_its_values(tmp_path):
    """An exporter would fold `W * 2` from the placeholder's zeros into a constant qcompiler never
    replaces: such a weight is read into memory before any export."""
    from qcompiler.plugins.torch import TorchSource

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(300, 64)

        def forward(self, ids):
            h = self.emb(ids)
            return h @ (self.emb.weight * 2).T

    real = Head()
    save_file({"emb.weight": real.emb.weight.detach().clone()}, str(tmp_path / "model.safetensors"))
    reader = lazy.SafetensorsReader(tmp_path)
    held = Head()
    held.emb.weight = torch.nn.Parameter(lazy._zeros((300, 64)), requires_grad=False)
    source = TorchSource(held, None, {"ids": torch.tensor([[1, 2, 3]])}, lazy=({"emb.weight": "emb.weight"}, reader))
    graph = TorchFrontend().trace(source)
    assert not graph.placeholders
    assert torch.equal(held.emb.weight, real.emb.weight)


def test_stored_reads_map_the_file_or_read_what_cannot_be_mapped(tmp_path):
    """`read_stored` gives each tensor in its file dtype: mapped where its offset suits the dtype, read
    otherwise (an f32 tensor after an odd number of f16 values, which safetensors' own writer never
    lays out, another writer may), equal to safetensors' own load."""
    import struct

    from safetensors.torch import load_file

    tensors = {"a": torch.randn(3).half(), "b": torch.randn(40, 50), "c": torch.randn(64, 33).to(torch.bfloat16)}
    names = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16"}
    header, data = {}, b""
    for key, t in tensors.items():  # in this order, unaligned
        raw = t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + data)
    reader = lazy.SafetensorsReader(tmp_path)
    assert reader.entries["b"][3] % 4 == 2  # the f32 tensor cannot be viewed in place
    expected = load_file(str(tmp_path / "model.safetensors"))
    for key in tensors:
        got = reader.read_stored(key)
        assert got.dtype == expected[key].dtype and torch.equal(got, expected[key])
        assert torch.equal(reader.read(key), expected[key].float())


def test_placeholders_cost_no_memory_when_marked_and_read():
    """Placeholders are zero pages: their marker write costs one small page, reading them (huge zero
    pages where the kernel has transparent huge pages) costs nothing resident."""
    def rss_anon() -> int:
        status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
        return int(status["RssAnon"].split()[0]) * 1024

    before = rss_anon()
    held = [lazy._zeros((1024, 2048)) for _ in range(20)]  # 8 MB each, 160 MB in all
    for i, t in enumerate(held):
        t.view(-1)[0] = float(i + 1)
    assert sum(float(t.sum()) for t in held) == sum(range(1, 21))
    assert rss_anon() - before < 16 << 20  # a huge page per marker would be 40 MB
