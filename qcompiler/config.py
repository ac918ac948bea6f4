"""User-facing configuration: plain frozen dataclasses, validated once, before any work is done.

Names and defaults follow NNCF's `compress_weights` and `optimum-cli export openvino`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

from qcompiler.errors import QCompilerError
from qcompiler.formats import FORMATS, FormatSpec


class Mode(str, Enum):
    """A weight format's name; what the format is lives in its description (`qcompiler.formats`)."""

    INT8_ASYM = "int8_asym"
    INT8_SYM = "int8_sym"
    INT4_SYM = "int4_sym"
    INT4_ASYM = "int4_asym"
    INT3_SYM = "int3_sym"
    INT3_ASYM = "int3_asym"
    INT2_SYM = "int2_sym"
    INT2_ASYM = "int2_asym"
    NF4 = "nf4"
    MXFP4 = "mxfp4"
    Q4_0 = "q4_0"  # GGUF block types (qcompiler.ggml): written by the gguf format only
    Q4_1 = "q4_1"
    Q5_0 = "q5_0"
    Q5_1 = "q5_1"
    Q8_0 = "q8_0"
    Q4_K = "q4_k"
    Q6_K = "q6_k"

    @property
    def spec(self) -> FormatSpec:
        return FORMATS[self.value]

    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def integer(self) -> bool:
        """Codes on a uniform integer grid (scale and zero point), not a table of levels (NF4, MXFP4)."""
        return self.spec.integer

    @property
    def asymmetric(self) -> bool:
        return self.spec.asymmetric

    @property
    def low_bit(self) -> bool:
        return self.spec.low_bit

    @property
    def scale_bits(self) -> int:
        """Bits of one stored scale: f16, or an e8m0 exponent for MX formats."""
        return self.spec.scale_bits

    def __str__(self) -> str:
        return self.value


def check_patterns(patterns, what: str, fix: str) -> None:
    """Each of `patterns` compiles as a regular expression, else a one-line error naming `what` and `fix`."""
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise QCompilerError(f"{what} '{pattern}' is not a valid regular expression ({exc}): {fix}") from None


@dataclass(frozen=True)
class WeightFormat:
    """The format one weight is assigned: a mode and a group size (-1 = per output channel)."""

    mode: Mode
    group_size: int

    def __str__(self) -> str:
        return f"{self.mode}/{'per-channel' if self.group_size == -1 else f'g{self.group_size}'}"


class BackupMode(str, Enum):
    """What weights outside the primary precision become."""

    INT8_ASYM = "int8_asym"
    INT8_SYM = "int8_sym"
    NONE = "none"

    @property
    def mode(self) -> Mode | None:
        return None if self is BackupMode.NONE else Mode(self.value)


class SensitivityMetric(str, Enum):
    """How ratio < 1 ranks the ratio-defining weights (NNCF's `SensitivityMetric`)."""

    WEIGHT_QUANTIZATION_ERROR = "weight_quantization_error"
    HESSIAN_INPUT_ACTIVATION = "hessian_input_activation"
    MEAN_ACTIVATION_VARIANCE = "mean_activation_variance"
    MAX_ACTIVATION_VARIANCE = "max_activation_variance"
    MEAN_ACTIVATION_MAGNITUDE = "mean_activation_magnitude"

    @property
    def data_aware(self) -> bool:
        return self is not SensitivityMetric.WEIGHT_QUANTIZATION_ERROR


class GroupSizeFallback(str, Enum):
    """What to do with a layer whose input channels the group size does not divide."""

    ADJUST = "adjust"
    IGNORE = "ignore"
    ERROR = "error"


