"""qcompiler: a plugin-based compiler that compresses LLM weights.

    import qcompiler
    result = qcompiler.compress(model, qcompiler.CompressionConfig(mode="int4_sym", group_size=64),
                                output="out/int4")

Importing qcompiler imports no backend; plugins load when a registry is built. The names below
load on first use (PEP 562), so `qcompiler.cli` starts without torch and handles an early Ctrl-C.
"""

import importlib

__version__ = "0.1.0"
_WHERE = {
    "BackupMode": "config", "CompressionConfig": "config", "GroupSizeFallback": "config", "IgnoredScope": "config",
    "LoadOptions": "config", "Mode": "config", "Subgraph": "config", "QCompilerError": "errors", "Graph": "ir",
    "Node": "ir", "CompressedModel": "pipeline", "compress": "pipeline",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"qcompiler.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'qcompiler' has no attribute {name!r}")
