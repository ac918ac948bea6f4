"""Ignored scope: mark nodes that must stay in float.

A node is ignored when its name (or, for a weight, the weight's name) is in `names`, when a
pattern in `patterns` matches its name from the start (`re.match`, as NNCF), when its op is in
`types`, or when it lies on a path from a subgraph's inputs to its outputs. Marks go to
`node.meta["ignored"]` (the reason); precision assignment leaves a weight in float when the weight
or any op using it is marked. Names, patterns, types or subgraph ends that match nothing are an
error unless `validate=False`.
"""

from __future__ import annotations

import re

from qcompiler.config import IgnoredScope
from qcompiler.errors import QCompilerError
from qcompiler.hookspecs import hookimpl
from qcompiler.ir import OPS, Graph, Node
from qcompiler.passmanager import Pass, PassContext, PassResult


class IgnoredScopePass(Pass):
    name = "ignored_scope"
    Options = IgnoredScope

    @classmethod
    def options_from(cls, config):
        return config.ignored_scope if config.ignored_scope else None

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        scope: IgnoredScope = self.options
        by_name = {n.name: n for n in graph.nodes}
        marked: dict[Node, str] = {}
        unmatched: list[str] = []

        for name in scope.names:
            if name in by_name:
                marked.setdefault(by_name[name], f"name {name}")
            else:
                unmatched.append(f"name '{name}'")
        for pattern in scope.patterns:
            regex = re.compile(pattern)
            hits = [n for n in graph.nodes if regex.match(n.name)]
            marked.update({n: f"pattern {pattern}" for n in hits if n not in marked})
            if not hits:
                unmatched.append(f"pattern '{pattern}'")
        for op in scope.types:
            canonical = {o.lower(): o for o in OPS}.get(op.lower())
            hits = [n for n in graph.nodes if n.op == canonical]
            marked.update({n: f"type {op}" for n in hits if n not in marked})
            if not hits:
                unmatched.append(f"type '{op}'")
        for sub in scope.subgraphs:
            missing = [s for s in (*sub.inputs, *sub.outputs) if s not in by_name]
            if missing:
                unmatched.extend(f"subgraph node '{s}'" for s in missing)
                continue
            marked.update({n: "subgraph" for n in _between(graph, sub.inputs, sub.outputs) if n not in marked})

        if unmatched and scope.validate:
            raise QCompilerError(
                f"ignored scope {', '.join(unmatched)} matched no node in the model: fix the name "
                "(see `qcompiler graph MODEL` for node names) or pass validate=False / --no-validate-ignored"
            )
        for node, reason in marked.items():
            node.meta["ignored"] = reason
        return PassResult(bool(marked), {"ignored_nodes": len(marked), "unmatched": unmatched})


def _between(graph: Graph, inputs, outputs) -> set[Node]:
    forward = {graph.node(n) for n in inputs}
    for node in graph.nodes:
        if any(i in forward for i in node.inputs):
            forward.add(node)
    backward = {graph.node(n) for n in outputs}
    for node in reversed(graph.nodes):
        if node in backward:
            backward.update(node.inputs)
    return forward & backward


@hookimpl
def qcompiler_register_passes():
    return [IgnoredScopePass]
