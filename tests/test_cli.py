"""Bad input: one line naming the problem and the fix, exit status 2, nothing written."""

import json

import pytest

from qcompiler.cli import main
from qcompiler.optimum_flags import NOT_YET, SWITCHES


@pytest.fixture
def gguf_folder(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(b"GGUF" + b"\x00" * 64)
    return folder


CASES = {
    "missing model": (["compress", "/no/such/model"], "model /no/such/model does not exist"),
    "unknown mode": (["compress", "--weight-format", "int5"], "invalid choice: 'int5'"),
    "int3 in openvino": (["compress", "--weight-format", "int3", "-o", "/tmp/qc-never"], "the openvino format cannot store int3_asym"),
    "ratio above 1": (["compress", "--ratio", "1.5", "--weight-format", "int4"], "ratio 1.5 is outside [0, 1]"),
    "group size 0": (["compress", "--group-size", "0", "--weight-format", "int4"], "group size 0 is invalid"),
    "group size -2": (["compress", "--group-size", "-2", "--weight-format", "int4"], "group size -2 is invalid"),
    "int8 with ratio": (["compress", "--weight-format", "int8", "--ratio", "0.5"], "int8_asym is per-channel"),
    "mxfp4 group": (["compress", "--weight-format", "mxfp4", "--group-size", "64"], "mxfp4 uses blocks of 32"),
    "unknown backup": (["compress", "--backup-mode", "int2", "--weight-format", "int4"], "unknown backup_mode 'int2'"),
    "unknown backend": (["compress", "--backend", "tflite"], "unknown backend 'tflite'"),
    "dataset": (["compress", "--dataset", "wikitext", "--weight-format", "int4"], "'wikitext' is not available offline"),
    "eval missing": (["eval", "/no/artifact", "--text", "x.txt"], "artifact folder /no/artifact does not exist"),
    "onnx option, openvino backend": (["compress", "--onnx-format", "qdq"], "add --backend onnx or drop them"),
    "mxfp4 to onnx": (["compress", "--weight-format", "mxfp4", "--backend", "onnx"], "mxfp4 has no onnxruntime"),
    "qdq with accuracy level": (["compress", "--backend", "onnx", "--onnx-format", "qdq", "--onnx-accuracy-level",
                                 "0"], "a qdq model carries no accuracy level"),
    "fp32 with group size": (["compress", "--weight-format", "fp32", "--group-size", "64"], "drop --group-size"),
    "options without a format": (["compress", "--sym", "--group-size", "64"], "add --weight-format int4"),
    "model id with fp32": (["compress", "--weight-format", "fp32", "--model-id", "Qwen/Qwen3-1.7B"],
                           "--model-id chooses the per-model defaults"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_exit_2(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, message = CASES[name]
    out = tmp_path / "out"
    if argv[0] == "compress":
        argv = argv + ["-o", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("qcompiler: error: ") and message in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_output_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["compress", "-o", str(out)]) == 2
    assert "already exists: pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_corrupt_gguf_is_one_line(gguf_folder, tmp_path, capsys):
    assert main(["compress", str(gguf_folder), "-o", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"cannot load the model in {gguf_folder}" in err
    assert not (tmp_path / "o").exists()
    assert not any(p.name.startswith(".o.tmp") for p in tmp_path.iterdir())


def test_folder_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["compress", str(tmp_path / "empty"), "-o", str(tmp_path / "o")]) == 2
    assert "no frontend reads" in capsys.readouterr().err


def test_unknown_ignored_name_writes_nothing(tmp_path, capsys):
    from tests.conftest import tiny_llama

    folder = tmp_path / "tiny"
    tiny_llama().save_pretrained(folder)
    argv = ["compress", str(folder), "--ignored-scope-name", "nope", "-o", str(tmp_path / "o"), "--quiet"]
    assert main(argv) == 2
    assert "ignored scope name 'nope' matched no node" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_graph_lists_weight_bearing_nodes(tmp_path, capsys):
    from tests.conftest import tiny_llama

    folder = tmp_path / "tiny"
    tiny_llama().save_pretrained(folder)
    capsys.readouterr()
    assert main(["graph", str(folder)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 16
    assert lines[-1].startswith("lm_head/MatMul") and "weight lm_head.weight [256, 96]" in lines[-1]


def test_optimum_cli_spelling_writes_the_same_artifact(tmp_path, capsys):
    from tests.conftest import tiny_llama

    folder = tmp_path / "tiny"
    tiny_llama().save_pretrained(folder)
    argv = ["--weight-format", "int4", "--sym", "--group-size", "32", "--backend", "torch", "--quiet"]
    assert main(["compress", "-m", str(folder), *argv, "--backup-precision", "int8_sym",
                 "--task", "text-generation-with-past", str(tmp_path / "optimum-style")]) == 0
    assert main(["compress", str(folder), *argv, "--backup-mode", "int8_sym", "-o", str(tmp_path / "ours")]) == 0
    a, b = (json.loads((tmp_path / d / "qcompiler_report.json").read_text()) for d in ("optimum-style", "ours"))
    assert a["table"] == b["table"] and a["config"] == b["config"]


@pytest.mark.parametrize("flag", list(NOT_YET))
def test_an_optimum_flag_not_supported_yet_is_named(flag, tmp_path, capsys):
    argv = ["compress", "-o", str(tmp_path / "o"), flag] + ([] if flag in SWITCHES else ["x"])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{flag} is not supported yet" in err
    assert not (tmp_path / "o").exists()
