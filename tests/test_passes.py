import pytest
import torch

from qcompiler.config import CompressionConfig, IgnoredScope, Subgraph
from qcompiler.errors import QCompilerError
from qcompiler.ir_text import parse_graph
from qcompiler.passmanager import PassContext, PassManager
from qcompiler.pipeline import build_passes
from qcompiler.registry import build_registry

LLM = """
%ids = Parameter() {shape=[None, None]}
%embed.weight = Constant() {shape=[512, 96]}
%embed = Gather(%embed.weight, %ids) {axis=0}
%l0.up.weight = Constant() {shape=[192, 96]}
%l0.up = MatMul(%embed, %l0.up.weight) {transpose_b=True}
%l0.gate.weight = Constant() {shape=[192, 96]}
%l0.gate = MatMul(%embed, %l0.gate.weight) {transpose_b=True}
%l0.act = Swish(%l0.gate)
%l0.mul = Multiply(%l0.act, %l0.up)
%l0.down.weight = Constant() {shape=[96, 192]}
%l0.down = MatMul(%l0.mul, %l0.down.weight) {transpose_b=True}
%l1.proj.weight = Constant() {shape=[96, 96]}
%l1.proj = MatMul(%l0.down, %l1.proj.weight) {transpose_b=True}
%lm_head.weight = Constant() {shape=[512, 96]}
%lm_head = MatMul(%l1.proj, %lm_head.weight) {transpose_b=True}
return %lm_head
"""


def run(config: CompressionConfig, text: str = LLM, weights=None):
    graph = parse_graph(text, weights)
    results = PassManager(build_passes(config, build_registry())).run(graph, PassContext(config))
    return graph, results


def formats(graph):
    return {c.name: str(c.meta["format"]) if c.meta.get("format") else None for c in graph.weight_constants()}


def test_int8_compresses_every_weight_per_channel():
    graph, _ = run(CompressionConfig(mode="int8_asym"))
    assert set(formats(graph).values()) == {"int8_asym/per-channel"}
    assert all(c.meta["compressed"].codes.dtype == torch.uint8 for c in graph.weight_constants())


def test_int4_keeps_embedding_and_last_matmul_in_backup():
    graph, results = run(CompressionConfig(mode="int4_sym", group_size=32))
    assert formats(graph) == {
        "embed.weight": "int8_asym/per-channel", "l0.up.weight": "int4_sym/g32", "l0.gate.weight": "int4_sym/g32",
        "l0.down.weight": "int4_sym/g32", "l1.proj.weight": "int4_sym/g32", "lm_head.weight": "int8_asym/per-channel",
    }
    assert results["precision"].summary["ratio_defining"] == 4


def test_all_layers_and_backup_none():
    graph, _ = run(CompressionConfig(mode="nf4", group_size=32, all_layers=True))
    assert set(formats(graph).values()) == {"nf4/g32"}
    graph, _ = run(CompressionConfig(mode="int4_asym", group_size=32, backup_mode="none"))
    assert formats(graph)["embed.weight"] is None and "compressed" not in graph.node("embed.weight").meta


def test_group_size_adjust_ignore_error():
    graph, results = run(CompressionConfig(mode="int4_asym", group_size=64))  # K=96 -> 32, K=192 keeps 64
    f = formats(graph)
    assert f["l0.up.weight"] == "int4_asym/g32" and f["l0.down.weight"] == "int4_asym/g64"
    assert results["precision"].summary["adjusted_group_size"] == {
        "l0.up.weight": 32, "l0.gate.weight": 32, "l1.proj.weight": 32}
    graph, results = run(CompressionConfig(mode="int4_asym", group_size=64, group_size_fallback="ignore"))
    assert formats(graph)["l0.up.weight"] == "int8_asym/per-channel"
    assert len(results["precision"].summary["group_size_fallback_to_backup"]) == 3
    with pytest.raises(QCompilerError, match="group size 64 does not divide the input channels of 3 layers"):
        run(CompressionConfig(mode="int4_asym", group_size=64, group_size_fallback="error"))


