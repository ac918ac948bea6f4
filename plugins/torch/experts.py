"""Mixture-of-experts layers as plain batched MatMuls, for the trace and the exporters.

transformers 5 keeps a MoE layer's experts as batched 3-D weights ([experts, out, in], or
[experts, in, out] where the family stores them transposed) and, by default, runs only the experts
each token was routed to, found with `histc` / `nonzero` and read by indexing: the trace cannot
see those reads as weight-bearing ops (the weights would stay float) and OpenVINO's and the ONNX
exporters cannot convert the data-dependent loop. transformers lets a model pick its experts'
implementation (`set_experts_implementation`); `dense_experts` is one more, with the same result:
every expert runs on every token, and each token's sum is weighted by its routing weights, zero for
the experts it was not routed to. It is written with MatMuls on the batched weights (transposed
as a MatMul reads them), so the trace sees each expert weight as a MatMul's weight with its input
channels on the last axis (compressed per expert, per output channel and group), and the
exporters convert it to MatMul, Multiply and ReduceSum (the op sequence optimum-intel exports; the
OpenVINO CPU plugin of this version does not fuse it into its MoE kernel). It computes experts /
top-k times the routed work and holds experts x tokens x hidden activations: the calibration engine
and generation with the torch model keep transformers' own implementation; `dense_experts(model)`
switches a model to this one inside a `with` block only (tracing, exporting).
"""

from __future__ import annotations

import contextlib

import torch

NAME = "qcompiler_dense"


def _dense_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor) -> torch.Tensor:
    first = self.gate_up_proj if self.has_gate else self.up_proj
    experts, tokens = first.shape[0], hidden_states.shape[0]
    routing = torch.zeros(tokens, experts, dtype=hidden_states.dtype, device=hidden_states.device)
    routing = routing.scatter(1, top_k_index, top_k_weights.to(hidden_states.dtype))  # [tokens, experts]
    x = hidden_states.repeat(experts, 1).view(experts, tokens, hidden_states.shape[-1])
    h = torch.bmm(x, first if self.is_transposed else first.transpose(1, 2))  # [experts, tokens, out]
    if self.has_bias:
        h = h + (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias)[:, None, :]
    h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
    out = torch.bmm(h, self.down_proj if self.is_transposed else self.down_proj.transpose(1, 2))
    if self.has_bias:
        out = out + self.down_proj_bias[:, None, :]
    if getattr(self, "has_post_expert_norm", False):
        out = self.post_expert_norm(out)
    weights = routing.transpose(0, 1).view(experts, tokens, -1)[..., None]
    out = out.view(experts, tokens, -1, out.shape[-1])
    out = torch.where(weights != 0, out * weights, 0.0)  # an unrouted expert's inf or NaN must not reach the sum
    return out.sum(dim=0).view(tokens, -1).to(hidden_states.dtype)


def has_experts(model: torch.nn.Module) -> bool:
    """Whether `model` has experts transformers dispatches through its experts interface."""
    return hasattr(model, "set_experts_implementation") and hasattr(getattr(model, "config", None),
                                                                    "_experts_implementation")


@contextlib.contextmanager
def dense_experts(model: torch.nn.Module):
    """Inside the block, `model`'s experts run as `_dense_forward` (see the module docstring)."""
    if not has_experts(model):
        yield
        return
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if NAME not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(NAME, _dense_forward)
    before = (model.get_experts_implementation() if hasattr(model, "get_experts_implementation")
              else model.config._experts_implementation)  # per sub-model where transformers has them
    model.set_experts_implementation(NAME)
    try:
        yield
    finally:
        model.set_experts_implementation(before)
