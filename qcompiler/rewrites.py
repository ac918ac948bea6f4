"""Rewritten parameters that are not weights of a weight-bearing op (a norm weight AWQ scaled, a
plugin's rewrite of a bias), and how a backend that converts the source torch module takes them.

Converters fold constants (OpenVINO drops a norm's multiply by ones, renames what it folds), so
such values cannot be found and replaced in the converted model afterwards: the backend converts
the module with them in place (`in_module`) and puts the module's own values back afterwards.
"""

from __future__ import annotations

from contextlib import contextmanager

from qcompiler.errors import QCompilerError
from qcompiler.ir import Graph


def rewritten_params(graph: Graph, done=()) -> list:
    """Rewritten parameter Constants that are not weights of a weight-bearing op, except `done`."""
    bearing = {c.attrs["weight"] for c in graph.weight_constants()}
    return [c for c in graph.parameter_constants() if c.meta.get("rewritten")
            and c.attrs["weight"] not in bearing and c.attrs["weight"] not in done]


@contextmanager
def in_module(module, graph: Graph):
    """`module` with the graph's rewritten non-weight parameters in place (named as in the module);
    yields their names. The module's own tensors are restored on exit."""
    saved = []
    try:
        for const in rewritten_params(graph):
            name = const.attrs["weight"]
            try:
                param = module.get_parameter(name)
            except AttributeError:
                raise QCompilerError(f"the rewritten parameter {name} is not a parameter of the model being "
                                     "converted: use --backend torch, or report it") from None
            value = graph.weight(const)
            if tuple(value.shape) != tuple(param.shape):
                raise QCompilerError(f"a pass changed the shape of {name} ({tuple(param.shape)} -> "
                                     f"{tuple(value.shape)}): no backend can take that")
            saved.append((param, param.data))
            value = value.to(param.dtype)
            graph.weights[name] = value  # a converter may share this memory: the IR keeps it alive
            param.data = value
        yield {c.attrs["weight"] for c in rewritten_params(graph)}
    finally:
        for param, data in saved:
            param.data = data
