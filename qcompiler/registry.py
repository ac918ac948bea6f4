"""Building the plugin manager and the name -> plugin tables.

Nothing is registered at import time: `build_registry()` makes a fresh manager each call, loads
the `qcompiler` entry points (the built-ins register the same way a third party does), and
collects passes, frontends, backends and model specs. A name registered twice is an error naming both plugins.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pluggy

from qcompiler import hookspecs
from qcompiler.errors import QCompilerError


def make_plugin_manager(plugins=(), load_entrypoints: bool = True) -> pluggy.PluginManager:
    pm = pluggy.PluginManager("qcompiler")
    pm.add_hookspecs(hookspecs)
    if load_entrypoints:
        pm.load_setuptools_entrypoints("qcompiler")
    for plugin in plugins:
        pm.register(plugin)
    return pm


@dataclass
class Registry:
    passes: dict = field(default_factory=dict)
    frontends: dict = field(default_factory=dict)
    backends: dict = field(default_factory=dict)
    model_specs: dict = field(default_factory=dict)

    def pass_class(self, name: str):
        return _lookup(self.passes, name, "pass")

    def backend(self, name: str):
        return _lookup(self.backends, name, "backend")

    def frontend_for(self, model):
        for frontend in self.frontends.values():
            if frontend.can_load(model):
                return frontend
        raise QCompilerError(
            f"no frontend reads {model!r}: pass a transformers model folder, a folder with a .gguf file, an .onnx "
            f"file, an OpenVINO .xml or a torch nn.Module (frontends: {', '.join(self.frontends) or 'none installed'})"
        )

    def backend_for_artifact(self, path):
        for backend in self.backends.values():
            if backend.can_load(path):
                return backend
        raise QCompilerError(
            f"{path} is not an artifact folder any backend reads ({', '.join(self.backends)}): "
            "pass the folder `qcompiler compress -o` wrote"
        )


def build_registry(plugins=(), load_entrypoints: bool = True) -> Registry:
    pm = make_plugin_manager(plugins, load_entrypoints)
    return Registry(
        passes=_collect(pm, "qcompiler_register_passes", "pass"),
        frontends=_collect(pm, "qcompiler_register_frontends", "frontend"),
        backends=_collect(pm, "qcompiler_register_backends", "backend"),
        model_specs=_collect(pm, "qcompiler_register_model_specs", "model spec"),
    )


def _collect(pm: pluggy.PluginManager, hook_name: str, kind: str) -> dict:
    table, owner = {}, {}
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        for item in impl.function() or []:
            name = item.name
            if name in table:
                raise QCompilerError(
                    f"{kind} '{name}' is registered twice, by plugins '{owner[name]}' and '{impl.plugin_name}': "
                    "uninstall one of them or rename its " + kind
                )
            table[name], owner[name] = item, impl.plugin_name
    return table


def _lookup(table: dict, name: str, kind: str):
    try:
        return table[name]
    except KeyError:
        plural = kind + ("es" if kind.endswith("s") else "s")
        raise QCompilerError(f"unknown {kind} '{name}': installed {plural} are {', '.join(sorted(table))}") from None
