"""The IR's text form, so a pass test reads "this text in, that text out".

    %x = Parameter() {shape=[None, 64]}
    %up.weight = Constant() {shape=[128, 64]}
    %up = MatMul(%x, %up.weight) {transpose_b=True}
    return %up

A Constant's shape comes from its tensor; `parse_graph` makes seeded random tensors for
constants it is not given, so tiny test graphs need no weight files.
"""

from __future__ import annotations

import ast
import re
import zlib

import torch

from qcompiler.ir import Graph, Node

_LINE = re.compile(r"^%(?P<name>\S+) = (?P<op>\w+)\((?P<inputs>[^)]*)\)(?: \{(?P<attrs>.*)\})?$")


def print_graph(graph: Graph, meta: tuple[str, ...] = ()) -> str:
    lines = [_print_node(graph, n, meta) for n in graph.nodes]
    lines.append("return " + ", ".join(f"%{o.name}" for o in graph.outputs))
    return "\n".join(lines)


def _print_node(graph: Graph, node: Node, meta: tuple[str, ...]) -> str:
    attrs = dict(node.attrs)
    if node.op == "Constant":
        if attrs.get("weight") == node.name:
            attrs.pop("weight")
        if node.name in graph.weights or "weight" in node.attrs:
            attrs["shape"] = list(graph.tensor(node).shape)
    text = f"%{node.name} = {node.op}({', '.join('%' + i.name for i in node.inputs)})"
    if attrs:
        text += " {" + ", ".join(f"{k}={v!r}" for k, v in attrs.items()) + "}"
    shown = [f"{k}={node.meta[k]}" for k in meta if node.meta.get(k) is not None]
    if shown:
        text += "  # " + " ".join(shown)
    return text


def parse_graph(text: str, weights: dict[str, torch.Tensor] | None = None, name: str = "graph") -> Graph:
    graph = Graph(name)
    by_name: dict[str, Node] = {}
    for lineno, raw in enumerate(text.strip().splitlines(), 1):
        line = raw.split("  #", 1)[0].strip()
        if not line:
            continue
        if line.startswith("return "):
            graph.outputs = [by_name[tok.strip().lstrip("%")] for tok in line[7:].split(",")]
            continue
        m = _LINE.match(line)
        if m is None:
            raise ValueError(f"line {lineno}: cannot parse {raw!r}")
        inputs = [by_name[tok.strip().lstrip("%")] for tok in m["inputs"].split(",") if tok.strip()]
        attrs = _parse_attrs(m["attrs"] or "")
        if m["op"] == "Constant":
            key = attrs.pop("weight", m["name"])
            shape = attrs.pop("shape")
            tensor = (weights or {}).get(key)
            node = graph.add_weight(key, tensor if tensor is not None else _seeded(key, shape))
            node.attrs.update(attrs)
        else:
            node = graph.add(m["op"], inputs, attrs, m["name"])
        by_name[m["name"]] = node
    return graph


def _parse_attrs(text: str) -> dict:
    if not text.strip():
        return {}
    call = ast.parse(f"f({text})", mode="eval").body
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}


def _seeded(name: str, shape) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(*shape, generator=gen)
