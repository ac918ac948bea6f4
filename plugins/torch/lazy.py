"""A safetensors folder loaded without holding its float weights: the large Linear and Embedding
weights are placeholders, read from the files when a pass needs them and dropped after.

A placeholder is a zero tensor of the weight's shape in an anonymous mapping whose pages are never
written (the kernel provides them on first write only), so the traces that run the model (qcompiler's and
OpenVINO's) see the right shapes at no memory cost, and the OpenVINO model's Constant for it is
replaced by the compressed weight (or the float values) when lowering. Each placeholder carries one
distinct value in its first element, so no converter pass can take two of them for the same
constant. Norms, biases and buffers are real. Weights are read with `pread` into private memory,
not mapped, so file pages never count in the process's resident set.

Only what this module understands exactly is loaded lazily: the safetensors files transformers
reads (`weight_files`), whose tensors are float (f32, f16, bf16) and name every parameter of the
model transformers builds from the folder's config, each once; anything else (a checkpoint whose
keys transformers renames while loading, a tied weight stored twice, pickles, GGUF) takes the eager
path, `hf.load_causal_lm`. A placeholder the IR reads other than as a weight gets its real values
before any export (`plugins/torch/__init__.py`).
"""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

import numpy as np
import torch

from qcompiler.plugins.torch.hf import safetensors_header

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
MIN_PLACEHOLDER = 1 << 16  # elements: smaller weights are read at load time
READ_CHUNK = 8 << 20  # bytes of f16 / bf16 converted at a time
HUGE = 2 << 20  # bytes of a transparent huge page


