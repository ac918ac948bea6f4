import pytest

from qcompiler.ir_text import parse_graph
from qcompiler.pattern import P, Var, Weight, find_matches
from tests.conftest import MLP_TEXT

AWQ = P.MatMul(P.Multiply(P.MatMul(Var("x"), Weight("w1"), name="first"), Var("y")), Weight("w2"), name="second")


def test_awq_pattern_binds_names():
    matches, failures = find_matches(parse_graph(MLP_TEXT), AWQ)
    assert [(m["first"].name, m["second"].name, m["w2"].name) for m in matches] == [("up", "down", "down.weight")]
    assert {n.name for n, _ in failures} == {"gate", "up"}


def test_commutative_multiply_matches_either_order():
    swapped = MLP_TEXT.replace("Multiply(%act, %up)", "Multiply(%up, %act)")
    matches, _ = find_matches(parse_graph(swapped), AWQ)
    assert len(matches) == 1


def test_failure_says_why():
    graph = parse_graph(MLP_TEXT.replace("%mul = Multiply(%act, %up)", "%mul = Add(%act, %up)"))
    matches, failures = find_matches(graph, AWQ)
    assert not matches
    reasons = dict((n.name, r) for n, r in failures)
    assert "is a Add, expected Multiply" in reasons["down"]


def test_same_name_must_bind_same_node():
    pattern = P.Multiply(Var("a"), Var("a"))
    matches, failures = find_matches(parse_graph(MLP_TEXT), pattern)
    assert not matches and "already bound" in failures[0][1]


def test_unknown_op_is_an_attribute_error():
    with pytest.raises(AttributeError, match="not an IR op"):
        P.Matmul
