"""The GGUF format: llama.cpp's type choice, the blocks the IR holds written as they are, the LLaMA
metadata and tokenizer, read back by gguf-py and by transformers' GGUF loader."""

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, quants

from conftest import WIKITEXT, tiny_tokenizer
from qcompiler.config import CompressionConfig
from qcompiler.errors import QCompilerError
from qcompiler.pipeline import compress
from qcompiler.plugins.gguf import llama, policy, read

WIDE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=2)


def bpe_tokenizer():
    """Byte-level BPE with two merges ("he", "hel"): 258 tokens (llama.cpp's gpt2 model needs merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)} | {"he": 256, "hel": 257}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("h", "e"), ("he", "l")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0], bos_token=alphabet[0])


def _folder(tmp_path_factory, name, tie, **config):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp(name) / "model"
    torch.manual_seed(0)
    shape = config or dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=258, max_position_embeddings=128, tie_word_embeddings=tie,
                                         **shape)).eval()
    model.save_pretrained(path)
    bpe_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return _folder(tmp_path_factory, "tied", True)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """256-wide rows: K-quants fit, so q4_k_m's own choices show."""
    return _folder(tmp_path_factory, "wide", False, **WIDE)


def _write(folder, tmp_path, file_type):
    out = tmp_path / file_type
    result = compress(folder, CompressionConfig(), output=out, backend="gguf", backend_options={"type": file_type})
    return out / "model.gguf", result


def _decoded_model(result):
    """The source model with every compressed weight replaced by its decoded value."""
    model = result.source.model
    decoded = {c.attrs["weight"]: c.meta["compressed"].dequantize() for c in result.graph.weight_constants()
               if "compressed" in c.meta}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in decoded:
                p.copy_(decoded[name])
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("file_type", ["q4_0", "q8_0", "q4_1"])
def test_blocks_equal_gguf_py_on_the_same_weights_and_transformers_loads_them(tied, tmp_path, file_type):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = compress(tied, CompressionConfig(mode=None)).source.model  # the float weights
    path, result = _write(tied, tmp_path, file_type)
    reader = GGUFReader(str(path))
    names = {t.name: t for t in reader.tensors}
    assert "output.weight" not in names  # tied: llama.cpp and transformers re-tie on load
    state = source.state_dict()
    config = source.config
    for t in reader.tensors:
        hf = next(k for k in state if llama.tensor_name(k)[0] == t.name)
        w = state[hf].float().numpy()
        role = llama.tensor_name(hf)[1]
        if role in ("attn_q", "attn_k"):
            w = llama.permute_rows(w, config.num_attention_heads if role == "attn_q" else config.num_key_value_heads)
        if t.tensor_type == GGMLQuantizationType.F32:
            assert np.array_equal(np.asarray(t.data).reshape(w.shape), w), t.name
        else:
            expected = quants.quantize(w, t.tensor_type)
            assert np.array_equal(np.asarray(t.data).reshape(expected.shape), expected), t.name
    # the tied embedding takes the output rule (96 % 32 == 0 and the type is not q8_0: q6_k -> q8_0 fallback)
    assert names["token_embd.weight"].tensor_type == GGMLQuantizationType.Q8_0
    assert names["blk.0.attn_q.weight"].tensor_type == GGMLQuantizationType[file_type.upper()]
    meta = read.Header(path)
    assert meta.get("general.architecture") == "llama" and meta.get("llama.block_count") == 2
    assert meta.get("llama.attention.head_count_kv") == 2 and meta.get("general.quantization_version") == 2
    assert meta.get("general.file_type") == policy.FILE_TYPES[file_type][1]
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = [5, 17, 99, 3, 250, 42, 257, 8]
    torch.testing.assert_close(_logits(loaded, ids), _logits(_decoded_model(result), ids), atol=1e-4, rtol=1e-4)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = "hello gguf, 123"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == bpe_tokenizer()(text)["input_ids"]
    assert 257 in bpe_tokenizer()(text)["input_ids"]  # "hel" merged


def test_q4_k_m_follows_llama_cpp_type_choice(wide, tmp_path):
    from transformers import AutoModelForCausalLM

    path, result = _write(wide, tmp_path, "q4_k_m")
    types = {t.name: t.tensor_type.name.lower() for t in GGUFReader(str(path)).tensors}
    n = WIDE["num_hidden_layers"]
    for i in range(n):
        more = policy.use_more_bits(i, n)
        assert types[f"blk.{i}.attn_v.weight"] == ("q6_k" if more else "q4_k")
        assert types[f"blk.{i}.ffn_down.weight"] == ("q6_k" if more else "q4_k")
        assert types[f"blk.{i}.attn_q.weight"] == types[f"blk.{i}.ffn_up.weight"] == "q4_k"
        assert types[f"blk.{i}.attn_norm.weight"] == "f32"
    assert types["output.weight"] == "q6_k" and types["token_embd.weight"] == "q4_k"
    assert [i for i in range(n) if policy.use_more_bits(i, n)] == [0, 3, 6, 7]  # n/8 = 1, 7n/8 = 7, every third
    report = json.loads((path.parent / "qcompiler_report.json").read_text())
    assert report["backend"] == "gguf"
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = [1, 2, 3, 200, 100, 50]
    torch.testing.assert_close(_logits(loaded, ids), _logits(_decoded_model(result), ids), atol=1e-4, rtol=1e-4)


