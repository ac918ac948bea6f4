"""The torch frontend's side of the calibration engine: run a transformers model block by block.

The blocks are the children of the model's largest `nn.ModuleList` of same-typed modules (the
decoder layers, whatever the family calls them), or the list its model spec names; nothing here is
per-architecture. The first
block's inputs (hidden states and keyword arguments: masks, rotary tables) are captured by a
pre-hook that stops the forward there; each block then runs on its own, with `functional_call`
replacing weights (AWQ-scaled or dequantized ones) and forward pre-hooks on the modules that own
the tapped weights handing their inputs to the engine.

On a CPU with bf16 matrix units (AMX, AVX512-BF16) the blocks run under bf16 autocast: the
MatMuls five times faster, the statistics still reduced in float32 (the taps see what each
MatMul reads, before autocast rounds it). `QCOMPILER_CALIBRATION_FP32=1` keeps float32.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch.utils._pytree import tree_flatten

from qcompiler import memory
from qcompiler.engine import Block, native_bf16
from qcompiler.errors import QCompilerError


class _Stop(Exception):
    pass


def find_blocks(model: torch.nn.Module, path: str | None = None) -> tuple[str, torch.nn.ModuleList]:
    """(path, list) of the ModuleList of same-typed modules holding the most parameters (with as many
    entries as the config's layers, where it says, so an MoE layer's experts are never taken); or the
    list at `path`, which a model spec gives."""
    if path is not None:
        try:
            found = model.get_submodule(path)
        except AttributeError:
            found = None
        if not isinstance(found, torch.nn.ModuleList) or len(found) == 0:
            raise QCompilerError(f"the model spec's block path {path!r} is not a list of modules of "
                                 f"{type(model).__name__}: fix the spec's plugin (or uninstall it)")
        return path, found
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best, best_size = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1 or (isinstance(layers, int) and len(module) != layers):
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = (name, module), size
    if best is None:
        raise QCompilerError(f"{type(model).__name__} has no list of transformer blocks, so the calibration engine "
                             "cannot run it block by block: drop the data-aware options (--dataset, --awq with "
                             "data, --scale-estimation, --gptq, --sensitivity-metric)")
    return best


class TorchBlockExecutor:
    """`BlockExecutor` for a transformers causal LM or encoder (see `qcompiler.protocols`)."""

    def __init__(self, model: torch.nn.Module, weight_names: list[str], tokenizer=None,
                 block_path: str | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.path, self.layers = find_blocks(model, block_path)
        names = set(weight_names)
        self.blocks = []
        for i in range(len(self.layers)):
            prefix = f"{self.path}.{i}."
            self.blocks.append(Block(f"{self.path}.{i}", [n for n in weight_names if n.startswith(prefix)]))
        self.outside = sorted(names - {n for b in self.blocks for n in b.weights})
        self.modules = dict(model.named_modules())
        self._head = _final_norm(model, self.path, self.modules)  # (norm module, lm_head name) or None
        self.head_weights = []  # the IR name of lm_head's weight (a tied one is named after the embedding)
        if self._head is not None:
            weight = getattr(self.modules[self._head[1]], "weight", None)
            self.head_weights = [n for n, p in model.named_parameters(remove_duplicate=False)
                                 if p is weight and n in names][:1]
        self._probe = None  # one sample, to check that norm(last block's output) is what lm_head reads
        self.bf16 = native_bf16() and next(model.parameters()).dtype == torch.float32
        self.attention_taps = True  # `<module>#query` / `#key`: what a module hands to scaled_dot_product_attention
        # how statistics are computed, for the statistics cache's key
        self.method = {"executor": "torch-blocks-1", "bf16_autocast": self.bf16, "batch_tokens": BATCH_TOKENS}

    def _forward(self, ids: torch.Tensor):
        """The model on one batch of token ids, unpadded (an encoder's forward takes no cache argument)."""
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                  "position_ids": torch.arange(ids.shape[1])[None], "use_cache": False}
        params = inspect.signature(self.model.forward).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            kwargs = {k: v for k, v in kwargs.items() if k in params}
        return self.model(**kwargs)

    def _precision(self):
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def first_inputs(self, samples: list[torch.Tensor]) -> list[tuple[tuple, dict]]:
        """The first block's inputs per sample, batched (see `_batched`). Each layer's own arguments
        (masks and rotary tables differ per layer in sliding-window and hybrid families) are recorded
        once per sequence length, from one forward that stops at the last layer."""
        captured, self.contexts = [], {}

        def first(module, args, kwargs):
            captured.append((args, kwargs))
            if _length(args, kwargs) in self.contexts:  # this length's layer arguments are known: stop here
                raise _Stop

        def record(index):
            def hook(module, args, kwargs):
                self.contexts.setdefault(_length(args, kwargs), {})[index] = (args[1:], _without_hidden(kwargs))
                if index == len(self.layers) - 1:
                    raise _Stop
            return hook

        self._probe = samples[0].reshape(1, -1) if samples else None
        handles = [self.layers[0].register_forward_pre_hook(first, with_kwargs=True)]
        handles += [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(self.layers)]
        try:
            with torch.no_grad(), self._precision():
                for ids in samples:
                    ids = ids.reshape(1, -1)
                    try:
                        self._forward(ids)
                    except _Stop:
                        pass
        finally:
            for h in handles:
                h.remove()
        if len(captured) != len(samples):
            raise QCompilerError(f"{type(self.model).__name__}'s forward did not reach its first block "
                                 f"({self.path}.0): this model cannot be calibrated block by block")
        return _batched(captured, self.contexts)

    def run(self, block: Block, inputs, weights: dict[str, torch.Tensor], taps: dict,
            grad: bool = False) -> list[tuple[tuple, dict]]:
        """See `BlockExecutor.run`; with `grad`, autograd records the run (weights that require grad get
        gradients from a loss on `hidden(outputs)`)."""
        index = self.blocks.index(block)
        layer = self.layers[index]
        prefix = block.name + "."
        params = {name[len(prefix):]: value for name, value in weights.items()}
        handles, attention = [], {}
        for name, tap in taps.items():
            if "#" in name:  # an attention module's query / key (`qcompiler.engine.attention_tap`)
                path, which = name.split("#", 1)
                attention.setdefault(path, {})[which] = tap
                continue
            owner = self.modules[name.rsplit(".", 1)[0]]
            handles.append(owner.register_forward_pre_hook(_input_tap(tap), with_kwargs=True))
        handles += _attention_hooks(self.modules, attention)
        outputs = []
        # with grad, only the weights given (tuned by the pass) take gradients: the block's own parameters
        # (norms) do not, which also spares the backward pass the input gradients of the first MatMuls
        frozen = [p for p in layer.parameters() if p.requires_grad] if grad else []
        for p in frozen:
            p.requires_grad_(False)
        try:
            with torch.set_grad_enabled(grad), self._precision():
                for args, kwargs in inputs:
                    hidden = args[0] if args else kwargs["hidden_states"]
                    rest, own = self.contexts[_length(args, kwargs)][index]  # this layer's own masks and tables
                    if args:
                        call_args, call_kwargs = (hidden, *rest), own
                    else:
                        call_args, call_kwargs = (), {**own, "hidden_states": hidden}
                    out = torch.func.functional_call(layer, params, call_args, call_kwargs, strict=False)
                    out = out[0] if isinstance(out, (tuple, list)) else out
                    outputs.append(((out, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": out}))
        finally:
            for h in handles:
                h.remove()
            for p in frozen:
                p.requires_grad_(True)
        return outputs

    def release(self, block: Block) -> None:
        """See `BlockExecutor.release`: the layer's parameters that a file backs (a memory-mapped
        safetensors file) leave the resident set; they are read back from the file if touched again."""
        layer = self.layers[self.blocks.index(block)]
        memory.page_out([(p.data_ptr(), p.numel() * p.element_size()) for p in layer.parameters()])

    def head(self, inputs, taps: dict) -> str:
        """The input of the output layer (lm_head) for the last block's outputs `inputs`: the final norm
        applied to them, passed to `taps[name]`. Returns "" when done, else why not: the final norm is
        found as the one norm module beside the blocks, and checked on one sample against what lm_head
        reads in the model's own forward (a model that scales or mixes the hidden state there is refused)."""
        if self._head is None or not self.head_weights:
            return "no single final norm module found before the output layer"
        norm, lm_head = self._head
        if self._probe is not None:  # on the float model's own forward: `inputs` may come from compressed blocks
            seen, last = [], []
            handles = [self.modules[lm_head].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach())),
                       self.layers[-1].register_forward_hook(lambda m, args, out: last.append(
                           (out[0] if isinstance(out, (tuple, list)) else out).detach()))]
            try:
                with torch.no_grad(), self._precision():
                    self._forward(self._probe)
                    mine = norm(last[0]).float() if last else None
            finally:
                for h in handles:
                    h.remove()
            if mine is None or not seen or seen[0].shape != mine.shape or not torch.allclose(
                    seen[0].float(), mine, rtol=2e-2, atol=2e-2):
                return f"the output layer {lm_head} does not read {type(norm).__name__}(last block's output)"
            self._probe = None
        with torch.no_grad(), self._precision():
            for hidden in self.hidden(inputs):
                x = norm(hidden)
                for tap in taps.values():
                    tap(x)
        return ""

    def hidden(self, inputs) -> list[torch.Tensor]:
        """The hidden states [batch, seq, hidden] of each entry of `inputs` (a block's inputs or outputs)."""
        return [args[0] if args else kwargs["hidden_states"] for args, kwargs in inputs]

    def select(self, inputs, indices: list[int]):
        """The entries for samples `indices` (in that order) of `inputs`, batched again."""
        singles = []
        for args, kwargs in inputs:
            hidden = args[0] if args else kwargs["hidden_states"]
            for row in range(hidden.shape[0]):
                one = hidden[row:row + 1]
                singles.append(((one, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": one}))
        return [(args, kwargs) for args, kwargs in _batched([singles[i] for i in indices], self.contexts,
                                                            limit=len(indices))]

    def generate(self, num_samples: int, seqlen: int, seed: int) -> list[torch.Tensor]:
        """Text the model writes from random one-token prefixes (sampling among the 50 likeliest
        tokens, as NNCF's `generate_text_data`), in batches, with the model's KV cache; the same
        sequences for a seed on a given machine."""
        if not hasattr(self.model, "generation_config") or getattr(self.model, "get_output_embeddings", lambda: None)() is None:
            raise QCompilerError(f"{type(self.model).__name__} does not generate text, so --dataset auto cannot make "
                                 "its calibration data: pass a text file (--dataset FILE, one sentence per line or "
                                 "running text)")
        generator = torch.Generator().manual_seed(seed)
        vocab = self.model.config.vocab_size
        special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        candidates = torch.tensor([i for i in range(min(vocab, 50000)) if i not in special])
        prefixes = candidates[torch.randint(len(candidates), (num_samples,), generator=generator)]
        samples = []
        # transformers 5.2x renamed `past_key_values` to `cache`
        key = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        with torch.no_grad():
            for start in range(0, num_samples, 64):
                ids = prefixes[start:start + 64, None]
                past, step_ids = None, ids
                for _ in range(seqlen - 1):
                    out = self.model(input_ids=step_ids, use_cache=True, **{key: past})
                    past = getattr(out, key, None) or out.past_key_values
                    top = out.logits[:, -1].float().topk(min(50, vocab), dim=-1)
                    pick = torch.multinomial(torch.softmax(top.values, -1), 1, generator=generator)
                    step_ids = top.indices.gather(1, pick)
                    ids = torch.cat([ids, step_ids], 1)
                samples.extend(list(ids))
        return samples


# tokens run through a block together: 1024 (2 samples of 512, 8 of 128) swept SmolLM2's blocks 10-20%
# faster than 2048-8192 on a 2-core AVX-512 Xeon (activations stay in cache); the same statistics up to
# float rounding
BATCH_TOKENS = 1024


def _final_norm(model: torch.nn.Module, path: str, modules: dict) -> tuple[torch.nn.Module, str] | None:
    """The norm applied after the blocks and the output layer's name: the one child of the blocks' parent
    whose class name says norm (LLaMA's model.norm, GPT-2's transformer.ln_f, OPT's final_layer_norm)."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    parent = modules.get(path.rsplit(".", 1)[0]) if "." in path else model
    if out is None or parent is None:
        return None
    norms = [m for n, m in parent.named_children() if "norm" in type(m).__name__.lower() or n.startswith("ln_")]
    name = next((n for n, m in modules.items() if m is out), None)
    return (norms[0], name) if len(norms) == 1 and name else None


def _length(args, kwargs) -> int:
    hidden = args[0] if args else kwargs["hidden_states"]
    return hidden.shape[1]


def _without_hidden(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k != "hidden_states"}


def _batched(captured: list, contexts: dict, limit: int | None = None) -> list:
    """Consecutive samples of one length n are stacked along the batch, up to `limit` of them (default:
    BATCH_TOKENS // n, at least 1), where every layer's arguments broadcast over the batch (their
    tensors have batch 1; BLOOM's ALiBi table, batch x heads, does not, and its samples run one by one)."""
    out = []
    for args, kwargs in captured:
        n = _length(args, kwargs)
        most = limit if limit is not None else max(1, BATCH_TOKENS // max(n, 1))
        if out and out[-1][2] < most and _length(out[-1][0], out[-1][1]) == n and _broadcasts(contexts[n]):
            prev_args, prev_kwargs, count = out[-1]
            if args:
                prev_args = (torch.cat([prev_args[0], args[0]]), *prev_args[1:])
            else:
                prev_kwargs = {**prev_kwargs, "hidden_states": torch.cat([prev_kwargs["hidden_states"],
                                                                          kwargs["hidden_states"]])}
            out[-1] = (prev_args, prev_kwargs, count + 1)
        else:
            out.append((args, kwargs, 1))
    return [(args, kwargs) for args, kwargs, _ in out]


def _broadcasts(context) -> bool:
    """Every tensor of every layer's arguments has batch 1 (or no batch)."""
    tensors = [t for t in tree_flatten(list(context.values()))[0] if isinstance(t, torch.Tensor)]
    return all(t.dim() < 2 or t.shape[0] == 1 for t in tensors)


class _AttentionTaps:
    """Hands the query and key of `scaled_dot_product_attention` calls made inside an attention module to
    that module's taps: the module's hooks say which module is running, and the function is wrapped while
    the block runs (transformers' attention implementations call it through `torch.nn.functional`)."""

    def __init__(self, attention: dict) -> None:
        self.attention, self.running = attention, []
        self.original = torch.nn.functional.scaled_dot_product_attention

    def __call__(self, query, key, *args, **kwargs):
        if self.running:
            taps = self.attention[self.running[-1]]
            for which, x in (("query", query), ("key", key)):
                if which in taps:
                    taps[which](x)
        return self.original(query, key, *args, **kwargs)

    def leave(self, module, args, output) -> None:  # a forward hook: returns None, so the output stays
        self.running.pop()

    def remove(self) -> None:
        torch.nn.functional.scaled_dot_product_attention = self.original


def _attention_hooks(modules: dict, attention: dict) -> list:
    """Hooks (each with `remove()`) that tap the attention inputs `attention` {module path: {which: tap}}."""
    attention = {path: taps for path, taps in attention.items() if path in modules}
    if not attention:
        return []
    wrapper = _AttentionTaps(attention)
    handles = []
    for path in attention:
        module = modules[path]
        handles.append(module.register_forward_pre_hook(lambda m, args, path=path: wrapper.running.append(path)))
        handles.append(module.register_forward_hook(wrapper.leave))
    torch.nn.functional.scaled_dot_product_attention = wrapper
    return [*handles, wrapper]


def _input_tap(tap):
    def hook(module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        tap(x)

    return hook
