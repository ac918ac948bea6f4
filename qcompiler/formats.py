"""Weight formats as registered descriptions: what one stored weight looks like.

Each `Mode` (config.py) names one `FormatSpec` here, and everything that depends on a format reads
its description rather than testing for a member: quantization (the grid and its levels), the
precision pass (which formats are the low-bit primary ones), the size figures (bits of codes,
scales and zero points) and each backend's capability check (`holds`). Adding a format is one
entry here and one member of `Mode`; a backend that cannot store it refuses it by its description,
before any work.
"""

from __future__ import annotations

from dataclasses import dataclass

from qcompiler.errors import QCompilerError


@dataclass(frozen=True)
class FormatSpec:
    """One weight format.

    grid "int": codes on a uniform integer grid, W ~ (q - z) * s (symmetric: z = 0 and the codes span
    [-2^(b-1), 2^(b-1) - 1], the extreme value at -2^(b-1)); grid "table": codes index `levels`
    (NF4's 16 values, E2M1's), W ~ levels[q] * s. `scale_bits`: 16 for f16 scales, 8 for an E8M0
    exponent. `block`: the one group size the format allows (MX: 32), else None. `default_group`:
    the group size when none is given (-1: one scale per output channel). grid "ggml": a GGUF block
    type (`qcompiler.ggml`), stored as its blocks' bytes, which only the GGUF format writes."""

    name: str
    bits: int
    grid: str = "int"
    asymmetric: bool = False
    levels: str | None = None
    scale_bits: int = 16
    block: int | None = None
    default_group: int = 128

    @property
    def integer(self) -> bool:
        return self.grid == "int"

    @property
    def ggml(self) -> bool:
        return self.grid == "ggml"

    @property
    def low_bit(self) -> bool:
        """A primary compressed format (below 8 bits): the one --ratio, AWQ and the weight fits act on."""
        return self.bits < 8

    @property
    def code_range(self) -> tuple[int, int]:
        """Smallest and largest stored code of an integer format (signed when symmetric)."""
        if self.asymmetric:
            return 0, 2**self.bits - 1
        return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1


FORMATS: dict[str, FormatSpec] = {spec.name: spec for spec in (
    FormatSpec("int8_asym", 8, asymmetric=True, default_group=-1),
    FormatSpec("int8_sym", 8, default_group=-1),
    FormatSpec("int4_sym", 4),
    FormatSpec("int4_asym", 4, asymmetric=True),
    FormatSpec("int3_sym", 3),
    FormatSpec("int3_asym", 3, asymmetric=True),
    FormatSpec("int2_sym", 2),
    FormatSpec("int2_asym", 2, asymmetric=True),
    FormatSpec("nf4", 4, grid="table", levels="nf4"),
    FormatSpec("mxfp4", 4, grid="table", levels="e2m1", scale_bits=8, block=32, default_group=32),
    *(FormatSpec(name, bits, grid="ggml", block=block, default_group=block) for name, bits, block in (
        ("q4_0", 4, 32), ("q4_1", 4, 32), ("q5_0", 5, 32), ("q5_1", 5, 32), ("q8_0", 8, 32), ("q4_k", 4, 256),
        ("q6_k", 6, 256))),
)}


def refuse_modes(config, backend: str, held, fix: str) -> None:
    """A one-line error, before any work, when `config` (a CompressionConfig, or None) assigns a mode
    the `backend` cannot store: `held(spec)` says which descriptions it can."""
    if config is None:
        return
    backup = config.backup_mode.mode if config.backup_mode is not None else None
    for mode in (config.mode, backup):
        if mode is not None and FORMATS[str(mode)].ggml:
            raise QCompilerError(f"the {backend} format cannot store GGUF {mode} blocks: write them with "
                                 f"--format gguf:{mode}, or pick a --weight-format such as int4_sym")
        if mode is not None and not held(FORMATS[str(mode)]):
            raise QCompilerError(f"the {backend} format cannot store {mode} weights: {fix}")


LOW_BIT_FIX = ("2- and 3-bit codes are written by the checkpoint formats (--format gptq, gptq_v2, auto_round or "
               "compressed-tensors); for this format use a 4- or 8-bit mode such as int4_sym")


def refuse_float_zero_point(const, backend: str, fix: str = "use --format openvino") -> None:
    """A one-line error when a weight kept from a GGUF (q4_1 / q4_k) carries a float zero point where
    the `backend` has no kernel for one."""
    cw = const.meta.get("compressed")
    zero = getattr(cw, "zero_point", None)
    if zero is not None and zero.is_floating_point():
        raise QCompilerError(f"{const.attrs['weight']} keeps GGUF blocks with a float zero point (q4_1 / q4_k), "
                             f"which {backend} does not store: {fix}, or re-quantize with --weight-format int4")
