"""A transformers causal LM with its KV cache as plain tensors, for exporters that trace it.

`KVCacheForward(model)(input_ids, attention_mask, position_ids, *past)` returns
`(logits, *present)`, where past and present are, per layer, keys then values
[batch, kv_heads, length, head_dim]: the layout of optimum's exports (OpenVINO and ONNX).
"""

from __future__ import annotations

import torch

PAST_LEN = 2  # the example's past length; exporters declare every varying dimension dynamic


class KVCacheForward(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i, layer in enumerate(cache.layers):
            # seed each layer with the past directly: its lazy initialization starts from an empty
            # rank-1 tensor that exporters cannot concatenate on axis -2
            layer.lazy_initialization(past[2 * i], past[2 * i + 1])
            layer.keys, layer.values = past[2 * i], past[2 * i + 1]
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def kv_geometry(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a transformers config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, config.num_key_value_heads, head_dim


def example(config) -> tuple[torch.Tensor, ...]:
    """Inputs for tracing: two new tokens after PAST_LEN cached ones."""
    layers, kv_heads, head_dim = kv_geometry(config)
    past = [torch.zeros(1, kv_heads, PAST_LEN, head_dim) for _ in range(2 * layers)]
    return (torch.tensor([[1, 2]]), torch.ones(1, PAST_LEN + 2, dtype=torch.long),
            torch.tensor([[PAST_LEN, PAST_LEN + 1]]), *past)


def io_names(config) -> tuple[list[str], list[str]]:
    """Names of the past inputs and present outputs, in optimum's spelling."""
    layers = config.num_hidden_layers
    past = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    return past, present
