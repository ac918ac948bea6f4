"""Encoders (BERT-like): their example inputs and export signature, in optimum's names (the task a
model is for: `qcompiler.tasks.task_of`).

An encoder's export takes `input_ids`, `attention_mask` (and `token_type_ids`
where the model has them), batch and sequence dynamic, and returns `last_hidden_state` or `logits`,
the layout optimum-intel's OVModelForFeatureExtraction / OVModelForSequenceClassification and
optimum's ORTModel classes read.
"""

from __future__ import annotations

import inspect

import torch

from qcompiler.protocols import ExportSpec
from qcompiler.tasks import OUTPUTS

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def input_names(model: torch.nn.Module, tokenizer=None) -> list[str]:
    """The encoder inputs its forward takes, in optimum's order; `token_type_ids` only where the
    tokenizer produces them (or, without a tokenizer, where the config has token types)."""
    params = inspect.signature(model.forward).parameters
    names = [n for n in INPUTS if n in params]
    if "token_type_ids" in names:
        produced = getattr(tokenizer, "model_input_names", None)
        if (produced is not None and "token_type_ids" not in produced) or (
                produced is None and not getattr(getattr(model, "config", None), "type_vocab_size", 0)):
            names.remove("token_type_ids")
    return names


def example_inputs(model: torch.nn.Module, tokenizer=None, seq_len: int = 8) -> dict[str, torch.Tensor]:
    """Two sequences, the second padded at its end, so a trace takes the attention mask's path
    (transformers drops an all-ones mask before attention, and a trace would then ignore it)."""
    ids = torch.arange(1, 2 * seq_len + 1, dtype=torch.long).reshape(2, seq_len) % 100 + 100
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    values = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return {n: values[n] for n in input_names(model, tokenizer)}


class EncoderForward(torch.nn.Module):
    """The model with a positional signature and one output tensor, for exporters."""

    def __init__(self, model: torch.nn.Module, names: list[str], output: str) -> None:
        super().__init__()
        self.model, self.names, self.output = model, list(names), output

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        out = self.model(**{n: given[n] for n in self.names})
        return out[self.output] if not isinstance(out, torch.Tensor) else out


def export_spec(model: torch.nn.Module, example: dict[str, torch.Tensor], task: str) -> ExportSpec:
    names = list(example)
    output = OUTPUTS[task]
    dynamic = {n: {0: "batch_size", 1: "sequence_length"} for n in names}
    dynamic[output] = {0: "batch_size", 1: "sequence_length"} if output == "last_hidden_state" else {0: "batch_size"}
    return ExportSpec(EncoderForward(model, names, output), tuple(example.values()), names, [output], dynamic,
                      weight_prefix="model.")
