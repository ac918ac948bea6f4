"""A pass's user-facing options, declared once on the pass and derived everywhere else.

A pass that a user switches on declares, as class attributes:
- `flag`: its command-line switch (`--gptq`) and `help`; `needs_data` (calibration data required),
  `conflicts` (names of passes it cannot run with), `modes` with `modes_reason` (the weight formats
  it takes, and why others are refused);
- its `Options` dataclass: each field with `metadata={"help": ...}` is a user option, with the
  command-line flag `<flag>-<field name>` (or `metadata["flag"]`), its type from the annotation
  (int, float, bool, str), its default from the field, and optional bounds `min` / `above`.
From that, for built-in and plugin passes alike: the command line gets the flags (`add_flags`,
`from_args`), `CompressionConfig(passes={"gptq": {"damp": 0.05}})` takes the same options,
validation (`validate`) refuses unknown options, wrong types, conflicting passes, a missing dataset
and unsupported modes with one line each, the pipeline builds the pass with its `Options`, and the
report records them (each pass's summary "options").
"""

from __future__ import annotations

import dataclasses
import functools
import typing

from qcompiler.errors import QCompilerError

TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def user_options(cls) -> list[dataclasses.Field]:
    """The declared user options of pass class `cls` (Options fields with a "help")."""
    options = getattr(cls, "Options", None)
    if options is None or not dataclasses.is_dataclass(options):
        return []
    return [f for f in dataclasses.fields(options) if "help" in f.metadata]


