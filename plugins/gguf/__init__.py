"""The GGUF format: `--format gguf:TYPE` writes `model.gguf`, the file llama.cpp, Ollama and
transformers (`from_pretrained(folder, gguf_file="model.gguf")`) open.

TYPE is llama.cpp's file type (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q6_k, q4_k_m): it chooses
every tensor's GGML type as llama.cpp's quantizer does (`policy`), in the precision pass, so the
report lists the types and the round-to-nearest pass fills each weight with llama.cpp's reference
quantizer (`qcompiler.ggml`); this backend then writes those blocks as they are, with the LLaMA
metadata and tokenizer (`llama`).

With data-aware passes (AWQ, scale estimation, GPTQ, AutoRound) the block tensors of a q4_0 or q4_1
file take the integer grid those blocks hold (int4_sym, int4_asym in groups of 32), the passes choose
their codes and scales, and the writer packs them into the blocks without quantizing again
(`quant.block_form`: exact for q4_0; q4_1 stores the zero point as an f16 minimum, and the report gives
the largest difference). Weights outside the blocks keep llama.cpp's type and quantizer. Other files
(8-bit, 5-bit, K-quants) have no grid the passes tune here: data-aware passes are refused for them.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch

from qcompiler import ggml
from qcompiler.config import Mode, WeightFormat
from qcompiler.errors import QCompilerError
from qcompiler.hookspecs import hookimpl
from qcompiler.plugins.gguf import llama, policy, read
from qcompiler.quant import GGUF_BLOCKS, BlockWeight, block_form, matrix_view
from qcompiler.runners import TransformersRunner

FILE = "model.gguf"
TYPES_HELP = ", ".join(policy.FILE_TYPES)
TUNED = ("awq", "scale_estimation", "gptq", "autoround")  # data-aware passes whose result is codes and scales
# the 4-bit block types whose grid the data-aware passes tune (in groups of 32); 8-bit weights are rounded to
# nearest, as everywhere in qcompiler (and NNCF)
GRIDS = {block: mode for (mode, _), block in GGUF_BLOCKS.items() if mode.low_bit}


class GGUFBackend:
    name = "gguf"
    lowers_epilogues = False
    writes_companions = False  # the tokenizer and hyper-parameters live inside the file

    def _file_type(self, options: dict) -> str:
        extra = sorted(set(options) - {"type"})
        if extra:
            raise QCompilerError(f"the gguf format takes no options besides its type ({', '.join(extra)}): drop them")
        file_type = options.get("type")
        if file_type is None:
            raise QCompilerError(f"name the GGUF type: --format gguf:TYPE, TYPE one of {TYPES_HELP}")
        if file_type not in policy.FILE_TYPES:
            raise QCompilerError(f"unknown GGUF type {file_type!r}: pick one of {TYPES_HELP}")
        return file_type

    def configure(self, config, options: dict):
        """The config this file type implies: its default type as the mode (None for float files)."""
        file_type = self._file_type(options)
        if config.keep:
            raise QCompilerError("writing an input's kept codes as GGUF is not supported yet: re-quantize with "
                                 f"--format gguf:{file_type} (without --weight-format keep)")
        if config.group_size is not None or config.ratio != 1.0:
            raise QCompilerError(f"gguf:{file_type} sets every tensor's type and block as llama.cpp does: drop "
                                 "--group-size and --ratio")
        base = policy.FILE_TYPES[file_type][0]
        mode = None if ggml.TYPES[base].float else Mode(base)
        if base in GRIDS:  # the grid the passes would tune: which of them run (and may run) is read on it
            config = config.replace(mode=GRIDS[base], int8_above=None)
        on = [name for name in config.switched_on() if name in TUNED or name == "lora_correction"]
        on += ["awq"] if config.awq and "awq" not in on else []
        if "lora_correction" in on:
            raise QCompilerError("a GGUF file holds no LoRA adapters: drop --lora-correction (--scale-estimation, "
                                 "--gptq and AutoRound's --recipe tune the blocks' codes instead)")
        if config.dataset is not None and not on:
            raise QCompilerError(f"gguf:{file_type} with --dataset: nothing reads the data; add --awq, "
                                 "--scale-estimation, --gptq or an AutoRound --recipe, or drop --dataset")
        if on and base not in GRIDS:
            raise QCompilerError(f"the data-aware passes ({', '.join(on)}) tune the 4-bit grids of gguf:q4_0 and "
                                 f"q4_1 blocks; gguf:{file_type}'s {base} blocks have none here: pick one of those, "
                                 "or drop them")
        if on:  # the passes see the grid the blocks hold; the writer packs their codes (`format_policy`, `lower`)
            mode = GRIDS[base]
        return config.replace(mode=mode, int8_above=None)

    def check(self, config, options: dict) -> None:
        self._file_type(options)

    def format_policy(self, options: dict, config=None):
        """The precision pass's rule for this file type: {weight Constant: WeightFormat or None}. With
        data-aware passes (`configure` set the config's mode to a block type's grid), a block tensor whose
        llama.cpp type holds an integer grid takes that grid, for the passes to tune."""
        file_type = self._file_type(options)
        tuned = config is not None and config.mode in GRIDS.values()

        def assign(graph, uses_by_const) -> dict:
            roles = {}
            for const, uses in uses_by_const.items():
                ops = {u.op.op for u in uses}
                name, role, layer = llama.tensor_name(const.attrs["weight"])
                if ops >= {"Gather", "MatMul"} or name == "output.weight":
                    role = "output"  # a tied embedding is quantized as the output projection
                roles[const] = (role, layer, matrix_view(graph.tensor(const), uses[0].reduction_axes)[0].shape[1])
            layers = 1 + max((layer for _, layer, _ in roles.values() if layer is not None), default=0)
            out = {}
            for const, (role, layer, row) in roles.items():
                t = policy.tensor_type(file_type, role, layer, layers, row)
                if tuned and layer is not None and t in GRIDS:
                    out[const] = WeightFormat(GRIDS[t], 32)
                else:
                    out[const] = None if ggml.TYPES[t].float else WeightFormat(Mode(t), ggml.TYPES[t].block)
            return out

        return assign

    def lower(self, graph, source, out_dir: Path, options: dict | None = None) -> dict:
        import gguf

        file_type = self._file_type(options or {})
        model = getattr(source, "model", None)
        config = getattr(model, "config", None)
        if not isinstance(model, torch.nn.Module) or config is None:
            raise QCompilerError(f"the gguf format writes transformers models; this input is a "
                                 f"{type(model).__name__}: use --format openvino or onnx")
        llama.check_model(config)
        writer = gguf.GGUFWriter(str(out_dir / FILE), llama.ARCH)
        writer.add_type("model")
        writer.add_name(_model_name(source))
        llama.add_hparams(writer, config)
        writer.add_file_type(policy.FILE_TYPES[file_type][1])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        reader = _input_gguf(source)
        if reader is None or not llama.copy_tokenizer(writer, reader):
            if getattr(source, "tokenizer", None) is None:
                raise QCompilerError("the gguf format embeds the tokenizer, and this model has none: compress a "
                                     "folder with its tokenizer")
            llama.add_tokenizer(writer, source.tokenizer, config.vocab_size)
        weight_bytes, types, packed, approximate = {}, Counter(), Counter(), {}
        consts = {c.attrs["weight"]: c for c in graph.parameter_constants()}
        base = policy.FILE_TYPES[file_type][0]
        float_type = base if ggml.TYPES[base].float else "f32"  # 2-D weights left float: the file's float type
        for key, ir_name, value in _tensors(model, graph, consts):
            name, role, _ = llama.tensor_name(key)
            const = consts.get(ir_name)
            cw = const.meta.get("compressed") if const is not None else None
            if cw is not None and not isinstance(cw, BlockWeight):
                blocks = block_form(cw)
                if blocks is None:
                    raise QCompilerError(f"{ir_name} was compressed as {cw.mode} group {cw.group_size}, which no GGUF "
                                         "block type holds: compress with --format gguf:TYPE from the start")
                cw, error = blocks
                packed[cw.mode.value] += 1
                if error:
                    approximate[ir_name] = error
            if cw is not None:
                if cw.transposed or len(cw.shape) != 2:
                    raise QCompilerError(f"{ir_name} is not a [out, in] matrix: the gguf writer cannot store it")
                data, type_name = cw.codes.reshape(cw.codes.shape[0], -1).numpy(), cw.mode.value
            else:
                type_name = "f32" if value.dim() == 1 else float_type
                data = _float_array(value, type_name)
            heads = {"attn_q": config.num_attention_heads,
                     "attn_k": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}.get(role)
            if heads is not None:  # a bias moves with its rows too
                data = llama.permute_rows(data, heads)
            kind = gguf.GGMLQuantizationType(ggml.TYPES[type_name].type_id)
            if data.dtype == np.uint8:
                writer.add_tensor(name, data, raw_dtype=kind)
            else:
                writer.add_tensor(name, data)
            weight_bytes[ir_name] = data.nbytes
            types[type_name] += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        notes = []
        if packed:
            difference = max(approximate.values(), default=0.0)
            notes.append("GGUF blocks packed from the passes' codes and scales, not quantized again: "
                         + ", ".join(f"{k} {v}" for k, v in sorted(packed.items()))
                         + (f" (q4_1's minimum in f16: largest difference {difference:.2g})" if difference else
                            " (exact)"))
        return {"files": [FILE], "weight_bytes": weight_bytes, "notes": notes,
                "gguf": {"file_type": file_type, "tensor_types": dict(types),
                         "tokenizer": "copied from the input GGUF" if reader is not None else "converted (BPE)",
                         "packed_from_codes": dict(packed)}}

    def can_load(self, path: Path) -> bool:
        return (Path(path) / FILE).is_file()

    def runner(self, path: Path):
        """The file decoded by transformers' GGUF loader (to float), for `qcompiler eval`."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path), gguf_file=FILE, dtype=torch.float32)
        return TransformersRunner(model.eval())


