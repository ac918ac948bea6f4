"""Reading a GGUF file's header: its key-value metadata and tensor table, in one pass over the bytes.

gguf-py's `GGUFReader` builds a numpy view per value (about 8 s for SmolLM2's 49152-token
vocabulary here); this reader decodes the same layout with `struct` (well under a second):
magic "GGUF", version (u32, 2 or 3), tensor count and key-value count (u64), then each key
(u64 length + UTF-8) with a u32 value type and its value (arrays: element type u32, count u64,
elements), then each tensor's name, dimension count (u32), dimensions (u64 each, innermost first),
GGML type (u32) and offset (u64) from the data section, which starts at the next multiple of
`general.alignment` (default 32).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qcompiler.errors import QCompilerError

SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


@dataclass
class Value:
    type: int  # the GGUF value type
    value: object
    sub_type: int | None = None  # element type of an array


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (outermost first): [rows, row length]
    type_id: int
    offset: int  # from the start of the file


class Header:
    """`fields` (key -> Value) and `tensors` (name -> TensorInfo) of the GGUF at `path`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            try:
                self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:
                raise QCompilerError(f"{self.path} is empty, not a GGUF file: re-download or re-export it") from None
        self._pos = 0
        try:
            self._parse()
        except (struct.error, UnicodeDecodeError, IndexError, OverflowError, MemoryError, ValueError,
                ZeroDivisionError, KeyError):
            raise QCompilerError(f"{self.path} is truncated or corrupt (its GGUF header does not parse): "
                                 "re-download or re-export it") from None

    def _take(self, fmt: str):
        value = struct.unpack_from(fmt, self._buf, self._pos)[0]
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._take("<Q")
        if self._pos + n > len(self._buf):
            raise struct.error("string past the end")
        s = self._buf[self._pos:self._pos + n].decode("utf-8")
        self._pos += n
        return s

    def _value(self, kind: int):
        if kind == STRING:
            return self._string()
        if kind in SCALARS:
            return self._take(SCALARS[kind])
        raise struct.error(f"unknown value type {kind}")

    def _parse(self) -> None:
        if self._buf[:4] != b"GGUF":
            raise QCompilerError(f"{self.path} does not start with the GGUF magic: it is not a GGUF file")
        self._pos = 4
        version = self._take("<I")
        if version not in (2, 3):
            raise QCompilerError(f"{self.path} is GGUF version {version}; versions 2 and 3 are read")
        n_tensors, n_kv = self._take("<Q"), self._take("<Q")
        self.fields: dict[str, Value] = {}
        for _ in range(n_kv):
            key = self._string()
            kind = self._take("<I")
            if kind == ARRAY:
                sub, count = self._take("<I"), self._take("<Q")
                if sub in SCALARS and sub != 7:
                    size = struct.calcsize(SCALARS[sub])
                    values = np.frombuffer(self._buf, dtype=np.dtype(SCALARS[sub]), count=count,
                                           offset=self._pos).tolist()
                    self._pos += size * count
                else:
                    values = [self._value(sub) for _ in range(count)]
                self.fields[key] = Value(ARRAY, values, sub)
            else:
                self.fields[key] = Value(kind, self._value(kind))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._take("<Q") for _ in range(self._take("<I"))]
            infos.append((name, tuple(reversed(dims)), self._take("<I"), self._take("<Q")))
        align = int(self.get("general.alignment", 32))
        if align <= 0:
            raise struct.error(f"alignment {align}")
        start = -(-self._pos // align) * align
        self.tensors = {name: TensorInfo(name, shape, kind, start + off) for name, shape, kind, off in infos}
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        for info in self.tensors.values():  # every tensor's bytes are in the file (a cut file's are not)
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(info.type_id)]
            count = 1
            for dim in info.shape:
                count *= dim
            if info.offset + count // block * size > len(self._buf):
                raise struct.error(f"tensor {info.name} runs past the end of the file")

    def get(self, key: str, default=None):
        field = self.fields.get(key)
        return default if field is None else field.value

    def close(self) -> None:
        self._buf.close()