def test_ratio_follows_nncf_data_free_order():
    # make l1.proj the weight with the largest int8 error: it goes to 4-bit first
    weights = {"l1.proj.weight": torch.randn(96, 96) * 10}
    weights["l1.proj.weight"][:, 0] = 400.0
    graph, _ = run(CompressionConfig(mode="int4_sym", group_size=32, ratio=0.2), weights=weights)
    primary = [n for n, f in formats(graph).items() if f == "int4_sym/g32"]
    assert primary == ["l1.proj.weight"]  # 9216 of 64512 ratio-defining params < 20%; the next would exceed
    graph, _ = run(CompressionConfig(mode="int4_sym", group_size=32, ratio=0.0))
    assert "int4_sym/g32" not in formats(graph).values()


def test_ignored_scope_names_patterns_types_subgraphs():
    scope = IgnoredScope(names=("l0.up",), patterns=("l1\\..*",), types=("Gather",),
                         subgraphs=(Subgraph(inputs=("l0.mul",), outputs=("l0.down",)),))
    graph, results = run(CompressionConfig(mode="int4_sym", group_size=32, ignored_scope=scope))
    f = formats(graph)
    assert f["l0.up.weight"] is None and f["l1.proj.weight"] is None and f["embed.weight"] is None
    assert f["l0.down.weight"] is None and f["l0.gate.weight"] == "int4_sym/g32"
    assert graph.node("l0.mul").meta["ignored"] == "subgraph"


def test_ignored_scope_by_weight_name():
    scope = IgnoredScope(names=("l0.gate.weight",))
    graph, _ = run(CompressionConfig(mode="int4_sym", group_size=32, ignored_scope=scope))
    assert formats(graph)["l0.gate.weight"] is None


def test_unknown_ignored_name_is_an_error_unless_not_validated():
    with pytest.raises(QCompilerError, match="name 'nope'.*matched no node"):
        run(CompressionConfig(ignored_scope=IgnoredScope(names=("nope",))))
    graph, results = run(CompressionConfig(ignored_scope=IgnoredScope(names=("nope",), validate=False)))
    assert results["ignored_scope"].summary["unmatched"] == ["name 'nope'"]


def test_data_free_awq_keeps_the_product_and_equalizes_down_proj():
    config = CompressionConfig(mode="int4_sym", group_size=32, awq=True)
    plain, _ = run(CompressionConfig(mode="int4_sym", group_size=32))
    graph, results = run(config)
    assert results["awq"].summary["matched"] == 1 and results["awq"].summary["applied"] == 1
    up0, down0 = plain.weights["l0.up.weight"], plain.weights["l0.down.weight"]
    up1, down1 = graph.weights["l0.up.weight"], graph.weights["l0.down.weight"]
    h = torch.randn(5, 96, generator=torch.Generator().manual_seed(0))
    before = (h @ up0.t()) @ down0.t()
    after = (h @ up1.t()) @ down1.t()
    assert torch.allclose(before, after, rtol=1e-5, atol=1e-4)  # outputs up to ~400: float32 rounding is relative
    assert torch.allclose(down1.abs().mean(0), torch.ones(192), atol=1e-5)  # s = 1 / mean|W2| per column
    assert graph.node("l0.down").meta.get("awq")


def test_awq_reports_why_a_match_was_skipped():
    scope = IgnoredScope(names=("l0.down",))
    _, results = run(CompressionConfig(mode="int4_sym", group_size=32, awq=True, ignored_scope=scope))
    summary = results["awq"].summary
    assert summary["matched"] == 1 and summary["applied"] == 0
    assert "not in low-bit primary precision" in summary["skipped"]["l0.down"]


def test_awq_says_when_nothing_matched():
    text = LLM.replace("%l0.mul = Multiply(%l0.act, %l0.up)", "%l0.mul = Add(%l0.act, %l0.up)")
    _, results = run(CompressionConfig(mode="int4_sym", group_size=32, awq=True), text)
    assert results["awq"].summary["matched"] == 0 and "<graph>" in results["awq"].summary["skipped"]


def test_a_failing_pass_names_itself_and_the_passes_before():
    from qcompiler.passmanager import Pass

    class Boom(Pass):
        name = "boom"

        def run(self, graph, ctx):
            raise RuntimeError("kaput")

    config = CompressionConfig()
    passes = build_passes(config, build_registry()) [:1] + [Boom()]
    with pytest.raises(QCompilerError, match="failed in pass boom after precision: RuntimeError: kaput"):
        PassManager(passes).run(parse_graph(LLM), PassContext(config))
