"""Tiny random causal LMs of every family transformers builds, for the per-family tests.

Each model is built from its family's transformers config with small sizes (2 layers, hidden 64,
vocabulary 256 with the byte-level tokenizer of conftest), nothing downloaded. `FAMILIES` maps a
`model_type` to the config fields it needs beyond `COMMON`; `UNSUPPORTED` says, per family and
backend, which one-line refusal a user gets instead of an artifact, and why.
"""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, max_position_embeddings=128, head_dim=16, bos_token_id=1, eos_token_id=2,
              pad_token_id=0)
MOE = dict(num_experts_per_tok=2)
FAMILIES: dict[str, dict] = {
    "llama": {}, "mistral": dict(sliding_window=4), "qwen2": {}, "qwen3": {}, "phi": {}, "phi3": {},
    "gpt_neox": {}, "gptj": dict(n_inner=128, rotary_dim=8), "opt": dict(ffn_dim=128, word_embed_proj_dim=64),
    "bloom": {}, "falcon": dict(new_decoder_architecture=False, multi_query=True, head_dim=None),
    "starcoder2": {}, "stablelm": {}, "gemma": {}, "gemma2": dict(sliding_window=4),
    "gemma3_text": dict(sliding_window=4), "olmo": {}, "olmo2": {}, "granite": {}, "cohere": {},
    "gpt_bigcode": dict(n_inner=128), "codegen": dict(n_inner=128, rotary_dim=8), "gpt2": dict(n_inner=128),
    "mixtral": dict(num_local_experts=4, **MOE), "qwen2_moe": dict(num_experts=4, moe_intermediate_size=64,
                                                                   shared_expert_intermediate_size=64, **MOE),
    "qwen3_moe": dict(num_experts=4, moe_intermediate_size=64, **MOE),
    "gpt_oss": dict(num_local_experts=4, **MOE),
}

MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss")
# (family, backend, weight format) -> the refusal's words, for what does not work yet and says so
UNSUPPORTED: dict[tuple[str, str, str], str] = {}
for _family in MOE_FAMILIES:  # torch's int kernels are 2-D Linears: the batched experts have none
    UNSUPPORTED[(_family, "torch", "int8")] = "no int kernel for batched mixture-of-experts weights"
UNSUPPORTED[("cohere", "onnx", "fp32")] = "export cannot convert"  # torch's TorchScript ONNX exporter fails on it


# AWQ patterns per family (2 layers): (matches, why). NNCF also matches an activation -> MatMul
# (Act_MatMul, Act_Mul_MatMul) with an atomic activation (ReLU, Swish, ...; not GELU), scaling
# through a Multiply it inserts; qcompiler's backends cannot lower an inserted Multiply yet (#10).
_GATED = (2, "gated MLP: up_proj -> Multiply(act(gate)) -> down_proj")
_GELU = (0, "fc -> GELU -> fc: no Multiply, and NNCF's patterns skip GELU too")
AWQ_MATCHES: dict[str, tuple[int, str]] = {
    **{f: _GATED for f in ("llama", "mistral", "qwen2", "qwen3", "stablelm", "gemma", "gemma2", "gemma3_text",
                           "olmo", "olmo2", "granite", "cohere")},
    **{f: _GELU for f in ("phi", "gpt_neox", "gptj", "bloom", "falcon", "starcoder2", "gpt_bigcode", "codegen",
                          "gpt2")},
    "phi3": (2, "fused gate_up_proj split in two: the scale folds into its up half (NNCF inserts a Multiply)"),
    "opt": (2, "fc1 -> ReLU -> fc2: the scale folds into fc1's rows and bias (NNCF inserts a Multiply)"),
    "qwen2_moe": (2, "the shared expert's gated MLP (the routed experts' gate and up are one batched weight)"),
    **{f: (0, "the experts' gate and up are one batched weight whose output is split: no MatMul -> Multiply -> "
              "MatMul") for f in ("mixtral", "qwen3_moe", "gpt_oss")},
}


def build(model_type: str, folder: Path) -> Path:
    """Save a tiny random `model_type` model with the byte-level tokenizer into `folder`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.conftest import tiny_tokenizer

    fields = {k: v for k, v in {**COMMON, **FAMILIES[model_type]}.items() if v is not None}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields))
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def greedy(model, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens from the float transformers model, each from the whole sequence (no cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]
