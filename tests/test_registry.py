import pytest

from qcompiler.config import CompressionConfig
from qcompiler.errors import QCompilerError
from qcompiler.hookspecs import hookimpl
from qcompiler.ir_text import parse_graph
from qcompiler.passmanager import Pass, PassContext, PassManager
from qcompiler.pipeline import build_passes
from qcompiler.registry import build_registry
from tests.test_passes import LLM


def test_builtins_register_through_entry_points():
    registry = build_registry()
    assert {"ignored_scope", "precision", "awq", "rtn"} <= set(registry.passes)
    assert "torch" in registry.frontends and "openvino" in registry.backends
    assert build_registry(load_entrypoints=False).passes == {}


def test_installed_third_party_plugin_is_discovered_and_runs():
    registry = build_registry()
    assert "count_compressed_weights" in registry.passes  # from tests/plugin, installed by `make test`
    config = CompressionConfig(mode="int4_sym", group_size=32, extra_passes=("count_compressed_weights",))
    passes = build_passes(config, registry)
    assert [p.name for p in passes] == ["precision", "count_compressed_weights", "rtn"]
    graph = parse_graph(LLM)
    results = PassManager(passes).run(graph, PassContext(config))
    assert results["count_compressed_weights"].summary["by_op"] == {"Gather": 1, "MatMul": 5}


def test_example_plugin_moves_small_layers_to_backup():
    config = CompressionConfig(mode="int4_sym", group_size=32, passes={"small_layers_to_backup": {"min_params": 10_000}})
    passes = build_passes(config, build_registry())
    assert passes[1].options.min_params == 10_000
    graph = parse_graph(LLM)
    results = PassManager(passes).run(graph, PassContext(config))
    assert results["small_layers_to_backup"].summary["moved_to_backup"] == ["l1.proj.weight"]
    assert graph.node("l1.proj.weight").meta["compressed"].mode.value == "int8_asym"


def test_a_name_registered_twice_names_both_plugins():
    class Rtn(Pass):
        name = "rtn"

    class Impostor:
        @hookimpl
        def qcompiler_register_passes(self):
            return [Rtn]

    with pytest.raises(QCompilerError, match=r"pass 'rtn' is registered twice, by plugins '.*' and '.*'"):
        build_registry(plugins=[Impostor()])


def test_unknown_pass_name():
    with pytest.raises(QCompilerError, match="unknown pass 'nope': installed passes are"):
        build_passes(CompressionConfig(extra_passes=("nope",)), build_registry())


def test_example_plugin_option_on_the_command_line(tmp_path, monkeypatch, capsys):
    """The installed example plugin's flag and option appear on `qcompiler compress` from its declaration."""
    from qcompiler import cli

    captured = {}

    def fake_compress(model, config, **kwargs):
        captured["config"] = config
        raise QCompilerError("stop here")

    monkeypatch.setattr("qcompiler.pipeline.compress", fake_compress)
    code = cli.main(["compress", "--weight-format", "int4", "--sym", "--group-size", "32", "--small-layers-to-backup",
                     "--small-layers-to-backup-min-params", "1234", "-o", str(tmp_path / "out")])
    assert code == 2 and captured["config"].passes == {"small_layers_to_backup": {"min_params": 1234}}
    capsys.readouterr()
    for flags, message in ((["--small-layers-to-backup", "--small-layers-to-backup-min-params", "-5"],
                            "--small-layers-to-backup-min-params -5 is below 0"),
                           (["--small-layers-to-backup-min-params", "0"],
                            "--small-layers-to-backup-min-params is an option of --small-layers-to-backup"),
                           (["--dataset", "auto", "--lora-correction", "--lora-rank", "0"], "--lora-rank 0 is below 1"),
                           (["--dataset", "auto", "--gptq", "--gptq-damp", "0"], "--gptq-damp 0.0 must be above 0")):
        assert cli.main(["compress", "--weight-format", "int4", *flags, "-o", str(tmp_path / "out")]) == 2
        assert message in capsys.readouterr().err
    assert "config" in captured and not (tmp_path / "out").exists()
