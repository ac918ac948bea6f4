"""A transformers causal LM with its KV cache as plain tensors, for exporters that trace it.

`KVCacheForward(model)(input_ids, attention_mask, position_ids, *past)` returns
`(logits, *present)`, where past and present are, per cache layer, keys then values
[batch, kv_heads, length, head_dim]: the layout of optimum's exports (OpenVINO and ONNX).

The layout is read from the model itself (`cache_layout`: one short forward with a cache), not
from config fields, so models without `num_key_value_heads` (GPT-2, OPT, BLOOM, Falcon, GPT-NeoX),
multi-query heads and keys and values of different widths (DeepSeek's MLA) need nothing written
per family. Every layer keeps its whole past, sliding-window ones included: transformers builds
their sliding masks from the attention mask and positions, so the result is the same while the
exported graph stays free of the data-dependent trimming a sliding cache does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from qcompiler.plugins.torch.experts import dense_experts
from qcompiler.protocols import ExportSpec

PAST_LEN = 2  # the example's past length; exporters declare every varying dimension dynamic


@dataclass(frozen=True)
class CacheLayout:
    """Per cache layer, the (kv_heads, head_dim) of its keys and of its values."""

    keys: tuple[tuple[int, int], ...]
    values: tuple[tuple[int, int], ...]

    @property
    def layers(self) -> int:
        return len(self.keys)

    def past_shapes(self) -> list[tuple[int, int]]:
        """(heads, head_dim) of each past input, in input order (layer 0 keys, layer 0 values, ...)."""
        return [shape for pair in zip(self.keys, self.values) for shape in pair]


def cache_layout(model: torch.nn.Module) -> CacheLayout:
    """The KV-cache layout `model` builds, read from one forward of two tokens."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2]]), use_cache=True)
    cache = getattr(out, "past_key_values", None)
    layers = getattr(cache, "layers", None)
    if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
        from qcompiler.errors import QCompilerError

        raise QCompilerError(f"{type(model).__name__} keeps no key/value cache qcompiler can export (cache: "
                             f"{type(cache).__name__}): use --backend torch for this model")
    keys = tuple((int(layer.keys.shape[1]), int(layer.keys.shape[-1])) for layer in layers)
    values = tuple((int(layer.values.shape[1]), int(layer.values.shape[-1])) for layer in layers)
    return CacheLayout(keys, values)


class KVCacheForward(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, layout: CacheLayout) -> None:
        super().__init__()
        self.model, self.layout = model, layout

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        # one full layer per cache layer (no config: no sliding layers), seeded with the past directly:
        # a layer's lazy initialization starts from an empty rank-1 tensor exporters cannot concatenate
        cache = DynamicCache(ddp_cache_data=[(None, None)] * self.layout.layers)
        for i, layer in enumerate(cache.layers):
            layer.lazy_initialization(past[2 * i], past[2 * i + 1])
            layer.keys, layer.values = past[2 * i], past[2 * i + 1]
        with dense_experts(self.model):  # MoE experts as MatMuls, which exporters convert (experts.py)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def export_spec(model: torch.nn.Module, repeat: bool = True, block_path: str | None = None) -> ExportSpec:
    """The causal LM's export signature in optimum's layout: input_ids, attention_mask, position_ids
    and the past cache in; logits and the present cache out; with `repeat`, its alike blocks (see
    repeat.py), when it has them."""
    from qcompiler.plugins.torch.repeat import repeat_spec

    layout = cache_layout(model)
    past, present = io_names(layout)
    dynamic = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
               "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    dynamic.update({n: {0: "batch", 2: "past"} for n in past})
    dynamic.update({n: {0: "batch", 2: "total"} for n in present})
    return ExportSpec(KVCacheForward(model, layout), example(layout), ["input_ids", "attention_mask", "position_ids",
                      *past], ["logits", *present], dynamic, list(zip(past, present)), layout.past_shapes(), "model.",
                      model_info(model),
                      functools.partial(repeat_spec, model, "model.", block_path) if repeat else None)


def model_info(model: torch.nn.Module) -> dict:
    """What a runtime's config file needs, read from the transformers config (text part)."""
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    generation = getattr(model, "generation_config", None)

    def first(*names, default=None):
        for holder in (generation, config):
            for name in names:
                value = getattr(holder, name, None) if holder is not None else None
                if value is not None:
                    return value
        return default

    return {"model_type": config.model_type, "vocab_size": config.vocab_size,
            "hidden_size": first("hidden_size", "n_embd", "d_model"),
            "num_attention_heads": first("num_attention_heads", "n_head", "n_heads"),
            "context_length": first("max_position_embeddings", "n_positions", "seq_length", default=2048),
            "bos_token_id": first("bos_token_id"), "eos_token_id": first("eos_token_id"),
            "pad_token_id": first("pad_token_id", "eos_token_id")}


def example(layout: CacheLayout) -> tuple[torch.Tensor, ...]:
    """Inputs for tracing: two new tokens after PAST_LEN cached ones."""
    past = [torch.zeros(1, heads, PAST_LEN, dim) for heads, dim in layout.past_shapes()]
    return (torch.tensor([[1, 2]]), torch.ones(1, PAST_LEN + 2, dtype=torch.long),
            torch.tensor([[PAST_LEN, PAST_LEN + 1]]), *past)


def io_names(layout: CacheLayout) -> tuple[list[str], list[str]]:
    """Names of the past inputs and present outputs, in optimum's spelling."""
    past = [f"past_key_values.{i}.{kind}" for i in range(layout.layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(layout.layers) for kind in ("key", "value")]
    return past, present
