"""Per-model defaults, as optimum-intel applies them: `--weight-format int4` (or int8) with no other
compression option takes the model's row of `model_defaults.json`; no weight format at all gives
int8_asym to a model of at least a billion weight parameters and leaves a smaller one in float.

A row is found by model id: `--model-id`, else the folder's `config.json` `_name_or_path`, a Hugging
Face cache path (`models--Org--Name/snapshots/...`), or a folder named as the id's last part
(optimum's rules). The rows keep optimum-intel's key names, so a row copied from its table works.
What a row asks that qcompiler cannot do yet (a calibration dataset, scale estimation, data-aware
AWQ) is skipped and named in the report's "defaults" and the command's last lines.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from qcompiler.config import CompressionConfig, IgnoredScope
from qcompiler.errors import QCompilerError

TABLE = Path(__file__).with_name("model_defaults.json")
INT8_ABOVE = 10**9  # optimum-intel's _MAX_UNCOMPRESSED_SIZE: weight parameters from which no format means int8
GENERIC_INT4 = {"bits": 4, "sym": False, "group_size": 128, "ratio": 1.0}  # optimum-intel's _DEFAULT_4BIT_WQ_CONFIG
KNOWN_KEYS = {"bits", "sym", "group_size", "ratio", "all_layers", "quant_method", "dataset", "scale_estimation",
              "dq_group_size", "group_size_fallback", "backup_precision", "ignored_scope", "then", "text_part_of"}
AUTO_DATA = "auto"
OVERRIDE = "pass --sym, --group-size, --ratio or --awq to choose yourself"


@dataclass
class Defaults:
    """What was applied and why, for the report's "defaults" and the command's last lines."""

    applied: str
    model_id: str | None = None
    row: dict | None = None
    skipped: list[str] = field(default_factory=list)
    override: str = OVERRIDE

    @property
    def dq_group_size(self) -> int | None:
        """The row's OpenVINO runtime hint (DYNAMIC_QUANTIZATION_GROUP_SIZE), for the openvino backend."""
        return (self.row or {}).get("dq_group_size")

    def as_dict(self) -> dict:
        return {"applied": self.applied, "model_id": self.model_id, "row": self.row, "skipped": self.skipped,
                "override": self.override}

    def lines(self) -> list[str]:
        out = [f"defaults: {self.applied}"]
        out += [f"defaults: skipped {what}" for what in self.skipped]
        out.append(f"defaults: {self.override}")
        return out


@cache
def table() -> dict:
    try:
        data = json.loads(TABLE.read_text())
    except (OSError, ValueError) as exc:
        raise QCompilerError(f"the per-model defaults table {TABLE} cannot be read ({exc}): reinstall "
                             "qcompiler") from None
    for section in ("int4", "int8"):
        for model_id, row in data[section].items():
            unknown = set(row) - KNOWN_KEYS
            if unknown:
                raise QCompilerError(f"{TABLE}: row {model_id} has keys qcompiler does not know "
                                     f"({', '.join(sorted(unknown))}): fix the row")
    return data


def model_ids(model, model_id: str | None) -> list[str]:
    """The ids a model may be known by, most specific first."""
    if model_id:
        return [model_id]
    if model is None:
        return []
    path = Path(model)
    ids = [str(model)]
    config = path / "config.json"
    if config.is_file():
        try:
            name = json.loads(config.read_text()).get("_name_or_path")
        except (OSError, ValueError, AttributeError):
            name = None
        if isinstance(name, str) and name:
            ids.append(name)
    for part in path.resolve().parts:
        hub = re.fullmatch(r"models--([^/]+?)--(.+)", part)
        if hub:
            ids.append(f"{hub.group(1)}/{hub.group(2)}")
    return ids


def find(weight_format: str, model, model_id: str | None) -> tuple[str, dict] | None:
    rows = table()[weight_format]
    for candidate in model_ids(model, model_id):
        if candidate in rows:
            return candidate, rows[candidate]
    if model_id is None and model is not None:
        name = Path(model).resolve().name
        for candidate, row in rows.items():
            if candidate.split("/")[-1] == name:
                return candidate, row
    return None


def apply_row(row: dict, base: dict) -> tuple[dict, list[str]]:
    """CompressionConfig arguments for `row` on top of `base`, and what of the row was skipped."""
    args, skipped = dict(base), []
    bits = row.get("bits", 4)
    args["mode"] = f"int{bits}_{'sym' if row.get('sym') else 'asym'}"
    if bits == 4:
        args["group_size"] = row.get("group_size", 128)
        args["ratio"] = row.get("ratio", 1.0)
        args["all_layers"] = bool(row.get("all_layers"))
        # a row's group size is not the user's: a layer it does not divide adjusts, and none need divide
        args["group_size_fallback"] = row.get("group_size_fallback") or "adjust"
    if row.get("backup_precision"):
        args["backup_mode"] = row["backup_precision"]
    data = row.get("dataset")
    if row.get("quant_method") == "awq":
        args["awq"] = True
    args["scale_estimation"] = bool(row.get("scale_estimation"))  # the row's config exactly, not the data default
    data_aware = args.get("awq") or args.get("scale_estimation") or row.get("ratio", 1.0) < 1.0
    if data and data_aware:
        # the row's dataset (wikitext2) needs the hub: the model writes its own calibration text instead
        args["dataset"] = AUTO_DATA
        skipped.append(f"the row's calibration dataset '{data}' (it needs the hub): the model's own text "
                       f"(--dataset auto) calibrates instead; to calibrate on a file, pass the whole config yourself "
                       "(--dataset FILE with --sym, --group-size, --ratio, --awq, --scale-estimation)")
    elif data:
        skipped.append(f"the calibration dataset '{data}' (no data-aware algorithm of the row runs without it)")
    scope = row.get("ignored_scope") or {}
    if scope:
        if row.get("then"):  # two stages: the scope skips the 4-bit stage, then takes the second stage's format
            then = row["then"]
            args["backup_scope"] = as_scope(scope)
            args["backup_mode"] = f"int8_{'sym' if then.get('sym') else 'asym'}"
        else:
            args["ignored_scope"] = merged_scope(base.get("ignored_scope"), scope)
    if row.get("text_part_of"):
        skipped.append("the multimodal parts other than the language model (qcompiler compresses text models)")
    return args, skipped


