"""Model specs registered through `qcompiler_register_model_specs`: a family's block path, loader and
default ignored scope, taken by the torch frontend, the calibration engine, the OpenVINO conversion
and the pipeline, and named in the report."""

from __future__ import annotations

import json

import pytest
import torch

from qcompiler import CompressionConfig, QCompilerError, compress
from qcompiler.hookspecs import hookimpl
from qcompiler.model_spec import ModelSpec
from qcompiler.plugins.torch import TorchFrontend
from qcompiler.plugins.torch.blocks import find_blocks
from qcompiler.registry import build_registry
from tests.conftest import tiny_llama, tiny_tokenizer


class SpecPlugin:
    def __init__(self, *specs: ModelSpec) -> None:
        self.specs = list(specs)

    @hookimpl
    def qcompiler_register_model_specs(self):
        return self.specs


def _registry(*specs: ModelSpec):
    return build_registry(plugins=[SpecPlugin(*specs)])


@pytest.fixture
def llama_folder(tmp_path):
    folder = tmp_path / "llama"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_block_path_overrides_the_largest_list():
    """A model with a second, larger list of as many same-typed modules: derived, the blocks would be
    that list; the spec's path names the decoder layers."""
    model = tiny_llama()
    model.model.extra = torch.nn.ModuleList(torch.nn.Linear(96, 2048) for _ in range(2))
    assert find_blocks(model)[0] == "model.extra"
    source = TorchFrontend().load(model)
    source.spec = ModelSpec("llama", block_path="model.layers")
    graph = TorchFrontend().trace(source)
    assert TorchFrontend().executor(source, graph).path == "model.layers"
    with pytest.raises(QCompilerError, match="block path 'model.nope' is not a list of modules"):
        find_blocks(model, "model.nope")


def test_ignored_scope_of_the_spec_applies_and_is_reported(llama_folder, tmp_path):
    spec = ModelSpec("llama", ignored_scope=(r"model\.layers\.0\.mlp\.down_proj.*", r"vision_tower\..*"))
    compress(llama_folder, CompressionConfig(mode="int4_sym", group_size=32), output=tmp_path / "out",
             registry=_registry(spec))
    report = json.loads((tmp_path / "out" / "qcompiler_report.json").read_text())
    floats = {r["name"] for r in report["float_weights"]}
    assert "model.layers.0.mlp.down_proj.weight" in floats and "model.layers.1.mlp.down_proj.weight" not in floats
    assert report["model_spec"] == {"name": "llama", "ignored_scope": list(spec.ignored_scope)}
    # the pattern this model has nothing for (a family variant's part) is no error, and is not applied
    assert "vision_tower" not in json.dumps(report["config"])


def test_loader_of_the_spec(llama_folder, tmp_path):
    spec = ModelSpec("llama", loader="AutoModelForCausalLM")
    result = compress(llama_folder, CompressionConfig(mode="int8_asym"), registry=_registry(spec))
    assert result.source.spec is spec
    with pytest.raises(QCompilerError, match="names the loader AutoModelForNothing"):
        compress(llama_folder, CompressionConfig(mode="int8_asym"),
                 registry=_registry(ModelSpec("llama", loader="AutoModelForNothing")))
    with pytest.raises(QCompilerError, match="is not a transformers auto class"):
        ModelSpec("llama", loader="os.system")


def test_bad_specs_are_refused():
    with pytest.raises(QCompilerError, match="not a valid regular expression"):
        ModelSpec("llama", ignored_scope=("(",))
    with pytest.raises(QCompilerError, match="model spec 'llama' is registered twice"):
        build_registry(plugins=[SpecPlugin(ModelSpec("llama")), SpecPlugin(ModelSpec("llama"))])