def _model_name(source) -> str:
    path = getattr(source, "path", None)
    return Path(path).name if path is not None else type(source.model).__name__


def _input_gguf(source):
    """The header of the GGUF the model came from, if it came from one."""
    name, folder = getattr(source, "gguf", None), getattr(source, "path", None)
    if not name or folder is None:
        return None
    return read.Header(Path(folder) / name)


def _tensors(model, graph, consts):
    """(transformers name, IR name, float value) of each tensor, once: lm_head tied to the embedding
    is not written (transformers and llama.cpp tie them when `output.weight` is absent)."""
    state = model.state_dict()
    aliases: dict[int, list[str]] = {}
    for key, t in state.items():
        aliases.setdefault(t.data_ptr(), []).append(key)
    for names in aliases.values():  # the first name of each tensor; a tied lm_head is an alias
        key, t = names[0], state[names[0]]
        if key.endswith("rotary_emb.inv_freq"):
            continue
        ir_name = next((a for a in names if a in consts), key)
        yield key, ir_name, graph.weights.get(ir_name, t).detach()


def _float_array(value: torch.Tensor, type_name: str) -> np.ndarray:
    if type_name == "f32":
        return value.float().contiguous().numpy()
    if type_name == "f16":
        return value.to(torch.float16).contiguous().numpy()
    return value.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)  # bf16 as raw bytes


@hookimpl
def qcompiler_register_backends():
    return [GGUFBackend()]
