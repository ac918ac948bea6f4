"""Model specs: what one model family needs beyond what qcompiler reads from the model itself.

qcompiler derives a family's structure from the model: its transformer blocks (the largest list of
same-typed modules), its KV-cache layout (one short forward), its MLP and attention patterns (the
pattern language). A family for which a derivation is wrong, or which needs more, registers a
`ModelSpec` through the `qcompiler_register_model_specs` hook, keyed by its transformers
`model_type`; adding one touches that plugin's file and no backend. Every field is optional: None
(or empty) keeps what qcompiler derives. The report names the spec it applied.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

from qcompiler.config import check_patterns
from qcompiler.errors import QCompilerError


@dataclass(frozen=True)
class ModelSpec:
    name: str  # the transformers model_type it describes
    loader: str | None = None  # the transformers auto class that builds it (default AutoModelForCausalLM)
    block_path: str | None = None  # dotted path of the nn.ModuleList of transformer blocks
    ignored_scope: tuple[str, ...] = ()  # regexes (re.match) of IR names that stay in float by default

    def __post_init__(self) -> None:
        check_patterns(self.ignored_scope, f"model spec {self.name}: ignored-scope pattern",
                       "fix the plugin that registers it")
        if self.loader is not None and not re.fullmatch(r"Auto\w+", self.loader):
            raise QCompilerError(f"model spec {self.name}: loader {self.loader!r} is not a transformers auto class "
                                 "name (AutoModelForCausalLM, ...): fix the plugin that registers it")

    def as_dict(self) -> dict:
        """The fields the spec sets, for the report."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) not in (None, ())}
