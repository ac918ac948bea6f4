"""The codes an already-quantized input stores, for `--weight-format keep`: {weight name:
CompressedWeight, or a string saying why that weight's codes cannot be kept}.

- GGUF: each tensor of a GGML type qcompiler holds (q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q6_k)
  becomes a `BlockWeight` with the file's bytes, named as transformers names the tensor; q_proj and
  k_proj rows go back from GGML's interleaved order to transformers' (the inverse of the writer's
  permutation). Tensors of other quantized types are listed with the reason (transformers decoded
  them to float; they stay float). Float tensors (norms, f16/f32 weights) hold no codes.
- Checkpoints (GPTQ, AWQ, auto_round, compressed-tensors): the codes `checkpoints.read` decoded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qcompiler import ggml
from qcompiler.config import Mode
from qcompiler.errors import QCompilerError
from qcompiler.quant import BlockWeight

def gguf_weights(path: Path, model) -> dict:
    from qcompiler.plugins.gguf import llama, read

    header = read.Header(path)
    config = model.config
    state = model.state_dict()
    aliases: dict[int, list[str]] = {}
    for key, t in state.items():
        aliases.setdefault(t.data_ptr(), []).append(key)
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    out: dict = {}
    for name, info in header.tensors.items():
        kind = ggml.BY_ID.get(info.type_id)
        if len(info.shape) != 2 or (kind is not None and kind.float):
            continue  # norms, float weights: no codes
        hf = llama.hf_name(name)
        if hf is None or hf not in state:
            raise QCompilerError(f"{path.name}: tensor {name} has no LLaMA weight of this model to go to: "
                                 "--weight-format keep reads LLaMA-architecture GGUF files; re-quantize instead "
                                 "(--weight-format int4)")
        names = aliases[state[hf].data_ptr()]
        if kind is None:
            for n in names:
                out[n] = f"GGML type {info.type_id} is not one qcompiler holds (decoded to float by transformers)"
            continue
        rows, row = info.shape
        data = np.array(raw[info.offset:info.offset + rows * row // kind.block * kind.size]).reshape(rows, -1)
        role = llama.tensor_name(hf)[1]
        if role in ("attn_q", "attn_k"):
            heads = config.num_attention_heads if role == "attn_q" else (
                getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
            data = llama.unpermute_rows(data, heads)
        codes = torch.from_numpy(np.ascontiguousarray(data)).reshape(rows, row // kind.block, kind.size)
        cw = BlockWeight(Mode(kind.name), kind.block, codes, torch.empty(0), None, (rows, row), False)
        for n in names:
            out[n] = cw
    header.close()
    return out
