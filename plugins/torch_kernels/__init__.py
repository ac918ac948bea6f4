"""The torch backend: the same transformers model, its Linears on torch's CPU int kernels.

The artifact folder holds `model.safetensors` (float tensors, and for each compressed weight its
codes in a plain layout -- 4-bit ones two per byte, low nibble first -- scales and zero points), `qcompiler_torch.json` (which weight is in which format and
which modules use it) and the model's config and tokenizer. `load_model(folder)` gives back a
transformers model whose `generate()` works as before, with its KV cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from qcompiler.config import Mode
from qcompiler.errors import QCompilerError
from qcompiler.formats import LOW_BIT_FIX, refuse_modes
from qcompiler.hookspecs import hookimpl
from qcompiler.plugins.torch_kernels.modules import INT4_GROUP_SIZES, Int4Linear, Int8Linear, W8A8Linear, w8a8_available
from qcompiler.bitpack import NIBBLES, pack_nibbles, unpack
from qcompiler.quant import CompressedWeight, matrix_view
from qcompiler.rewrites import Epilogue, epilogues
from qcompiler.runners import TransformersRunner

LAYOUT = "qcompiler_torch.json"
WEIGHTS = "model.safetensors"
KERNEL_MODES = (Mode.INT4_SYM, Mode.INT4_ASYM, Mode.INT8_SYM, Mode.INT8_ASYM)


class TorchKernelsBackend:
    name = "torch"
    lowers_epilogues = True  # nodes passes inserted (qcompiler.rewrites)
    activation_modes = ("int8", "int8-dynamic")  # --quant-mode values lowered to integer kernels (W8A8Linear)

    def check(self, config, options: dict) -> None:
        refuse_modes(config, "torch", lambda spec: spec.bits in (4, 8), LOW_BIT_FIX)
        if config is not None and config.quant_mode is not None and not w8a8_available():
            raise QCompilerError("this torch build has no oneDNN int8 Linear (x86 CPUs), which --quant-mode lowers to: "
                                 "use --backend openvino or onnx")
        if options:
            raise QCompilerError(f"the torch backend takes no options ({', '.join(options)}): drop them")

    def check_formats(self, graph, options: dict | None = None) -> None:
        """Every assigned format has a kernel here (called right after precision assignment)."""
        for const, uses in graph.uses_by_weight().items():
            fmt = const.meta.get("format")
            if fmt is not None and any(u.op.op == "MatMul" for u in uses):
                if graph.tensor(const).dim() > 2:
                    raise QCompilerError(
                        f"torch has no int kernel for batched mixture-of-experts weights ({const.attrs['weight']}, "
                        f"{list(graph.tensor(const).shape)}): use --backend openvino or onnx, or ignore the experts "
                        "(--ignored-scope-pattern '.*experts.*')")
                n, k = matrix_view(graph.tensor(const), uses[0].reduction_axes)[0].shape
                _check_kernel(const.attrs["weight"], fmt.mode, fmt.group_size, n, k)

    def lower(self, graph, source, out_dir: Path, options: dict | None = None) -> dict:
        from safetensors.torch import save_file

        self.check(None, options or {})
        if not isinstance(getattr(source, "model", None), torch.nn.Module):
            raise QCompilerError(f"the torch backend writes transformers models; this input is a "
                                 f"{type(source.model).__name__}: write it in its own format (drop --backend)")
        if not getattr(source, "is_causal_lm", False) and not getattr(source, "is_encoder", False):
            raise QCompilerError("the torch backend writes transformers causal LMs and encoders: use --backend openvino "
                                 "for this model")
        tensors, layout, weight_bytes = {}, {}, {}
        compressed_names, activated = set(), []
        programs = epilogues(graph)
        new_weights = {name: ep.path for ep in programs for name in ep.weights.values()}
        consts = {c.attrs["weight"]: c for c in graph.parameter_constants()} if new_weights else {}
        for name in new_weights:  # weights a pass inserted: float ones stored as they are
            if "compressed" not in consts[name].meta:
                value = graph.weights[name].float()
                tensors[name], weight_bytes[name] = value.contiguous(), value.numel() * 4
        for const, uses in graph.uses_by_weight().items():
            name = const.attrs["weight"]
            cw: CompressedWeight | None = const.meta.get("compressed")
            if cw is None:
                continue
            if name in new_weights and any(u.op.op != "MatMul" for u in uses):
                raise QCompilerError(f"the inserted weight {name} is compressed but not read by a MatMul: "
                                     "change the pass that inserted it")
            if any(u.op.op == "MatMul" for u in uses):  # an embedding alone decodes to float on load
                _check_kernel(name, cw.mode, cw.group_size, *cw.matrix_shape)
            codes = pack_nibbles(cw.codes) if cw.mode.bits == 4 else cw.codes
            for key, t in (("codes", codes), ("scale", cw.scale), ("zero_point", cw.zero_point)):
                if t is not None:
                    tensors[f"{name}::{key}"] = t.contiguous()
            layout[name] = {"mode": cw.mode.value, "group_size": cw.group_size, "shape": list(cw.shape),
                            "codes_shape": list(cw.codes.shape),
                            "linears": [u.op.name.split("/")[0] for u in uses if u.op.op == "MatMul"],
                            "embeddings": [u.op.name.split("/")[0] for u in uses if u.op.op == "Gather"]}
            aq = const.meta.get("activation")
            if aq is not None and layout[name]["linears"]:  # u8 activations (W8A8Linear)
                layout[name]["activation"] = {"dynamic": aq.dynamic} if aq.dynamic else {
                    "dynamic": False, "scale": aq.scale, "zero_point": aq.zero_point}
                if aq.smooth is not None:
                    tensors[f"{name}::smooth"] = torch.tensor(aq.smooth, dtype=torch.float32)
                activated.append(name)
            if name in new_weights:  # an epilogue's int kernel, not a module of the model
                layout[name].update(linears=[], embeddings=[], epilogue=new_weights[name])
            weight_bytes[name] = sum(t.numel() * t.element_size() for t in (codes, cw.scale, cw.zero_point)
                                     if t is not None)
            compressed_names.add(name)
        names_by_ptr: dict[int, set[str]] = {}
        state = source.model.state_dict()
        for key, t in state.items():
            names_by_ptr.setdefault(t.data_ptr(), set()).add(key)
        seen = set()
        for key, t in state.items():  # float tensors, each once (a tied weight has two names)
            if names_by_ptr[t.data_ptr()] & compressed_names or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            value = graph.weights.get(key, t)
            tensors[key] = value.detach().contiguous()
            weight_bytes[key] = value.numel() * value.element_size()
        save_file(tensors, str(out_dir / WEIGHTS))
        (out_dir / LAYOUT).write_text(json.dumps({"format": "qcompiler-torch-int", "task": source.task, "weights": layout,
                                                  "epilogues": {ep.path: ep.to_json() for ep in programs}}, indent=2))
        facts = {"files": [WEIGHTS, LAYOUT], "weight_bytes": weight_bytes}
        if activated:
            facts["activations_quantized"] = activated  # the IR weights whose Linears run on u8 activations
        return facts

    def can_load(self, path: Path) -> bool:
        return (Path(path) / LAYOUT).is_file()

    def runner(self, path: Path):
        return TorchKernelsRunner(load_model(path))


def load_model(folder: str | Path):
    """The transformers model of a torch-backend artifact, its compressed Linears on int kernels.
    A damaged artifact (a file cut short, a layout that does not match the tensors or the config)
    is a one-line error, never a model with random layers."""
    try:
        return _load_model(Path(folder))
    except QCompilerError:
        raise
    except Exception as exc:  # json, safetensors, transformers and torch each raise their own types
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise QCompilerError(f"cannot read the torch artifact in {folder}: {first} -- the artifact is damaged; "
                             "compress the model again") from None


def _load_model(folder: Path):
    import transformers
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from qcompiler.tasks import CAUSAL, LOADERS

    document = json.loads((folder / LAYOUT).read_text())
    layout, programs = document["weights"], document.get("epilogues", {})
    tensors = load_file(str(folder / WEIGHTS))
    inserted = {name for data in programs.values() for name in data["weights"].values()}
    if any(name not in layout and name not in tensors for name in inserted):
        raise QCompilerError(f"the torch artifact in {folder} lacks a weight its epilogues read: the artifact is "
                             "damaged; compress the model again")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    task = document.get("task", CAUSAL)  # artifacts written before encoders were causal LMs
    if task not in LOADERS:
        raise QCompilerError(f"the torch artifact in {folder} is for the task {task!r}, which this qcompiler does not "
                             "read: upgrade qcompiler, or compress the model again")
    model = getattr(transformers, LOADERS[task]).from_config(config, dtype=torch.float32)
    replaced = {f"{path}.weight" for info in layout.values() for path in info["linears"] + info["embeddings"]}
    missing, unexpected = model.load_state_dict({k: v for k, v in tensors.items() if "::" not in k
                                                 and k not in inserted}, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    stored = {params[k].data_ptr() for k in (set(tensors) | replaced) if k in params}
    missing = [k for k in missing if k not in replaced and (k not in params or params[k].data_ptr() not in stored)]
    if missing or unexpected:
        raise QCompilerError(f"the torch artifact in {folder} does not match its config ({len(missing)} tensors "
                             f"missing, {len(unexpected)} unexpected, e.g. {(missing + unexpected)[0]}): the "
                             "artifact is damaged; compress the model again")
    kernels = {}
    for name, info in layout.items():
        mode, g = Mode(info["mode"]), info["group_size"]
        codes, scale = tensors[f"{name}::codes"], tensors[f"{name}::scale"]
        if mode.bits == 4:
            codes = unpack_nibbles(codes, tuple(info["codes_shape"]), signed=not mode.asymmetric)
        zero_point = tensors.get(f"{name}::zero_point")
        if "epilogue" in info:
            kernels[name] = (Int4Linear(codes, scale, zero_point, g, None) if mode.bits == 4
                             else Int8Linear(codes, scale, zero_point, None))
            continue
        for path in info["embeddings"]:  # no int gather kernel: embeddings decode to float once
            cw = CompressedWeight(mode, g, codes, scale, zero_point, tuple(info["shape"]))
            model.get_submodule(path).weight = torch.nn.Parameter(cw.dequantize(), requires_grad=False)
        for path in info["linears"]:
            parent, _, child = path.rpartition(".")
            old = model.get_submodule(path)
            if "activation" in info:
                new = W8A8Linear(codes, scale, info["activation"], tensors.get(f"{name}::smooth"), old.bias)
            else:
                new = (Int4Linear(codes, scale, zero_point, g, old.bias) if mode.bits == 4
                       else Int8Linear(codes, scale, zero_point, old.bias))
            setattr(model.get_submodule(parent) if parent else model, child, new)
    for path, data in programs.items():  # after the Linears were replaced: the hooks go on the int kernels
        ep = Epilogue.from_json(path, data)
        owner = model.get_submodule(path)
        for attr, name in ep.weights.items():
            if name in kernels:
                owner.add_module(attr, kernels[name])
            else:
                owner.register_parameter(attr, torch.nn.Parameter(tensors[name], requires_grad=False))
        ep.attach(owner)
    model.eval()
    return model



def unpack_nibbles(packed: torch.Tensor, shape: tuple[int, ...], signed: bool) -> torch.Tensor:
    return unpack(packed.reshape(-1), NIBBLES, int(np.prod(shape)), signed=signed).reshape(shape)


TorchKernelsRunner = TransformersRunner  # the transformers model on int kernels runs like any other


def _check_kernel(name: str, mode: Mode, group_size: int, n: int, k: int) -> None:
    fix = ("use --weight-format int4 (--sym) with --group-size 32, 64, 128 or 256, or int8, "
           "or --backend openvino, which runs every 4- and 8-bit mode")
    if mode not in KERNEL_MODES:
        raise QCompilerError(f"torch has no CPU kernel for {mode} ({name}): {fix}")
    if mode.bits == 4 and (group_size not in INT4_GROUP_SIZES or n % 16 or k % 2):
        raise QCompilerError(
            f"torch's int4 CPU kernel takes groups of {INT4_GROUP_SIZES} and layers with a multiple of 16 outputs; "
            f"{name} ({n}x{k}) has group size {group_size}: {fix}")
    if mode.bits == 8 and group_size != -1:
        raise QCompilerError(f"torch's int8 CPU kernel takes one scale per output channel; {name} has groups of "
                             f"{group_size} (a GGUF q8_0 tensor kept as it is): use --format openvino or onnx, or "
                             "re-quantize with --weight-format int8")


@hookimpl
def qcompiler_register_backends():
    return [TorchKernelsBackend()]
