"""qcompiler: a plugin-based compiler that compresses LLM weights.

    import qcompiler
    result = qcompiler.compress(model, qcompiler.CompressionConfig(mode="int4_sym", group_size=64),
                                output="out/int4")

Importing qcompiler imports no backend; plugins load when a registry is built.
"""

from qcompiler.config import BackupMode, CompressionConfig, GroupSizeFallback, IgnoredScope, Mode, Subgraph
from qcompiler.errors import QCompilerError
from qcompiler.ir import Graph, Node
from qcompiler.pipeline import CompressedModel, compress

__version__ = "0.1.0"
__all__ = [
    "BackupMode", "CompressedModel", "CompressionConfig", "Graph", "GroupSizeFallback", "IgnoredScope",
    "Mode", "Node", "QCompilerError", "Subgraph", "compress",
]
