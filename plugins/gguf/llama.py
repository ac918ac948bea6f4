"""What a LLaMA GGUF holds besides its tensors' bytes, as llama.cpp's converter writes it.

- Tensor names: `token_embd`, `blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate,
  ffn_up, ffn_down}`, `output_norm`, and `output` only when lm_head is not tied to the embedding
  (transformers ties them when `output.weight` is absent).
- q_proj / k_proj rows go from transformers' rotate-half order to GGML's interleaved pairs:
  rows reshaped [heads, 2, head_dim / 2] and the two middle axes swapped (k with the KV heads).
  Whole rows move, so the permutation applies to quantized rows as well.
- Hyper-parameters under `llama.*` and the tokenizer under `tokenizer.ggml.*`: copied from the
  input GGUF when there is one, else converted from a transformers BPE tokenizer.
"""

from __future__ import annotations

import json
import re

import numpy as np

from qcompiler.errors import QCompilerError

ARCH = "llama"
LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
IN_LAYER = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
OUTSIDE = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}


def check_model(config) -> None:
    """The model is one this writer describes fully, else a one-line error before any work."""
    kind = getattr(config, "model_type", None)
    if kind != ARCH:
        raise QCompilerError(f"the gguf format writes LLaMA-architecture models; this one is {kind!r}: use "
                             "--format openvino, onnx or torch for it")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise QCompilerError("this LLaMA has attention or MLP biases, which transformers' GGUF loader drops on "
                             "reading the file back: the gguf writer does not write such models yet; use --format "
                             "openvino")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise QCompilerError(f"this model scales its rotary embedding ({rope.get('rope_type')}), which the gguf "
                             "writer does not describe yet (llama.cpp's rope_freqs tensor): use --format openvino")


def tensor_name(hf_name: str) -> tuple[str, str, int | None]:
    """(GGUF name, role, layer) of a transformers LLaMA tensor name."""
    if hf_name in OUTSIDE:
        gguf = OUTSIDE[hf_name]
        return gguf, gguf.rsplit(".", 1)[0], None
    m = LAYER.match(hf_name)
    if m is None or m.group(2) not in IN_LAYER:
        raise QCompilerError(f"the gguf writer has no LLaMA tensor name for {hf_name}: use --format openvino")
    role = IN_LAYER[m.group(2)]
    return f"blk.{m.group(1)}.{role}.{m.group(3)}", role, int(m.group(1))


def hf_name(gguf_name: str) -> str | None:
    """The transformers LLaMA tensor name of a GGUF one (None if it has none)."""
    for hf, gguf in OUTSIDE.items():
        if gguf == gguf_name:
            return hf
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk":
        module = next((m for m, role in IN_LAYER.items() if role == parts[2]), None)
        if module is not None:
            return f"model.layers.{parts[1]}.{module}.{parts[3]}"
    return None


def unpermute_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """GGML's q/k row order -> transformers' (the inverse of `permute_rows`)."""
    n = rows.shape[0]
    return rows.reshape(heads, n // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def permute_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """transformers' q/k row order -> GGML's (rows [out, ...], any dtype: float rows or block bytes)."""
    n = rows.shape[0]
    return rows.reshape(heads, 2, n // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def add_hparams(writer, config) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def copy_tokenizer(writer, header) -> int:
    """Copy the `tokenizer.*` keys of an input GGUF (a `read.Header`); how many."""
    from gguf import GGUFValueType

    copied = 0
    for key, field in header.fields.items():
        if key.startswith("tokenizer."):
            sub = GGUFValueType(field.sub_type) if field.sub_type is not None else None
            writer.add_key_value(key, field.value, GGUFValueType(field.type), sub_type=sub)
            copied += 1
    return copied


def add_tokenizer(writer, tokenizer, vocab_size: int = 0) -> None:
    """A transformers BPE tokenizer as llama.cpp's "gpt2" tokenizer model, padded with unused
    `[PADi]` tokens up to the model's `vocab_size` (the embedding's rows), as llama.cpp's converter does."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise QCompilerError(f"the gguf writer converts byte-level BPE tokenizers; this one is "
                             f"{model.get('type') or type(tokenizer).__name__}: start from a GGUF input, or use "
                             "--format openvino")
    vocab = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    for content, token in added.items():
        vocab[content] = token["id"]
    size = max(max(vocab.values()) + 1, vocab_size)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [5] * size  # UNUSED until a token fills the slot
    for content, i in vocab.items():
        tokens[i] = content
        types[i] = (3 if added[content].get("special") else 4) if content in added else 1
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:
        raise QCompilerError("this BPE tokenizer has no merges, and llama.cpp's gpt2 tokenizer model needs them: "
                             "start from a GGUF input, or use --format openvino")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for what, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{what}_token_id", None)
        if token_id is not None:
            add(int(token_id))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)
