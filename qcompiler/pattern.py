"""Patterns that look like the graph they match.

    up, down = ...
    pattern = P.MatMul(P.Multiply(P.MatMul(Var("x"), Weight("w1"), name="first"), Var("y")),
                       Weight("w2"), name="second")

`P.<Op>(...)` builds an op pattern (the op must be in the IR vocabulary); `Var` matches any node
and `Weight` a Constant. Names bind matched nodes; `find_matches` returns the bindings of every
match, and for nodes of the root op that did not match, why not (`MatchResult.fail("reason")`).
Multiply and Add match their inputs in either order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qcompiler.ir import OPS, Graph, Node

COMMUTATIVE = frozenset({"Multiply", "Add"})


@dataclass
class MatchResult:
    ok: bool
    bindings: dict[str, Node] = field(default_factory=dict)
    reason: str = ""

    @staticmethod
    def fail(reason: str) -> MatchResult:
        return MatchResult(False, reason=reason)

    def __bool__(self) -> bool:
        return self.ok


class Pattern:
    name: str | None = None

    def match(self, node: Node, bindings: dict[str, Node]) -> MatchResult:
        raise NotImplementedError

    def _bind(self, node: Node, bindings: dict[str, Node]) -> MatchResult:
        if self.name is None:
            return MatchResult(True, bindings)
        bound = bindings.get(self.name)
        if bound is not None and bound is not node:
            return MatchResult.fail(f"'{self.name}' is already bound to %{bound.name}, not %{node.name}")
        return MatchResult(True, {**bindings, self.name: node})


class Var(Pattern):
    """Any node."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name

    def match(self, node, bindings):
        return self._bind(node, bindings)

    def __repr__(self) -> str:
        return self.name or "_"


class Weight(Pattern):
    """A weight Constant."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name

    def match(self, node, bindings):
        if node.op != "Constant":
            return MatchResult.fail(f"%{node.name} is a {node.op}, not a weight Constant")
        return self._bind(node, bindings)

    def __repr__(self) -> str:
        return f"Weight({self.name or ''})"


class OpPattern(Pattern):
    def __init__(self, op: str, inputs: tuple[Pattern, ...], name: str | None = None) -> None:
        self.op, self.inputs, self.name = op, inputs, name

    def match(self, node, bindings):
        if node.op != self.op:
            return MatchResult.fail(f"%{node.name} is a {node.op}, expected {self.op}")
        if len(node.inputs) < len(self.inputs):
            return MatchResult.fail(f"%{node.name} has {len(node.inputs)} inputs, expected {len(self.inputs)}")
        orders = [node.inputs[: len(self.inputs)]]
        if self.op in COMMUTATIVE and len(self.inputs) == 2:
            orders.append(orders[0][::-1])
        result = MatchResult.fail("no input order matched")
        for order in orders:
            result = self._match_inputs(node, order, bindings)
            if result:
                return result
        return result

    def _match_inputs(self, node, inputs, bindings):
        result = self._bind(node, bindings)
        for sub, inp in zip(self.inputs, inputs):
            if not result:
                return result
            result = sub.match(inp, result.bindings)
        return result

    def __repr__(self) -> str:
        return f"{self.op}({', '.join(map(repr, self.inputs))})"


class _OpBuilder:
    """`P.MatMul(a, b, name=...)`: an op pattern for any op in the IR vocabulary."""

    def __getattr__(self, op: str):
        if op not in OPS:
            raise AttributeError(f"{op!r} is not an IR op; known ops: {sorted(OPS)}")
        return lambda *inputs, name=None: OpPattern(op, inputs, name)


P = _OpBuilder()


def find_matches(graph: Graph, pattern: OpPattern) -> tuple[list[dict[str, Node]], list[tuple[Node, str]]]:
    """All matches of `pattern` rooted at any node, and (node, reason) for root-op nodes that failed."""
    matches, failures = [], []
    for node in graph.nodes:
        if node.op != pattern.op:
            continue
        result = pattern.match(node, {})
        if result:
            matches.append(result.bindings)
        else:
            failures.append((node, result.reason))
    return matches, failures
