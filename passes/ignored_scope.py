"""Ignored scope: mark nodes that must stay in float.

A node is ignored when its name (or, for a weight, the weight's name) is in `names`, when a
pattern in `patterns` matches its name from the start (`re.match`, as NNCF), when its op is in
`types`, or when it lies on a path from a subgraph's inputs to its outputs. Marks go to
`node.meta["ignored"]` (the reason); precision assignment leaves a weight in float when the weight
or any op using it is marked. Names, patterns, types or subgraph ends that match nothing are an
error unless `validate=False`.

The config's `backup_scope` is matched the same way; its marks go to `node.meta["to_backup"]`, and
precision assignment gives those weights the backup precision instead of the primary one.
"""

from __future__ import annotations

import re

from dataclasses import dataclass

from qcompiler.config import IgnoredScope
from qcompiler.errors import QCompilerError
from qcompiler.hookspecs import hookimpl
from qcompiler.ir import OPS, Graph, Node
from qcompiler.passmanager import Pass, PassContext, PassResult


@dataclass(frozen=True)
class ScopeOptions:
    ignored: IgnoredScope
    backup: IgnoredScope


class IgnoredScopePass(Pass):
    name = "ignored_scope"
    Options = ScopeOptions

    @classmethod
    def options_from(cls, config):
        if not (config.ignored_scope or config.backup_scope):
            return None
        return ScopeOptions(config.ignored_scope, config.backup_scope)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o: ScopeOptions = self.options
        ignored, unmatched = _match(graph, o.ignored, "ignored scope")
        to_backup, unmatched_backup = _match(graph, o.backup, "backup scope")
        for node, reason in ignored.items():
            node.meta["ignored"] = reason
        for node, reason in to_backup.items():
            node.meta["to_backup"] = reason
        return PassResult(bool(ignored or to_backup), {
            "ignored_nodes": len(ignored), "unmatched": unmatched,
            "backup_nodes": len(to_backup), "unmatched_backup": unmatched_backup})


def _match(graph: Graph, scope: IgnoredScope, what: str) -> tuple[dict[Node, str], list[str]]:
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
            f"{what} {', '.join(unmatched)} matched no node in the model: fix the name "
            "(see `qcompiler graph MODEL` for node names) or pass validate=False / --no-validate-ignored"
        )
    return marked, unmatched


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
