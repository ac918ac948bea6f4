"""Which GGML type each tensor gets: llama.cpp's choice (`src/llama-quant.cpp`) for the file types
qcompiler writes.

- A file type names a default type (q4_k_m: q4_k). The output projection, or the token embedding
  when it doubles as the output (tied), takes q8_0 when its rows do not divide into the default
  type's blocks, else q6_k (unless the default is q8_0).
- q4_k_m: attn_v and ffn_down take q6_k in the layers `use_more_bits` picks (the first and last
  eighth, and every third in between).
- A type whose block does not divide a row falls back: q4_k -> q5_0, q6_k -> q8_0 (then f16).
- 1-D tensors (norms, biases) stay f32; f16 / bf16 / f32 files store every 2-D weight in that type.
"""

from __future__ import annotations

from qcompiler import ggml

FILE_TYPES = {  # name -> (default tensor type, general.file_type as llama.cpp numbers it)
    "f32": ("f32", 0), "f16": ("f16", 1), "bf16": ("bf16", 32), "q8_0": ("q8_0", 7), "q4_0": ("q4_0", 2),
    "q4_1": ("q4_1", 3), "q5_0": ("q5_0", 8), "q5_1": ("q5_1", 9), "q4_k_m": ("q4_k", 15),
    "q6_k": ("q6_k", 18),
}
FALLBACK = {"q4_k": "q5_0", "q6_k": "q8_0"}


def use_more_bits(layer: int, layers: int) -> bool:
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def tensor_type(file_type: str, role: str, layer: int | None, layers: int, row: int) -> str:
    """The type of one 2-D weight: `role` is its GGUF tensor name without block and suffix
    ("attn_v", "ffn_down", "output", "token_embd", ...; "output" also for a tied embedding), `row` its
    row length (the input features)."""
    base = FILE_TYPES[file_type][0]
    chosen = base
    if ggml.TYPES[base].float:
        return base
    if role == "output":
        chosen = "q8_0" if row % ggml.TYPES[base].block else base if base == "q8_0" else "q6_k"
    elif file_type == "q4_k_m" and role in ("attn_v", "ffn_down") and use_more_bits(layer, layers):
        chosen = "q6_k"
    while chosen in FALLBACK and row % ggml.TYPES[chosen].block:
        chosen = FALLBACK[chosen]
    if row % ggml.TYPES[chosen].block:
        chosen = "f16"
    return chosen
