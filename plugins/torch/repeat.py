"""Alike transformer blocks, offered to exporters as a few traced blocks to repeat (`protocols.Repeat`).

A model qualifies when every block is the same program on different weights: transformers' own
module classes (never remote code, whose forward may branch on `layer_idx`), the same module
types, parameter names, shapes and dtypes, the same buffers, the same attributes (all but
`layer_idx`: values compared recursively, objects by identity), no hooks, and a config with no
per-layer list whose entries differ (`layer_types`, ...), so a family that alternates sliding and
full attention, or mixes dense and MoE blocks, never does. The exporter checks the rest on the
graph it gets (the second and third traced blocks must match node for node) and falls back to
tracing every block when anything differs.

The traced copy shares the model's large weights and modules' code; only its first `traced` blocks
are kept (config, ModuleList and the copied modules' parameter and buffer tables are its own, so
nothing of the model changes), and their small parameters are replaced by distinct marker values
the exporter swaps for the real ones.
"""

from __future__ import annotations

import copy
import enum
import functools
import hashlib

import torch

from qcompiler.protocols import Repeat

MIN_LAYERS = 6  # fewer blocks: tracing them all costs less than checking
TRACED = 4  # blocks 1 and 2 are compared; block 2 is repeated; 0 and 3 differ at the graph's ends
SMALL = 1 << 16  # parameters below this many elements get marker values (the large ones keep names)
PLAIN = (int, float, str, bool, type(None))


def repeat_spec(model: torch.nn.Module, prefix: str, block_path: str | None = None) -> Repeat | None:
    """The `Repeat` of a causal LM whose blocks are alike, or None. `prefix` is what the export module
    (kvcache.KVCacheForward) puts before the model's parameter names; `block_path` the model spec's
    path of the blocks, if it gives one."""
    from qcompiler.errors import QCompilerError
    from qcompiler.plugins.torch.blocks import find_blocks
    from qcompiler.plugins.torch.kvcache import export_spec

    try:
        path, blocks = find_blocks(model, block_path)
    except QCompilerError:
        return None
    if len(blocks) < MIN_LAYERS or not _alike(blocks, model.config):
        return None
    truncated, markers = _traced_copy(model, path, blocks)
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))

    def tensor(name: str) -> torch.Tensor:
        return tensors[name[len(prefix):]].detach()

    return Repeat(export_spec(truncated, repeat=False), TRACED, len(blocks), prefix + path, tensor,
                  {digest: prefix + name for digest, name in markers.items()})


def _alike(blocks: torch.nn.ModuleList, config) -> bool:
    for value in vars(config).values():  # layer_types, mlp_only_layers as flags, ...: one kind for all
        if isinstance(value, (list, tuple)) and len(value) == len(blocks) and len({repr(v) for v in value}) > 1:
            return False
    first = _signature(blocks[0])
    return first is not None and all(_signature(b) == first for b in blocks[1:])


def _signature(block: torch.nn.Module):
    out = []
    for name, module in block.named_modules():
        if module._forward_hooks or module._forward_pre_hooks or not type(module).__module__.startswith(
                ("transformers.", "torch.", "qcompiler.")):
            return None
        attrs = sorted((k, _key(v)) for k, v in vars(module).items()
                       if not k.startswith("_") and k not in ("layer_idx", "training"))
        params = [(k, tuple(p.shape), p.dtype) for k, p in module._parameters.items() if p is not None]
        buffers = [(k, tuple(b.shape), b.dtype, _digest(b)) for k, b in module._buffers.items() if b is not None]
        out.append((name, type(module).__qualname__, attrs, params, buffers))
    return out


def _key(value):
    """What an attribute's value is, for comparing blocks: plain values and containers by value,
    tensors by content, functions and classes by name, any other object by identity (the config,
    shared by every block, is equal; a per-block object is not)."""
    if isinstance(value, PLAIN):
        return value
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((repr(k), _key(v)) for k, v in value.items())))
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype), _digest(value))
    if isinstance(value, (torch.dtype, torch.device, enum.Enum)):
        return repr(value)
    if isinstance(value, functools.partial):
        return ("partial", _key(value.func), _key(value.args), _key(value.keywords))
    if isinstance(value, type) or callable(value) and hasattr(value, "__qualname__"):
        return ("callable", getattr(value, "__module__", None), value.__qualname__)
    return ("object", id(value))


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha1(tensor.detach().float().contiguous().numpy().tobytes()).hexdigest()


def _traced_copy(model: torch.nn.Module, path: str, blocks) -> tuple[torch.nn.Module, dict[str, str]]:
    """A shallow copy of `model` with its first TRACED blocks, their small parameters replaced by
    markers; and {digest of a marker: its parameter name in the model}."""
    config = copy.copy(model.config)
    config.num_hidden_layers = TRACED
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types[:TRACED])
    generator = torch.Generator().manual_seed(0)
    markers: dict[str, str] = {}
    kept = torch.nn.ModuleList()
    configs = {id(model.config): config}  # modules holding the model's config get the copy's
    for i, block in enumerate(list(blocks)[:TRACED]):
        kept.append(_marked(block, f"{path}.{i}", generator, markers, configs))
    root = _with_config(model, configs)
    parent, parts = root, path.split(".")
    for part in parts[:-1]:
        child = _with_config(parent._modules[part], configs)
        parent._modules[part] = child
        parent = child
    parent._modules[parts[-1]] = kept
    return root, markers


def _with_config(module: torch.nn.Module, configs: dict) -> torch.nn.Module:
    new = copy.copy(module)
    new._modules = dict(module._modules)
    new._buffers = dict(module._buffers)  # a buffer registered while tracing stays in the copy
    new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    if id(vars(module).get("config")) in configs:
        new.config = configs[id(module.config)]
    return new


def _marked(module: torch.nn.Module, name: str, generator, markers: dict, configs: dict) -> torch.nn.Module:
    new = _with_config(module, configs)
    new._parameters = dict(module._parameters)
    for key, param in module._parameters.items():
        if param is None or param.numel() >= SMALL or not param.dtype.is_floating_point:
            continue
        while True:  # 0.5-1.5: harmless as a norm's scale while tracing
            values = (torch.rand(param.shape, generator=generator) + 0.5).to(param.dtype)
            digest = _digest(values)
            if digest not in markers:
                break
        markers[digest] = f"{name}.{key}"
        new._parameters[key] = torch.nn.Parameter(values, requires_grad=False)
    new._modules = {k: (_marked(m, f"{name}.{k}", generator, markers, configs) if m is not None else None)
                    for k, m in module._modules.items()}
    return new