def resolve(weight_format: str | None, explicit: bool, model, model_id: str | None, base: dict
            ) -> tuple[CompressionConfig | None, Defaults | None]:
    """The config and what was applied, when a default applies; (None, None) when the user's own
    options decide. `explicit`: the user passed a compression option besides the weight format."""
    if weight_format is None:
        if explicit:
            raise QCompilerError("compression options were given without a weight format: add --weight-format "
                                 "int4 (or int8, nf4, ...), as optimum-cli asks")
        config = CompressionConfig(mode=None, int8_above=INT8_ABOVE, **base)
        return config, Defaults(
            "no --weight-format: int8_asym if the model has at least 1 billion parameters, "
            "else float (optimum-intel's rule)", override="pass --weight-format int4 / int8 / fp32 to choose")
    if weight_format not in ("int4", "int8") or explicit:
        return None, None
    found = find(weight_format, model, model_id)
    if found is None:
        if weight_format == "int8":
            return None, None
        config = CompressionConfig(**apply_row(GENERIC_INT4, base)[0])
        named = f"--model-id {model_id} is not in the table" if model_id else "no per-model default for this model"
        return config, Defaults(f"{named}: the generic int4 default (int4_asym, group size 128, ratio 1.0)",
                                model_id=model_id, row=GENERIC_INT4)
    found_id, row = found
    args, skipped = apply_row(row, base)
    described = _describe({**args, "row_scope": bool(row.get("ignored_scope")) and not row.get("then")})
    return CompressionConfig(**args), Defaults(f"the per-model default of {found_id}: {described}",
                                               model_id=found_id, row=row, skipped=skipped)


def as_scope(scope: dict) -> IgnoredScope:
    """A table's ignored scope: names and patterns of optimum's OpenVINO nodes may match none of
    qcompiler's, so they are not validated."""
    return IgnoredScope(names=tuple(scope.get("names", ())), patterns=tuple(scope.get("patterns", ())),
                        types=tuple(scope.get("types", ())), validate=False)


def merged_scope(user: IgnoredScope | None, scope: dict) -> IgnoredScope:
    """The user's ignored scope with a table's added (the union; names that match nothing are then
    not an error, since the table's may not)."""
    user = user or IgnoredScope()
    table_scope = as_scope(scope)
    return IgnoredScope(names=user.names + table_scope.names, patterns=user.patterns + table_scope.patterns,
                        types=user.types + table_scope.types, subgraphs=user.subgraphs, validate=False)


def with_table_scope(config: CompressionConfig, defaults: Defaults | None, model, model_id: str | None
                     ) -> tuple[CompressionConfig, Defaults | None]:
    """`config` with the table's per-model ignored scope added (its "ignored_scope" section, which
    optimum-intel applies to every compressed format; the language model's part), and `defaults`
    saying so."""
    if config.mode is None and config.int8_above is None:
        return config, defaults
    section = table().get("ignored_scope", {})
    for candidate in model_ids(model, model_id):
        parts = section.get(candidate) or {}
        scope = parts.get("lm_model") or parts.get("model")
        if scope:
            config = config.replace(ignored_scope=merged_scope(config.ignored_scope, scope))
            shown = ", ".join(scope.get("patterns", []) + scope.get("names", []))
            line = f"the default ignored scope of {candidate} ({shown}) stays float"
            if defaults is None:
                return config, Defaults(line, model_id=candidate, override="pass --model-id to name another model")
            defaults.applied += f"; {line}"
            return config, defaults
    return config, defaults


def _describe(args: dict) -> str:
    parts = [str(args["mode"])]
    if str(args["mode"]).startswith("int4"):
        parts += [f"group size {args['group_size']}", f"ratio {args['ratio']}"]
        if args.get("all_layers"):
            parts.append("all layers")
    if args.get("awq"):
        parts.append("AWQ")
    if args.get("backup_scope"):
        parts.append(f"{', '.join(args['backup_scope'].patterns)} in {args['backup_mode']}")
    elif args.get("backup_mode") not in (None, "int8_asym"):
        parts.append(f"backup {args['backup_mode']}")
    if args.get("row_scope"):
        parts.append("the row's ignored scope")
    return ", ".join(parts)