def weight_files(folder: Path) -> list[Path]:
    """The files transformers reads: the shards the index names, else model.safetensors; none (so
    the eager loader decides) for any other layout. Other .safetensors files beside them (a stale
    shard, a second copy) are not weights of this model."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return []
        return [folder / name for name in names if "/" not in name and (folder / name).is_file()]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


class SafetensorsReader:
    """Reads one tensor at a time from a folder's safetensors files, as float32."""

    def __init__(self, folder: Path) -> None:
        self.entries: dict[str, tuple[Path, str, tuple[int, ...], int, int]] = {}
        for path in weight_files(folder):
            header, data = safetensors_header(path)
            for key, t in header.items():
                start, end = t["data_offsets"]
                self.entries[key] = (path, t["dtype"], tuple(t["shape"]), data + start, data + end)

    def floating(self) -> bool:
        return all(dtype in DTYPES for _, dtype, _, _, _ in self.entries.values())

    def read_stored(self, key: str) -> torch.Tensor:
        """The tensor in the float dtype the file stores it in (f32, f16 or bf16), for a reader that
        drops it soon (round to nearest): a private mapping of the file's bytes, so nothing is copied
        and the page cache's pages count in the resident set only while the tensor lives."""
        path, dtype, shape, start, end = self.entries[key]
        base = start - start % mmap.ALLOCATIONGRANULARITY
        if end == start or (start - base) % DTYPES[dtype].itemsize:  # nothing to map, or not viewable in place
            return self._read_owned(key)
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < end:
                raise OSError(f"{path} ended while reading {key}")
            mapped = mmap.mmap(f.fileno(), end - base, flags=mmap.MAP_PRIVATE, offset=base)  # copy on a write
        raw = np.frombuffer(mapped, dtype=np.uint8, count=end - start, offset=start - base)
        return torch.from_numpy(raw).view(DTYPES[dtype]).reshape(shape)  # holds the mapping until dropped

    def read(self, key: str) -> torch.Tensor:
        """The tensor as float32, read straight into its own memory (f16 / bf16 through a small
        buffer, so a large weight costs its float32 size and no more)."""
        path, dtype, shape, start, end = self.entries[key]
        if dtype == "F32":
            return self._read_owned(key)
        width = DTYPES[dtype].itemsize
        out = torch.empty((end - start) // width, dtype=torch.float32)
        step = READ_CHUNK // width * width
        buffer = bytearray(min(step, end - start))
        with open(path, "rb", buffering=0) as f:
            for offset in range(start, end, step):
                size = min(step, end - offset)
                _pread_into(f.fileno(), memoryview(buffer)[:size], offset, path, key)
                first = (offset - start) // width
                out[first:first + size // width] = torch.frombuffer(buffer, dtype=DTYPES[dtype], count=size // width)
        return out.reshape(shape)

    def _read_owned(self, key: str) -> torch.Tensor:
        """The tensor as stored, read (`pread`) into its own memory: a snapshot of the file."""
        path, dtype, shape, start, end = self.entries[key]
        out = torch.empty((end - start) // DTYPES[dtype].itemsize, dtype=DTYPES[dtype])
        with open(path, "rb", buffering=0) as f:
            _pread_into(f.fileno(), memoryview(out.view(torch.uint8).numpy()), start, path, key)
        return out.reshape(shape)


def _pread_into(fd: int, view: memoryview, offset: int, path: Path, key: str) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise OSError(f"{path} ended while reading {key}")
        done += got


def load_lazy(folder: Path, model_class, config, trust_remote_code: bool):
    """(model, {parameter name: file key} of its placeholders, reader), or None when the folder is
    not one this module loads exactly (the caller then loads it eagerly)."""
    from accelerate import init_empty_weights

    reader = SafetensorsReader(folder)
    if not reader.entries or not reader.floating():
        return None
    with init_empty_weights(include_buffers=False):
        model = model_class.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.tie_weights()  # as from_pretrained does after loading (inside the context it would re-create them)
    holders: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    names: dict[int, list[str]] = {}
    for module_name, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            holders.setdefault(id(param), []).append((module, attr))
            names.setdefault(id(param), []).append(f"{module_name}.{attr}" if module_name else attr)
    keys = {}
    for pid, pnames in names.items():
        found = {_key(reader, n, model) for n in pnames} - {None}
        if len(found) != 1:  # none, or a tied parameter stored twice (transformers may untie it): eager
            return None
        keys[pid] = found.pop()
    placeholders: dict[str, str] = {}
    for index, (pid, pnames) in enumerate(names.items()):
        module, attr = holders[pid][0]
        old = getattr(module, attr)
        path, dtype, shape, _, _ = reader.entries[keys[pid]]
        if tuple(old.shape) != shape:
            return None
        matrix = isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and attr == "weight"
        if matrix and old.numel() >= MIN_PLACEHOLDER:
            tensor = _zeros(shape)
            tensor.view(-1)[0] = float(index + 1)  # distinct contents: see the module docstring
            for name in pnames:
                placeholders[name] = keys[pid]
        else:
            tensor = reader.read(keys[pid])
        new = torch.nn.Parameter(tensor, requires_grad=False)
        for holder, holder_attr in holders[pid]:
            holder._parameters[holder_attr] = new
    for module_name, module in model.named_modules():
        for attr, buffer in list(module._buffers.items()):
            name = f"{module_name}.{attr}" if module_name else attr
            persistent = attr not in module._non_persistent_buffers_set  # the others are computed, not loaded
            if buffer is not None and persistent and name in reader.entries:
                module._buffers[attr] = reader.read(name).to(buffer.dtype)
    return model, placeholders, reader


def _zeros(shape: tuple[int, ...]) -> torch.Tensor:
    """float32 zeros in an anonymous mapping of their own: pages the kernel provides on first write
    only (malloc / calloc may hand out reused heap memory, which they write)."""
    count = int(np.prod(shape))
    buffer = mmap.mmap(-1, max(4 * count, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # shared ones fill on read
    if hasattr(mmap, "MADV_HUGEPAGE") and 4 * count > HUGE:
        # the traces read every placeholder: with transparent huge pages a read maps the kernel's 2 MB zero
        # page (still no memory) instead of 512 4 kB ones, a third of the time per read. Not the first
        # 2 MB, where the marker is written: a write there would take a whole huge page.
        try:
            buffer.madvise(mmap.MADV_HUGEPAGE, HUGE, 4 * count - HUGE)
        except OSError:  # a kernel without transparent huge pages: 4 kB zero pages, as before
            pass
    return torch.from_numpy(np.frombuffer(buffer, dtype=np.float32, count=count).reshape(shape))


def _key(reader: SafetensorsReader, name: str, model) -> str | None:
    """The file key of parameter `name`: the same name, or without / with the base model's prefix."""
    if name in reader.entries:
        return name
    prefix = getattr(model, "base_model_prefix", "") + "."
    if name.startswith(prefix) and name[len(prefix):] in reader.entries:
        return name[len(prefix):]
    if prefix + name in reader.entries:
        return prefix + name
    return None


def materialize(params: dict[str, torch.nn.Parameter], placeholders: dict[str, str], reader: SafetensorsReader,
                names) -> None:
    """Write the real values into the placeholders `names` of `params` (the model's parameters by
    name), for weights the IR does not take over."""
    for name in names:
        with torch.no_grad():
            params[name].copy_(reader.read(placeholders[name]))