def option_flag(cls, f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or f"{cls.flag}-{f.name.replace('_', '-')}"


def _type(cls, f: dataclasses.Field) -> type:
    hints = typing.get_type_hints(cls.Options)
    kind = hints.get(f.name, str)
    return kind if kind in TYPES.values() else TYPES.get(str(kind), str)


def switchable(registry) -> list:
    """Pass classes a user switches on, in registry order."""
    return [cls for cls in registry.passes.values() if getattr(cls, "flag", None)]


def add_flags(parser, registry) -> None:
    """Each switchable pass's flag and option flags on an argparse (sub)parser. A plugin whose flag is
    malformed or taken is refused in one line, naming it."""
    import argparse

    for cls in switchable(registry):
        flags = [cls.flag] + [option_flag(cls, f) for f in user_options(cls)]
        bad = next((f for f in flags if not (isinstance(f, str) and f.startswith("--") and len(f) > 2)), None)
        if bad is not None:
            raise QCompilerError(f"the pass '{cls.name}' declares the flag {bad!r}: a flag is '--name'; fix or "
                                 "uninstall its plugin")
        try:
            if getattr(cls, "default_with_data", False) and cls.name in _switches():  # --flag / --no-flag
                parser.add_argument(cls.flag, dest=f"pass__{cls.name}", action=argparse.BooleanOptionalAction,
                                    default=None, help=_escape(getattr(cls, "help", None)))
            else:
                parser.add_argument(cls.flag, dest=f"pass__{cls.name}", action="store_true", default=None,
                                    help=_escape(getattr(cls, "help", None)))
            for f in user_options(cls):
                kind = _type(cls, f)
                default = f.default if f.default is not dataclasses.MISSING else None
                extra = ({"action": argparse.BooleanOptionalAction} if kind is bool
                         else {"type": kind, "metavar": f.name.upper()})
                parser.add_argument(option_flag(cls, f), dest=f"pass__{cls.name}__{f.name}", default=None,
                                    help=_escape(f"{f.metadata['help']} (default {default}; with {cls.flag})"), **extra)
        except argparse.ArgumentError as exc:
            raise QCompilerError(f"the pass '{cls.name}' declares a flag another option has ({exc}): fix or "
                                 "uninstall its plugin") from None


def _switches() -> tuple[str, ...]:
    """The built-in passes with a config field of their own: only they can be on by default
    (`default_with_data`, resolved by `CompressionConfig.switch`)."""
    from qcompiler.config import SWITCHES

    return SWITCHES


def _escape(text):
    return None if text is None else str(text).replace("%", "%%")


def from_args(args, registry) -> dict[str, dict]:
    """{pass name: {option: value}} for the passes switched on; an option flag without its pass's flag
    is refused."""
    out = {}
    for cls in switchable(registry):
        on = bool(getattr(args, f"pass__{cls.name}", False))
        given = {f.name: getattr(args, f"pass__{cls.name}__{f.name}") for f in user_options(cls)
                 if _given(getattr(args, f"pass__{cls.name}__{f.name}", None))}
        if given and not on and getattr(cls, "switched_on_by_options", False):
            on = True  # AutoRound's --recipe / --iters alone mean AutoRound, as in its own command line
        if given and not on:
            flag = option_flag(cls, next(f for f in user_options(cls) if f.name in given))
            raise QCompilerError(f"{flag} is an option of {cls.flag}: add {cls.flag} or drop {flag}")
        if on:
            out[cls.name] = given
    return out


def switches(args, registry, names) -> dict[str, bool | None]:
    """{name: True / False / None (unset)} of the built-in switches `names` on the command line."""
    out = {}
    for name in names:
        cls = registry.passes.get(name)
        value = getattr(args, f"pass__{name}", None)
        out[name] = value if value is not None or (cls is not None and getattr(cls, "default_with_data", False)) \
            else False  # a switch without a default of its own is off unless typed
    return out


def any_given(args, ignore=()) -> bool:
    """Whether any pass flag or option was typed (the switches of passes in `ignore` excepted)."""
    skip = {f"pass__{name}" for name in ignore}
    return any(_given(v) for k, v in vars(args).items() if k.startswith("pass__") and k not in skip)


def _given(value) -> bool:
    return value is not None  # every pass flag defaults to None: 0 and False (--no-...) were typed


def validate(config, registry, passes: dict | None = None) -> dict[str, dict]:
    """The switched-on passes (default: all the config's) with their options checked and typed;
    one-line errors. Whether data is needed is `needing_data`'s."""
    passes = config.switched_on() if passes is None else passes
    for name in passes:
        cls = registry.pass_class(name)  # an unknown name: one line listing the installed passes
        if name in config.passes and not getattr(cls, "flag", None) and name not in config.extra_passes:
            raise QCompilerError(f"the pass '{name}' is not one a user switches on through passes (it declares no "
                                 "flag): use its own option (such as awq=True) or extra_passes")
    out = {}
    for name, values in passes.items():
        cls = registry.passes[name]
        fields = {f.name: f for f in user_options(cls)}
        typed = {}
        for key, value in dict(values or {}).items():
            f = fields.get(key)
            if f is None:
                raise QCompilerError(f"{_label(cls)} has no option '{key}' (its options: {', '.join(fields) or 'none'})")
            typed[key] = _coerce(cls, f, value)
        out[name] = typed
    for name in out:
        cls = registry.passes[name]
        for other in getattr(cls, "conflicts", ()):
            if other in out:
                raise QCompilerError(f"{_label(cls)} and {_label(registry.passes[other])} cannot be combined (as in "
                                     f"NNCF): drop one of them")
        modes = getattr(cls, "modes", None)
        if modes and config.mode is not None and config.mode not in modes:
            raise QCompilerError(f"{getattr(cls, 'modes_reason', _label(cls) + ' takes other modes')}; {config.mode} "
                                 f"is not one of them: drop {_label(cls)} or pick "
                                 f"{' / '.join(m.value for m in modes)}")
    return out


def refuse_without_data(needs: list[str], dataset) -> None:
    """The one-line error for options (`needs`: their flags) that need calibration data none was given."""
    if needs and dataset is None:
        raise QCompilerError(f"{', '.join(needs)} need calibration data: add --dataset FILE (a plain-text file) "
                             "or --dataset auto (text the model writes itself)")


def needing_data(passes: dict, registry) -> list[str]:
    """The flags of the passes in `passes` that need calibration data."""
    return [_label(registry.passes[name]) for name in passes if getattr(registry.passes[name], "needs_data", False)]


def _coerce(cls, f, value):
    kind = _type(cls, f)
    try:
        if kind is bool and not isinstance(value, bool):
            raise ValueError
        typed = kind(value)
        if kind in (int, float) and isinstance(value, bool) or kind is int and typed != value:
            raise ValueError
    except (TypeError, ValueError):
        raise QCompilerError(f"{option_flag(cls, f)} takes {kind.__name__}, not {value!r}") from None
    choices = f.metadata.get("choices")
    if choices is not None and typed not in choices:
        raise QCompilerError(f"{option_flag(cls, f)} {typed!r} is not one of {', '.join(map(str, choices))}")
    low = f.metadata.get("min")
    if low is not None and typed < low:
        raise QCompilerError(f"{option_flag(cls, f)} {typed} is below {low}: {f.metadata['help']}")
    above = f.metadata.get("above")
    if above is not None and typed <= above:
        raise QCompilerError(f"{option_flag(cls, f)} {typed} must be above {above}: {f.metadata['help']}")
    return typed


def _label(cls) -> str:
    return getattr(cls, "flag", None) or cls.name


@functools.lru_cache(maxsize=1)
def installed():
    """The registry of installed plugins (entry points), for checks at config construction."""
    from qcompiler.registry import build_registry

    return build_registry()
