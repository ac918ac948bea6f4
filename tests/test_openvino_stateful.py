import numpy as np
import pytest

from qcompiler import CompressionConfig, compress
from qcompiler.generate import token_chooser
from qcompiler.plugins.openvino import OpenVINORunner
from tests.conftest import tiny_llama


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("stateful") / "int4"
    compress(tiny_llama(), CompressionConfig(mode="int4_sym", group_size=32), output=out)
    return out


def test_layout_is_optimums(artifact):
    import openvino as ov

    model = ov.Core().read_model(artifact / "openvino_model.xml")
    assert [i.get_any_name() for i in model.inputs] == ["input_ids", "attention_mask", "position_ids", "beam_idx"]
    assert [o.get_any_name() for o in model.outputs] == ["logits"]
    assert len(model.get_sinks()) == 4  # keys and values of 2 layers
    assert model.input("beam_idx").get_element_type() == ov.Type.i32


def test_token_by_token_equals_full_forward(artifact):
    runner = OpenVINORunner(artifact / "openvino_model.xml")
    prompt = [5, 17, 200, 3]
    new = runner.generate(prompt, 6, token_chooser())
    full = runner.logits(np.array([prompt + new]))
    assert new == [int(t) for t in full[0, len(prompt) - 1:-1].argmax(-1)]


def test_beam_idx_reorders_the_cache(artifact):
    runner = OpenVINORunner(artifact / "openvino_model.xml")
    rows = np.array([[5, 17, 200], [9, 8, 7]])
    runner.logits(rows)  # prefill two rows
    step = {"input_ids": np.array([[42], [42]]), "attention_mask": np.ones((2, 4), np.int64),
            "position_ids": np.array([[3], [3]]), "beam_idx": np.array([1, 1], np.int32)}
    both = runner.request.infer(step)["logits"]
    row1 = runner.logits(np.array([[9, 8, 7, 42]]))[0, -1]
    row0 = runner.logits(np.array([[5, 17, 200, 42]]))[0, -1]  # what row 0 would give without the reorder
    # CPU kernels differ by ~1e-3 between batch sizes (dynamic activation quantization); the reorder by far more
    assert np.abs(row0 - row1).max() > 20 * 5e-3
    assert np.abs(both[0, -1] - row1).max() < 5e-3 and np.abs(both[1, -1] - row1).max() < 5e-3


def test_token_chooser():
    logits = np.array([0.0, 3.0, 1.0, 2.9])
    assert token_chooser()(logits) == 1
    assert token_chooser(sample=True, top_k=1)(logits) == 1
    draws = [token_chooser(sample=True, top_k=2, seed=s)(logits) for s in range(200)]
    assert set(draws) == {1, 3}
    again = [token_chooser(sample=True, top_k=2, seed=s)(logits) for s in range(200)]
    assert draws == again


def test_optimum_flags_stateless_no_tokenizer_pad_token(tmp_path):
    """optimum-cli's --disable-stateful (the cache as past_key_values.N.* inputs and present.N.* outputs,
    no beam_idx), --disable-convert-tokenizer (no OpenVINO tokenizer models) and --pad-token-id (written
    into config.json): the stateless artifact generates what the stateful one does, token by token."""
    import json

    import openvino as ov

    from qcompiler import QCompilerError
    from qcompiler.cli import main

    folder = tmp_path / "tiny"
    tiny_llama().save_pretrained(folder)
    from tests.conftest import tiny_tokenizer

    tiny_tokenizer().save_pretrained(folder)
    common = ["compress", str(folder), "--weight-format", "int8", "--quiet"]
    assert main([*common, "-o", str(tmp_path / "stateful")]) == 0
    assert main([*common, "--disable-stateful", "--disable-convert-tokenizer", "--pad-token-id", "3",
                 "-o", str(tmp_path / "stateless")]) == 0
    out = tmp_path / "stateless"
    model = ov.Core().read_model(out / "openvino_model.xml")
    names = [i.get_any_name() for i in model.inputs]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and "beam_idx" not in names
    assert names[3:] == [f"past_key_values.{i}.{k}" for i in range(2) for k in ("key", "value")]
    assert [o.get_any_name() for o in model.outputs][1:] == [f"present.{i}.{k}" for i in range(2)
                                                              for k in ("key", "value")]
    assert not model.get_sinks() and not list(out.glob("openvino_*tokenizer.xml"))
    assert list((tmp_path / "stateful").glob("openvino_*tokenizer.xml"))
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == 3
    assert json.loads((out / "generation_config.json").read_text())["pad_token_id"] == 3
    prompt = [5, 17, 200, 3]
    stateless = OpenVINORunner(out / "openvino_model.xml").generate(prompt, 8, token_chooser())
    assert stateless == OpenVINORunner(tmp_path / "stateful" / "openvino_model.xml").generate(prompt, 8, token_chooser())
    assert main([*common, "--disable-stateful", "--backend", "torch", "-o", str(tmp_path / "t")]) == 2
    assert main(["compress", str(out), "--weight-format", "int8", "--disable-convert-tokenizer", "-o",
                 str(tmp_path / "t")]) == 2  # an OpenVINO input keeps its own layout and files
    assert not (tmp_path / "t").exists()
    with pytest.raises(QCompilerError, match="not a token of this model"):
        compress(folder, CompressionConfig(mode="int8_asym"), output=tmp_path / "p", pad_token_id=10**6)