def test_shape_fallbacks_of_k_quants():
    assert policy.tensor_type("q4_k_m", "attn_q", 3, 30, 576) == "q5_0"  # q4_k -> q5_0
    assert policy.tensor_type("q4_k_m", "ffn_down", 0, 30, 576) == "q8_0"  # q6_k -> q8_0
    assert policy.tensor_type("q4_k_m", "ffn_down", 3, 30, 1536) == "q4_k"
    assert policy.tensor_type("q4_k_m", "ffn_down", 0, 30, 1536) == "q6_k"
    assert policy.tensor_type("q4_k_m", "output", None, 30, 576) == "q8_0"
    assert policy.tensor_type("q4_0", "output", None, 30, 4096) == "q6_k"
    assert policy.tensor_type("q8_0", "output", None, 30, 4096) == "q8_0"
    assert policy.tensor_type("q4_0", "attn_q", 0, 30, 40) == "f16"  # no block fits


@pytest.mark.parametrize("file_type", ["f32", "f16", "bf16"])
def test_float_files(tied, tmp_path, file_type):
    from transformers import AutoModelForCausalLM

    path, result = _write(tied, tmp_path, file_type)
    types = {t.name: t.tensor_type.name.lower() for t in GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_q.weight"] == file_type and types["blk.0.attn_norm.weight"] == "f32"
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = [5, 17, 99, 3]
    tol = {"f32": 1e-5, "f16": 2e-3, "bf16": 2e-2}[file_type]
    torch.testing.assert_close(_logits(loaded, ids), _logits(result.source.model, ids), atol=tol, rtol=tol)


@pytest.mark.parametrize("config, options, message", [
    (CompressionConfig(), {}, "name the GGUF type"),
    (CompressionConfig(), {"type": "q3_k_xl"}, "unknown GGUF type 'q3_k_xl'"),
    (CompressionConfig(mode="int4_sym", group_size=64), {"type": "q4_0"}, "drop --group-size"),
    (CompressionConfig(mode="int4_sym", dataset="auto", scale_estimation=False), {"type": "q4_0"},
     "nothing reads the data"),
    (CompressionConfig(mode="int4_sym", dataset="auto", scale_estimation=True), {"type": "q4_k_m"},
     "q4_k blocks have none here"),
    (CompressionConfig(mode="int4_sym", dataset="auto", scale_estimation=True), {"type": "q5_0"}, "pick one of those"),
    (CompressionConfig(mode="int4_sym", dataset="auto", lora_correction=True), {"type": "q4_0"},
     "holds no LoRA adapters"),
    (CompressionConfig(mode="int4_sym", dataset="auto", scale_estimation=True), {"type": "q8_0"},
     "q8_0 blocks have none here"),
])
def test_bad_gguf_options_are_refused_before_any_work(tied, tmp_path, config, options, message):
    with pytest.raises(QCompilerError, match=message):
        compress(tied, config, output=tmp_path / "out", backend="gguf", backend_options=options)
    assert not (tmp_path / "out").exists()


def test_a_model_of_another_architecture_is_refused(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    with pytest.raises(QCompilerError, match="LLaMA-architecture models; this one is 'qwen2'"):
        compress(model, CompressionConfig(), output=tmp_path / "out", backend="gguf", backend_options={"type": "q8_0"})
    assert not (tmp_path / "out").exists()


def test_cli_gguf_type(tied, tmp_path, capsys):
    from qcompiler.cli import main

    out = tmp_path / "cli"
    assert main(["compress", str(tied), "--format", "gguf:q5_0", "-o", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["model.gguf",
                                                                                   "qcompiler_report.json"]
    printed = capsys.readouterr().out
    assert "q5_0" in printed and "defaults:" not in printed
    assert main(["eval", str(out), "--text", str(WIKITEXT), "--max-windows", "1", "--window", "64"]) == 0  # decoded
    assert "change" in capsys.readouterr().out  # by transformers, tokenizer from the file, against the original
    assert main(["compress", str(tied), "--format", "gguf:q4_0", "--weight-format", "int4", "-o",
                 str(tmp_path / "x")]) == 2
    assert "drop --weight-format" in capsys.readouterr().err
    assert main(["compress", str(tied), "--format", "gguf:q8_0", "--dataset", "auto", "-o", str(tmp_path / "x")]) == 2
    assert "q8_0 blocks have none here: pick one of those, or drop them" in capsys.readouterr().err
    assert main(["compress", str(tied), "--format", "gguf:q4_0", "--group-size", "32", "--dataset", "auto",
                 "--scale-estimation", "-o", str(tmp_path / "x")]) == 2
    assert "drop --group-size" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    out = tmp_path / "tuned"
    assert main(["compress", str(tied), "--format", "gguf:q4_0", "--dataset", str(WIKITEXT), "--num-samples", "4",
                 "--seqlen", "32", "--scale-estimation", "-o", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "GGUF blocks packed from the passes' codes and scales, not quantized again: q4_0 14 (exact)" in printed


def _tuned(folder, tmp_path, file_type, **config):
    out = tmp_path / f"tuned-{file_type}-{len(config)}"
    result = compress(folder, CompressionConfig(dataset=str(WIKITEXT), num_samples=4, seqlen=32, **config), output=out,
                      backend="gguf", backend_options={"type": file_type})
    return out / "model.gguf", result


@pytest.mark.parametrize("file_type, config", [
    ("q4_0", {"mode": "int4_sym", "scale_estimation": True}),
    ("q4_1", {"mode": "int4_asym", "passes": {"autoround": {"iters": 3}}}),
    ("q4_0", {"mode": "int4_sym", "gptq": True, "scale_estimation": False}),
], ids=["q4_0-scale-estimation", "q4_1-autoround", "q4_0-gptq"])
def test_data_aware_codes_are_packed_into_the_blocks(tied, tmp_path, file_type, config):
    """The passes tune the grid a block type holds; the file's blocks carry their codes and scales (not
    llama.cpp's rounding of the float weights), transformers reads back what the IR decodes to, and the
    weights outside the blocks keep llama.cpp's type and quantizer."""
    from transformers import AutoModelForCausalLM

    path, result = _tuned(tied, tmp_path, file_type, **config)
    source = compress(tied, CompressionConfig(mode=None)).source.model
    state, names = source.state_dict(), {t.name: t for t in GGUFReader(str(path)).tensors}
    consts = {c.attrs["weight"]: c for c in result.graph.weight_constants()}
    kind = GGMLQuantizationType[file_type.upper()]
    differs = 0
    for key, const in consts.items():
        name, role, layer = llama.tensor_name(key)
        t = names[name]
        if layer is None:  # the tied embedding: llama.cpp's own type and bytes
            assert t.tensor_type == GGMLQuantizationType.Q8_0
            expected = quants.quantize(state[key].float().numpy(), t.tensor_type)
            assert np.array_equal(np.asarray(t.data).reshape(expected.shape), expected)
            continue
        assert t.tensor_type == kind, name
        values = quants.dequantize(np.asarray(t.data), kind).reshape(const.meta["compressed"].shape)
        decoded = const.meta["compressed"].dequantize().numpy()
        if role in ("attn_q", "attn_k"):  # the file holds GGML's row order
            heads = source.config.num_attention_heads if role == "attn_q" else source.config.num_key_value_heads
            decoded_rows = llama.permute_rows(decoded, heads)
        else:
            decoded_rows = decoded
        tolerance = 0.0 if file_type != "q4_1" else 1e-3 * np.abs(decoded).max()
        assert np.abs(values - decoded_rows).max() <= tolerance, name
        w = state[key].float().numpy()
        differs += not np.array_equal(quants.quantize(w, kind), quants.quantize(decoded, kind))
    assert differs > 0  # the passes moved codes away from round to nearest
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = [5, 17, 99, 3, 250, 42, 257, 8]
    tol = 1e-4 if file_type != "q4_1" else 2e-2
    torch.testing.assert_close(_logits(loaded, ids), _logits(_decoded_model(result), ids), atol=tol, rtol=tol)


def test_header_reader_refuses_a_truncated_file(tied, tmp_path):
    path, _ = _write(tied, tmp_path, "q8_0")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:200])
    with pytest.raises(QCompilerError, match="truncated or corrupt"):
        read.Header(cut)
    assert read.Header(path).tensors["token_embd.weight"].shape == (258, 96)
    with pytest.raises(QCompilerError, match="has no merges"):
        from qcompiler.plugins.gguf import llama as writer_llama
        writer_llama.add_tokenizer(None, tiny_tokenizer())


def test_smollm2_q4_0_equals_gguf_py_tensor_for_tensor(smollm2_folder, tmp_path):
    """The real model (its float weights decoded from the shipped Q4_1 GGUF): every tensor of our
    q4_0 file equals gguf-py's quantization of the same weights in GGML's row order, and the
    metadata is the shipped file's (the tokenizer copied key for key)."""
    path, result = _write(smollm2_folder, tmp_path, "q4_0")
    source = read.Header(next(smollm2_folder.glob("*.gguf")))
    ours = read.Header(path)
    optional = {"general.basename", "general.finetune", "general.languages", "general.license",
                "general.organization", "general.size_label"}
    assert set(source.fields) - set(ours.fields) == optional and set(ours.fields) <= set(source.fields)
    for key, field in source.fields.items():
        if key.startswith(("tokenizer.", "llama.")):
            assert ours.fields[key] == field, key
    assert ours.get("general.file_type") == 2
    assert set(ours.tensors) == set(source.tensors)
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    shipped = np.memmap(source.path, dtype=np.uint8, mode="r")
    kinds = {}
    for name, info in ours.tensors.items():
        src = source.tensors[name]
        src_type = GGMLQuantizationType(src.type_id)
        count = int(np.prod(src.shape))
        nbytes = count * 4 if src_type == GGMLQuantizationType.F32 else \
            count // 32 * {GGMLQuantizationType.Q4_1: 20, GGMLQuantizationType.Q8_0: 34}[src_type]
        data = shipped[src.offset:src.offset + nbytes]
        floats = data.view(np.float32) if src_type == GGMLQuantizationType.F32 else quants.dequantize(data, src_type)
        floats = np.asarray(floats, dtype=np.float32).reshape(src.shape)
        kind = GGMLQuantizationType(info.type_id)
        kinds[kind.name] = kinds.get(kind.name, 0) + 1
        expected = floats if kind == GGMLQuantizationType.F32 else quants.quantize(floats, kind)
        written = raw[info.offset:info.offset + expected.nbytes].view(expected.dtype).reshape(expected.shape)
        assert np.array_equal(written, expected), name
    assert kinds == {"Q4_0": 210, "Q8_0": 1, "F32": 61}
    report = result.report
    assert report["backend"] == "gguf" and report["model_bytes"] == path.stat().st_size


def test_the_gguf_load_speedup_is_undone_after_the_load_even_on_error():
    import gguf
    from transformers import modeling_gguf_pytorch_utils as loader

    from qcompiler.plugins.torch import hf

    before = (gguf.GGUFReader, loader.load_gguf_checkpoint, gguf.get_tensor_name_map)
    with pytest.raises(RuntimeError):
        with hf._gguf_parsed_once():
            assert gguf.GGUFReader is not before[0] and loader.load_gguf_checkpoint is not before[1]
            arch = gguf.MODEL_ARCH.LLAMA
            assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)  # built once
            raise RuntimeError("a failing load")
    assert (gguf.GGUFReader, loader.load_gguf_checkpoint, gguf.get_tensor_name_map) == before


def test_a_truncated_gguf_input_is_one_line_and_writes_nothing(tied, tmp_path):
    from qcompiler.cli import main

    path, _ = _write(tied, tmp_path, "q8_0")
    folder = tmp_path / "cut"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert main(["compress", str(folder), "--weight-format", "keep", "-o", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_a_padded_vocabulary_and_biased_llamas(tmp_path_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = _folder(tmp_path_factory, "padded", True, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2)
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = 264  # the embedding has 6 rows more than the tokenizer has tokens
    (folder / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.embed_tokens.weight"] = torch.cat([tensors["model.embed_tokens.weight"], torch.zeros(6, 64)])
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    path, _ = _write(folder, tmp_path, "q8_0")
    header = read.Header(path)
    assert len(header.get("tokenizer.ggml.tokens")) == 264 and header.get("tokenizer.ggml.tokens")[-1] == "[PAD263]"
    AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    from transformers import LlamaConfig, LlamaForCausalLM

    biased = LlamaForCausalLM(LlamaConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=2, attention_bias=True)).eval()
    with pytest.raises(QCompilerError, match="attention or MLP biases"):
        compress(biased, CompressionConfig(), output=tmp_path / "b", backend="gguf", backend_options={"type": "q8_0"})
    assert not (tmp_path / "b").exists()


def test_the_header_reader_refuses_a_file_cut_anywhere(tied, tmp_path):
    path, _ = _write(tied, tmp_path, "q8_0")
    data = path.read_bytes()
    end = len(data)
    cut = tmp_path / "cut.gguf"
    for size in range(8, end, max(1, end // 60)):  # in the header, the tensor table or the tensors' bytes
        cut.write_bytes(data[:size])
        with pytest.raises(QCompilerError):
            read.Header(cut)
