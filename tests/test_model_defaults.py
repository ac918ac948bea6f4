"""Per-model defaults (optimum-intel's table) and the default weight format."""

import json

import pytest

from qcompiler import model_defaults
from qcompiler.cli import main
from qcompiler.config import CompressionConfig
from qcompiler.pipeline import compress
from tests.conftest import tiny_llama

TINY = ["--backend", "torch", "--quiet"]


def report(folder):
    return json.loads((folder / "qcompiler_report.json").read_text())


def formats(rep) -> dict:
    return {row["format"]: row["layers"] for row in rep["table"]}


@pytest.fixture
def named_folder(tmp_path):
    """A tiny LLaMA saved under a folder named as a model of the table, as `--local-dir` leaves it."""
    folder = tmp_path / "Qwen3-1.7B"
    tiny_llama().save_pretrained(folder)
    return folder


def test_every_row_maps_to_a_valid_config():
    data = model_defaults.table()
    assert len(data["int4"]) >= 53 and data["int8"]
    for section in ("int4", "int8"):
        for model_id, row in data[section].items():
            args, skipped = model_defaults.apply_row(row, {})
            config = CompressionConfig(**args)  # validates: a row that cannot run fails here, named
            assert config.mode.bits == row.get("bits", 4), model_id
            assert config.scale_estimation == bool(row.get("scale_estimation")), model_id
            uses_data = config.awq or config.scale_estimation or config.ratio < 1.0
            assert (config.dataset == "auto") == bool(row.get("dataset") and uses_data), model_id


def test_model_id_candidates(tmp_path):
    folder = tmp_path / "local"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "openai/gpt-oss-20b"}))
    assert model_defaults.find("int4", folder, None)[0] == "openai/gpt-oss-20b"
    hub = tmp_path / "models--Qwen--Qwen3-8B" / "snapshots" / "abc123"
    hub.mkdir(parents=True)
    assert model_defaults.find("int4", hub, None)[0] == "Qwen/Qwen3-8B"
    named = tmp_path / "Llama-2-7b-chat-hf"
    named.mkdir()
    assert model_defaults.find("int4", named, None)[0] == "meta-llama/Llama-2-7b-chat-hf"
    assert model_defaults.find("int4", named, "no/such-model") is None
    assert model_defaults.find("int8", tmp_path / "Qwen2.5-Coder-3B-Instruct", None)[0] == \
        "Qwen/Qwen2.5-Coder-3B-Instruct"


def test_int4_alone_applies_the_models_row(named_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compress", str(named_folder), "--weight-format", "int4", "-o", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "defaults: the per-model default of Qwen/Qwen3-1.7B: int4_sym, group size 64" in printed
    assert "(--dataset auto) calibrates instead" in printed and "pass --sym, --group-size" in printed
    rep = report(out)
    assert rep["config"]["mode"] == "int4_sym" and rep["config"]["group_size"] == 64 and rep["config"]["awq"]
    assert rep["defaults"]["model_id"] == "Qwen/Qwen3-1.7B" and rep["config"]["scale_estimation"]
    assert rep["calibration"]["source"].startswith("auto") and rep["passes"]["scale_estimation"]["estimated"] > 0
    # the tiny model's hidden size 96 takes group 32 where 64 does not divide: adjusted, not refused
    assert rep["passes"]["precision"]["adjusted_group_size"]


def test_no_scale_estimation_keeps_the_row_and_turns_its_scale_estimation_off(named_folder):
    from qcompiler.cli import _parser, config_from_args

    def resolved(*flags):
        return config_from_args(_parser().parse_args(["compress", str(named_folder), "--weight-format", "int4",
                                                      *flags]))

    config, defaults = resolved()
    assert defaults is not None and config.scale_estimation is True and config.awq  # Qwen3-1.7B's row
    config, defaults = resolved("--no-scale-estimation")
    assert defaults is not None and defaults.model_id == "Qwen/Qwen3-1.7B"  # still the row
    assert config.scale_estimation is False and config.awq and config.group_size == 64
    assert "scale_estimation" not in config.switched_on() and config.dataset is not None  # AWQ still uses it
    config, defaults = resolved("--no-scale-estimation", "--model-id", "Qwen/Qwen3-8B")  # its only data step: SE
    assert defaults is not None and config.scale_estimation is False and config.dataset is None


def test_an_option_besides_the_format_turns_the_row_off(named_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compress", str(named_folder), "--weight-format", "int4", "--group-size", "32", "-o", str(out),
                 *TINY]) == 0
    rep = report(out)
    assert rep["defaults"] is None and rep["config"]["mode"] == "int4_asym" and not rep["config"]["awq"]
    assert "defaults:" not in capsys.readouterr().out


