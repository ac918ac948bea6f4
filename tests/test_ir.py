import pytest
import torch

from qcompiler.ir import Graph
from qcompiler.ir_text import parse_graph
from tests.conftest import MLP_TEXT


def test_text_round_trip():
    graph = parse_graph(MLP_TEXT)
    assert parse_graph(graph.to_text()).to_text() == graph.to_text()
    assert graph.to_text().splitlines()[2] == "%gate = MatMul(%x, %gate.weight) {transpose_b=True}"


def test_constants_get_given_or_seeded_weights():
    w = torch.ones(192, 96)
    graph = parse_graph(MLP_TEXT, weights={"gate.weight": w})
    assert graph.weights["gate.weight"] is w
    again = parse_graph(MLP_TEXT)
    assert torch.equal(graph.weights["up.weight"], again.weights["up.weight"])


def test_weight_uses_know_the_layout():
    graph = parse_graph(MLP_TEXT + "")
    uses = graph.weight_uses()
    assert [u.op.name for u in uses] == ["gate", "up", "down"]
    assert all(u.reduction_axes == (1,) for u in uses)
    g = parse_graph("""
%ids = Parameter() {shape=[None]}
%emb = Constant() {shape=[10, 8]}
%e = Gather(%emb, %ids) {axis=0}
%w = Constant() {shape=[8, 4]}
%y = MatMul(%e, %w)
return %y
""")
    assert [(u.op.op, u.reduction_axes) for u in g.weight_uses()] == [("Gather", (1,)), ("MatMul", (0,))]


def test_meta_prints_as_comment_and_unknown_ops_are_refused():
    graph = parse_graph(MLP_TEXT)
    graph.node("down.weight").meta["role"] = "primary"
    assert "%down.weight = Constant() {shape=[96, 192]}  # role=primary" in graph.to_text(meta=("role",))
    with pytest.raises(ValueError, match="unknown op"):
        Graph().add("Frobnicate")


def test_parse_errors_name_the_line():
    with pytest.raises(ValueError, match="line 1"):
        parse_graph("this is not IR")
