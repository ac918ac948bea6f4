"""Running a transformers causal LM in torch for evaluation and generation: what the backends whose
artifacts load back as transformers models (torch int kernels, decoded checkpoints) share."""

from __future__ import annotations

import numpy as np
import torch


class TransformersRunner:
    """`Runner` over a transformers causal LM: logits of whole sequences, and greedy or sampled
    generation with the model's KV cache."""

    def __init__(self, model) -> None:
        self.model = model

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))
        with torch.no_grad():
            return self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float().numpy()

    def generate(self, input_ids: list[int], max_new_tokens: int, next_token, eos_token_id=None) -> list[int]:
        ids, cache, new = list(input_ids), None, torch.tensor([input_ids])
        with torch.no_grad():
            for _ in range(max_new_tokens):
                out = self.model(input_ids=new, attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                ids.append(next_token(out.logits[0, -1].float().numpy()))
                if ids[-1] == eos_token_id:
                    break
                new = torch.tensor([[ids[-1]]])
        return ids[len(input_ids):]