def test_a_model_id_not_in_the_table_says_the_generic_default_applies(named_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compress", str(named_folder), "--weight-format", "int4", "--model-id", "me/my-model",
                 "--group-size-fallback", "adjust", "-o", str(out), *TINY]) == 0
    assert report(out)["defaults"] is None  # an explicit option: the user's config, no default
    assert main(["compress", str(named_folder), "--weight-format", "int4", "--model-id", "me/my-model",
                 "-o", str(tmp_path / "o2"), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "defaults: --model-id me/my-model is not in the table: the generic int4 default" in printed
    rep = report(tmp_path / "o2")
    assert rep["config"]["mode"] == "int4_asym" and rep["config"]["group_size"] == 128


def test_gpt_oss_two_stage_config(tmp_path, capsys):
    """int4_sym g32 with attention and router skipped, then int8_asym on the rest."""
    folder = tmp_path / "tiny"
    tiny_llama().save_pretrained(folder)
    out = tmp_path / "out"
    assert main(["compress", str(folder), "--weight-format", "int4", "--model-id", "openai/gpt-oss-20b",
                 "-o", str(out), *TINY]) == 0
    rep = report(out)
    # 2 layers x 4 attention projections + embeddings + lm_head in int8; 2 x 3 MLP projections in int4
    assert formats(rep) == {"int4_sym, group size 32": 6, "int8_asym, per-channel": 10}
    assert rep["passes"]["ignored_scope"]["backup_nodes"] >= 8  # every node of the attention blocks
    assert rep["passes"]["ignored_scope"]["unmatched_backup"] == ["pattern '.*router.*'"]
    assert not rep["float_weights"]
    assert rep["parameters"]["total"] == sum(p.numel() for p in tiny_llama().parameters())


def test_gpt_oss_two_stage_config_on_a_gpt_oss_model(tmp_path, capsys):
    """The same row on a (tiny) gpt-oss model: its batched experts in int4_sym g32, attention and
    routers in int8, nothing float, on OpenVINO."""
    from tests.families import build

    folder = build("gpt_oss", tmp_path / "gpt-oss")
    out = tmp_path / "out"
    assert main(["compress", str(folder), "--weight-format", "int4", "--model-id", "openai/gpt-oss-20b",
                 "-o", str(out), "--quiet"]) == 0
    rep = report(out)
    # 2 layers: experts' gate_up and down in int4; 4 attention projections and the router each, plus
    # the embeddings and lm_head, in int8
    assert formats(rep) == {"int4_sym, group size 32": 4, "int8_asym, per-channel": 12}
    assert rep["passes"]["ignored_scope"]["unmatched_backup"] == []  # the router pattern matched this time
    assert not rep["float_weights"]


def test_no_weight_format_is_float_below_a_billion_parameters(tmp_path, capsys):
    folder = tmp_path / "tiny"
    tiny_llama().save_pretrained(folder)
    out = tmp_path / "out"
    assert main(["compress", str(folder), "-o", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "else float (optimum-intel's rule); this model has" in printed and printed.count("parameters: float") == 1
    assert formats(report(out)) == {"float (not compressed)": 16}


def test_no_weight_format_is_int8_at_the_threshold(llama):
    params = sum(p.numel() for p in llama.parameters())
    result = compress(llama, CompressionConfig(mode=None, int8_above=params))
    assert str(result.config.mode) == "int8_asym"
    assert all(c.meta["format"] is not None for c in result.graph.weight_constants())
    result = compress(llama, CompressionConfig(mode=None, int8_above=params + 1))
    assert result.config.mode is None


def test_a_rows_runtime_hint_is_written_into_the_openvino_model(tmp_path, capsys):
    import openvino as ov

    folder = tmp_path / "Qwen2.5-Coder-3B-Instruct"
    tiny_llama().save_pretrained(folder)
    out = tmp_path / "out"
    assert main(["compress", str(folder), "--weight-format", "int8", "-o", str(out), "--quiet"]) == 0
    model = ov.Core().read_model(out / "openvino_model.xml")
    assert model.get_rt_info(["runtime_options", "DYNAMIC_QUANTIZATION_GROUP_SIZE"]).astype(str) == "128"
    assert report(out)["defaults"]["model_id"] == "Qwen/Qwen2.5-Coder-3B-Instruct"
    assert main(["compress", str(folder), "--weight-format", "int8", "-o", str(tmp_path / "pt"), *TINY]) == 0
    assert any("DYNAMIC_QUANTIZATION_GROUP_SIZE=128 (this artifact is not an OpenVINO model)" in s
               for s in report(tmp_path / "pt")["defaults"]["skipped"])


def test_a_rows_ignored_scope_adds_to_the_users(tmp_path, capsys):
    folder = tmp_path / "Phi-4-multimodal-instruct"
    tiny_llama().save_pretrained(folder)
    args = ["compress", str(folder), "--weight-format", "int4", "--ignored-scope-pattern", ".*layers\\.0\\.mlp.*",
            "-o", str(tmp_path / "out"), *TINY]
    assert main(args) == 0
    rep = report(tmp_path / "out")
    assert ".*layers\\.0\\.mlp.*" in rep["config"]["ignored_scope"]["patterns"]
    assert len(rep["config"]["ignored_scope"]["patterns"]) == 2
    assert any("ignored scope (pattern .*layers" in r["reason"] for r in rep["float_weights"])


def test_the_tables_default_ignored_scope_applies_to_every_compressed_format(tmp_path, capsys):
    folder = tmp_path / "gemma-4-26B-A4B"  # the table keeps its routers float; this tiny model has none
    tiny_llama().save_pretrained(folder)
    assert main(["compress", str(folder), "--weight-format", "int4", "--model-id", "google/gemma-4-26B-A4B",
                 "--sym", "--group-size", "32", "-o", str(tmp_path / "out"), *TINY]) == 0
    rep = report(tmp_path / "out")
    assert ".*router.*" in rep["config"]["ignored_scope"]["patterns"]
    assert "the default ignored scope of google/gemma-4-26B-A4B (.*router.*) stays float" in rep["defaults"]["applied"]
    assert "the row's ignored scope" not in capsys.readouterr().out