@dataclass(frozen=True)
class Subgraph:
    """Every node on a path from one of `inputs` to one of `outputs` (node names)."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class IgnoredScope:
    """Nodes to leave in float: exact names, regex patterns, op types and subgraphs."""

    names: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    subgraphs: tuple[Subgraph, ...] = ()
    validate: bool = True

    def __post_init__(self) -> None:
        check_patterns(self.patterns, "--ignored-scope-pattern", "fix the pattern (names are matched with Python's "
                       "re.match)")

    def __bool__(self) -> bool:
        return bool(self.names or self.patterns or self.types or self.subgraphs)


@dataclass(frozen=True)
class LoadOptions:
    """How a model is read. Nothing from a model folder runs unless asked: a folder's own Python
    code (transformers' `auto_map`) needs `trust_remote_code`, pickle weights (`pytorch_model.bin`,
    which can carry code) need `allow_pickle`; safetensors, GGUF, ONNX and OpenVINO files need neither."""

    trust_remote_code: bool = False
    allow_pickle: bool = False
    # the backend reads weight values from the IR when lowering (its `lazy_weights`): a frontend may
    # then leave large weights as placeholders, read when a pass needs them
    lazy_weights: bool = False
    # optimum's task (text-generation-with-past, feature-extraction, text-classification); None: read from
    # the model's config (its architectures), as optimum-cli does
    task: str | None = None
    # model_type -> qcompiler.model_spec.ModelSpec, from the registry's plugins
    model_specs: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class CompressionConfig:
    """What to compress and how; `group_size=None` takes the mode's default (NNCF's defaults).

    `group_size_fallback=None` (not asked) adjusts the layers the group size does not divide, as
    ADJUST does, but a group size the user gave must be a power of two and must divide at least
    one layer; naming a fallback accepts any positive group size.

    `mode=None` compresses nothing: the backend writes the float model (optimum's `fp32`), the
    baseline a compressed artifact is measured against; with `int8_above` set, a model of at least
    that many weight parameters is compressed to int8_asym instead (optimum-intel's rule when no
    weight format is given; the pipeline decides after tracing). `keep=True` (with `mode=None`) lowers
    an already-quantized input (GGUF, GPTQ, AWQ, auto_round, compressed-tensors) with its own codes
    (the `keep` pass), compressing nothing again.

    Activations (`quant_mode`, optimum-cli's `--quant-mode`): "int8" quantizes the inputs of the
    transformer blocks' Linear layers to u8, per tensor, with ranges from the calibration data (static;
    `dataset` required), "int8-dynamic" lets the runtime take each input's range per call (no data
    needed). Their weights are int8_sym per output channel (NNCF's MIXED preset): the default mode
    int8_asym becomes int8_sym. `smooth_quant_alpha` (a number in [0, 1], "auto" to search it per
    layer on the data, or "off") moves activation outliers into the weights first (SmoothQuant); the
    default is "auto" with data and "off" without. Static ranges: `activation_range` "minmax" (the
    default: min and max over the calibration tokens) or "percentile" (the (100 - P)-th and P-th
    percentiles of all the input's values, P = `activation_percentile`, default 99.99, NNCF's quantile
    estimator); `activation_max_error` (default 0.05) is the relative output error above which a
    layer keeps float activations.

    `backup_scope` matches weights that skip the primary precision and take the backup one (the
    first stage of a two-stage config such as gpt-oss's: attention and router in int8).

    Data-aware compression: `dataset` is a text file, `auto` (text the model writes), a local
    `datasets` name, or a list of strings / token sequences; `num_samples` chunks of `seqlen`
    tokens are taken from it. `awq` then searches its scales on the data; `scale_estimation`,
    `gptq` and a data-aware `sensitivity_metric` need it (the metric defaults to
    max_activation_variance with data, weight_quantization_error without, as NNCF).
    `scale_estimation=None` (the default) turns it on when a dataset is given and the mode is one it
    takes (the 4-bit ones): data given is used to refit the 4-bit scales, unlike NNCF, which then only
    ranks layers; `scale_estimation=False` gives NNCF's round to nearest.
    """

    mode: Mode | None = Mode.INT8_ASYM
    group_size: int | None = None
    ratio: float = 1.0
    backup_mode: BackupMode = BackupMode.INT8_ASYM
    all_layers: bool = False
    ignored_scope: IgnoredScope = field(default_factory=IgnoredScope)
    group_size_fallback: GroupSizeFallback | None = None
    awq: bool = False
    dataset: str | None = None
    extra_passes: tuple[str, ...] = ()
    backup_scope: IgnoredScope = field(default_factory=IgnoredScope)
    int8_above: int | None = None
    scale_estimation: bool | None = None  # None: on with a dataset and a 4-bit mode (see above)
    gptq: bool = False
    lora_correction: bool = False
    num_samples: int | None = None
    seqlen: int | None = None
    sensitivity_metric: SensitivityMetric | None = None
    statistics_path: str | None = None
    passes: dict = field(default_factory=dict)
    keep: bool = False
    quant_mode: str | None = None
    smooth_quant_alpha: float | str | None = None
    activation_range: str | None = None
    activation_percentile: float | None = None
    activation_max_error: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.dataset, list):
            object.__setattr__(self, "dataset", tuple(self.dataset))
        for name, enum in (("mode", Mode), ("backup_mode", BackupMode), ("group_size_fallback", GroupSizeFallback),
                           ("sensitivity_metric", SensitivityMetric)):
            value = getattr(self, name)
            if value is None and name in ("mode", "group_size_fallback", "sensitivity_metric"):
                continue
            if not isinstance(value, enum):
                object.__setattr__(self, name, parse_enum(enum, value, name))
        if self.quant_mode is not None and self.mode is Mode.INT8_ASYM:  # the default: activations want sym weights
            object.__setattr__(self, "mode", Mode.INT8_SYM)
        self._validate()

    @property
    def effective_group_size(self) -> int:
        """The group size in force: the one given, or the mode's default."""
        return default_group_size(self.mode) if self.group_size is None else self.group_size

    @property
    def metric(self) -> SensitivityMetric:
        """The sensitivity metric in force (NNCF's default: max_activation_variance with data)."""
        if self.sensitivity_metric is not None:
            return self.sensitivity_metric
        return (SensitivityMetric.MAX_ACTIVATION_VARIANCE if self.dataset is not None
                else SensitivityMetric.WEIGHT_QUANTIZATION_ERROR)

    @property
    def samples(self) -> tuple[int, int]:
        """(num_samples, seqlen) in force."""
        from qcompiler.calibration import DEFAULT_NUM_SAMPLES, DEFAULT_SEQLEN

        from qcompiler import pass_options

        samples, seqlen = DEFAULT_NUM_SAMPLES, DEFAULT_SEQLEN
        registry = pass_options.installed()
        for name in [*dict(self.passes), *self.extra_passes]:  # a pass may bring its own (AutoRound's recipes)
            defaults = getattr(registry.passes.get(name), "calibration_defaults", None)
            if defaults is not None:
                samples, seqlen = defaults(dict(dict(self.passes).get(name) or {}))
        return (samples if self.num_samples is None else self.num_samples,
                seqlen if self.seqlen is None else self.seqlen)

    @property
    def fallback(self) -> GroupSizeFallback:
        return self.group_size_fallback or GroupSizeFallback.ADJUST

    @property
    def strict_group_size(self) -> bool:
        """A group size the user gave, with no fallback asked for: it must divide some layer."""
        return self.group_size is not None and self.group_size_fallback is None

    def replace(self, **changes) -> CompressionConfig:
        return dataclasses.replace(self, **changes)

    def _validate(self) -> None:
        if not 0.0 <= self.ratio <= 1.0:
            raise QCompilerError(f"ratio {self.ratio} is outside [0, 1]: pass a fraction such as --ratio 0.8")
        if self.int8_above is not None and self.mode is not None:
            raise QCompilerError("int8_above decides the format of a config without one: leave mode unset")
        self._validate_activations()
        self._validate_data_aware()
        if self.keep and (self.mode is not None or self.awq or self.ratio != 1.0 or self.group_size is not None
                          or self.dataset is not None or self.int8_above is not None or self.switched_on()):
            raise QCompilerError("keep lowers the input's own codes and compresses nothing again: pass it alone "
                                 "(mode=None; drop --ratio, --group-size, --awq and the data-aware options)")
        if self.mode is None:
            if self.awq or self.ratio != 1.0 or self.all_layers or self.dataset is not None:
                raise QCompilerError("fp32 keeps every weight in float: drop --awq, --ratio, --all-layers and the "
                                     "data-aware options, or pick a compressed weight format such as int4")
            return
        group_size = self.effective_group_size
        if group_size == 0 or group_size < -1:
            raise QCompilerError(
                f"group size {group_size} is invalid: use a positive group size such as 64 or 128, "
                "or -1 for one scale per output channel"
            )
        if group_size > 0 and group_size & (group_size - 1) and self.group_size_fallback is None:
            raise QCompilerError(
                f"group size {group_size} is not a power of two: use 32, 64 or 128 (every backend's kernels take "
                "powers of two), or add --group-size-fallback adjust to accept it where it divides a layer"
            )
        if not self.mode.low_bit and not self.mode.spec.ggml:  # GGUF's q8_0 comes in blocks of 32
            calibrated = self.dataset is not None and self.quant_mode is None  # activation ranges take data
            if self.ratio != 1.0 or group_size != -1 or self.all_layers or self.awq or calibrated:
                raise QCompilerError(
                    f"{self.mode} is per-channel for every layer: drop --ratio, --group-size, --all-layers, "
                    "--awq and the data-aware options (as NNCF), or pick a 4-bit mode such as int4_sym"
                )
        block = self.mode.spec.block
        if block is not None and group_size != block:
            raise QCompilerError(
                f"{self.mode} uses blocks of {block}, not {group_size}: drop --group-size or pass {block}"
            )
        if self.awq and self.mode is Mode.MXFP4:
            raise QCompilerError("AWQ is not available for mxfp4 (NNCF refuses it too): drop it or use int4_sym / "
                                 "int4_asym / nf4")

    @property
    def smoothing(self) -> float | str | None:
        """SmoothQuant's alpha in force: a number, "auto", or None (off)."""
        if self.quant_mode is None or self.smooth_quant_alpha == "off":
            return None
        if self.smooth_quant_alpha is None:
            return "auto" if self.dataset is not None else None
        return self.smooth_quant_alpha

    @property
    def range_percentile(self) -> float | None:
        """The percentile of the static activation ranges, or None for min / max."""
        if self.activation_range != "percentile":
            return None
        return DEFAULT_PERCENTILE if self.activation_percentile is None else float(self.activation_percentile)

    def _validate_ranges(self) -> None:
        refuse_range_options({name: getattr(self, name) for name in RANGE_OPTIONS}, self.quant_mode)
        if self.activation_range not in (None, "minmax", "percentile"):
            raise QCompilerError(f"--activation-range {self.activation_range!r}: choose minmax or percentile")
        p = self.activation_percentile
        if p is not None:
            if self.activation_range != "percentile":
                raise QCompilerError("--activation-percentile is the percentile of --activation-range percentile: add "
                                     "--activation-range percentile, or drop it")
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 50.0 < p <= 100.0:
                raise QCompilerError(f"--activation-percentile {p!r} is outside (50, 100]: pass a value such as 99.99 "
                                     "(100 is min / max)")
        e = self.activation_max_error
        if e is not None and (isinstance(e, bool) or not isinstance(e, (int, float)) or not e >= 0):
            raise QCompilerError(f"--activation-max-error {e!r} is not a relative error: pass a number >= 0 such "
                                 "as 0.05 (0 keeps every layer whose quantized output differs at all in float)")

    def _validate_activations(self) -> None:
        self._validate_ranges()
        alpha = self.smooth_quant_alpha
        if self.quant_mode is None:
            if alpha is not None:
                raise QCompilerError("--smooth-quant-alpha smooths activations before they are quantized: add "
                                     "--quant-mode int8 (with --dataset), or drop it")
            return
        if self.quant_mode not in QUANT_MODES:
            raise QCompilerError(f"unknown quant mode {self.quant_mode!r}: choose one of {', '.join(QUANT_MODES)}")
        if self.mode is not Mode.INT8_SYM:
            raise QCompilerError(f"--quant-mode {self.quant_mode} quantizes the weights to int8_sym per channel, not "
                                 f"{self.mode}: drop --weight-format (int4 weights with int8 activations: "
                                 "--weight-format int4 --onnx-accuracy-level 4 on onnxruntime)")
        if self.quant_mode == "int8" and self.dataset is None:
            raise QCompilerError("--quant-mode int8 sets each activation's range from calibration data: add --dataset "
                                 "FILE (a plain-text file), or --dataset auto (text the model writes itself)")
        if isinstance(alpha, str) and alpha not in ("auto", "off"):
            try:
                alpha = float(alpha)
            except ValueError:
                raise QCompilerError(f"--smooth-quant-alpha {alpha!r} is not a number: pass a value in [0, 1], auto "
                                     "or off") from None
            object.__setattr__(self, "smooth_quant_alpha", alpha)
        if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
            if not 0.0 <= alpha <= 1.0:
                raise QCompilerError(f"--smooth-quant-alpha {alpha} is outside [0, 1]: pass a value such as 0.5, auto "
                                     "(searched per layer) or off")
        elif alpha is not None and alpha not in ("auto", "off"):
            raise QCompilerError(f"smooth_quant_alpha {alpha!r}: pass a number in [0, 1], 'auto' or 'off'")
        if self.smoothing is not None and self.dataset is None:
            raise QCompilerError(f"--smooth-quant-alpha {alpha} scales activations by their calibration ranges: add "
                                 "--dataset FILE (or --dataset auto), or drop it")

    def switched_on(self) -> dict[str, dict]:
        """{pass name: options} of the passes this config switches on. A built-in with its own field
        (`gptq`, ...) is on when the field is True, or when it is None and the pass is on by default
        (`on_by_default`), with its options from `passes`; any other pass is on when `passes` names it
        or it is in `extra_passes` (with its default options)."""
        on = {name: dict(values or {}) for name, values in dict(self.passes).items() if name not in SWITCHES}
        for name in self.extra_passes:
            on.setdefault(name, {})
        for name in SWITCHES:
            if self.switch(name):
                on[name] = dict(self.passes.get(name) or {})
        return on

    def switch(self, name: str) -> bool:
        """Whether the built-in pass `name` (one of SWITCHES) runs: its field, or when that is None,
        `on_by_default`."""
        value = getattr(self, name)
        return self.on_by_default(name) if value is None else bool(value)

    def on_by_default(self, name: str) -> bool:
        """Whether the built-in pass `name`, left unset (None), runs: it declares `default_with_data`,
        a dataset is given and the mode is one the pass takes."""
        from qcompiler import pass_options

        registry = pass_options.installed()
        cls = registry.passes.get(name)
        chosen = set(dict(self.passes)) | set(self.extra_passes)
        if any(name in getattr(registry.passes.get(other), "conflicts", ()) for other in chosen):
            return False  # a pass that replaces it is on (AutoRound instead of scale estimation)
        return (cls is not None and getattr(cls, "default_with_data", False) and self.dataset is not None
                and self.mode in getattr(cls, "modes", ()))

    def _validate_data_aware(self) -> None:
        from qcompiler import pass_options

        for name, values in dict(self.passes).items():
            if values is not None and not isinstance(values, Mapping):
                raise QCompilerError(f"passes['{name}'] is {values!r}: give a dict of its options, such as "
                                     f"passes={{'{name}': {{}}}}")
            if name in SWITCHES and not self.switch(name):
                raise QCompilerError(f"passes['{name}'] sets options of {name}, which is off: add {name}=True "
                                     "(or drop them)")
        registry = pass_options.installed()  # plugin passes of another registry are checked by `compress`
        typed = pass_options.validate(self, registry, {k: v for k, v in self.switched_on().items()
                                                       if k in registry.passes})
        object.__setattr__(self, "passes", {k: typed.get(k, dict(v or {})) for k, v in dict(self.passes).items()})
        pass_flags = pass_options.needing_data(typed, registry)
        needs = pass_flags + [flag for flag, on in (("--num-samples", self.num_samples is not None),
                                       ("--seqlen", self.seqlen is not None),
                                       ("--quantization-statistics-path", self.statistics_path is not None)) if on]
        if self.sensitivity_metric is not None and self.sensitivity_metric.data_aware:
            needs.append(f"--sensitivity-metric {self.sensitivity_metric.value}")
        pass_options.refuse_without_data(needs, self.dataset)
        if self.dataset is not None:
            from qcompiler.calibration import check_counts

            check_counts(*self.samples)


SWITCHES = ("scale_estimation", "gptq", "lora_correction")  # built-in passes with their own config field
QUANT_MODES = ("int8", "int8-dynamic")  # optimum-cli's --quant-mode int8, and its dynamic variant
DEFAULT_PERCENTILE = 99.99  # --activation-range percentile: NNCF's quantile estimator clips at 1e-4 and 1 - 1e-4
RANGE_OPTIONS = ("activation_range", "activation_percentile", "activation_max_error")  # static ranges' options


def refuse_range_options(values: dict, quant_mode: str | None) -> None:
    """The one-line error for static range options (`values`: option -> value, None if not given) without
    --quant-mode int8."""
    given = [f"--{name.replace('_', '-')}" for name, value in values.items() if value is not None]
    if given and quant_mode != "int8":
        raise QCompilerError(f"{', '.join(given)} set{'s' if len(given) == 1 else ''} static activation ranges: add "
                             f"--quant-mode int8 (with --dataset), or drop {'it' if len(given) == 1 else 'them'}" + (
                                 " (int8-dynamic takes each range per call)" if quant_mode else ""))


def default_group_size(mode: Mode | None) -> int:
    return 128 if mode is None else mode.spec.default_group


def parse_enum(enum: type[Enum], value, what: str):
    try:
        return enum(str(value).lower())
    except ValueError:
        choices = ", ".join(member.value for member in enum)
        raise QCompilerError(f"unknown {what} '{value}': choose one of {choices}") from None
