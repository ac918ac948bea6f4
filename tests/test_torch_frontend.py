import torch

from qcompiler.plugins.torch.hf import example_inputs
from qcompiler.plugins.torch.trace import trace_module
from tests.conftest import tiny_llama


def test_llama_weights_and_names():
    model = tiny_llama()
    graph = trace_module(model, example_inputs())
    uses = graph.weight_uses()
    ops = [u.op.op for u in uses]
    assert ops.count("MatMul") == 15 and ops.count("Gather") == 1  # 7 per layer + lm_head; one embedding
    names = {u.op.name for u in uses}
    assert "model.layers.0.mlp.up_proj/MatMul" in names and "lm_head/MatMul" in names
    assert uses[-1].op.name == "lm_head/MatMul"
    # weights are the model's own tensors, not copies
    assert graph.weights["model.layers.0.mlp.down_proj.weight"].data_ptr() == model.model.layers[0].mlp.down_proj.weight.data_ptr()
    assert [o.name for o in graph.outputs] == ["lm_head/MatMul"]


def test_tied_embedding_is_one_weight_with_two_uses():
    graph = trace_module(tiny_llama(tie=True), example_inputs())
    shared = [u for u in graph.weight_uses() if u.const.name == "model.embed_tokens.weight"]
    assert [u.op.op for u in shared] == ["Gather", "MatMul"]
    assert len(graph.weight_constants()) == 15


def test_llama_mlp_has_the_awq_shape():
    graph = trace_module(tiny_llama(), example_inputs())
    down = graph.node("model.layers.1.mlp.down_proj/MatMul")
    mul = down.inputs[0]
    assert mul.op == "Multiply"
    assert {i.op for i in mul.inputs} == {"Swish", "MatMul"}


class Plain(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(32, 64)
        self.conv = torch.nn.Conv1d(4, 8, 3)
        self.fc2 = torch.nn.Linear(64, 16, bias=False)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_plain_module_with_bias_and_unused_conv():
    graph = trace_module(Plain(), {"x": torch.randn(2, 32)})
    text = graph.to_text()
    assert "%fc1/MatMul = MatMul(%x, %fc1.weight) {transpose_b=True}" in text
    assert "%fc1/Add = Add(%fc1/MatMul, %fc1.bias)" in text
    assert [u.op.name for u in graph.weight_uses()] == ["fc1/MatMul", "fc2/MatMul"]


def test_convolution_is_recognized():
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
    graph = trace_module(conv, {"input": torch.randn(1, 3, 8, 8)})
    (use,) = graph.weight_uses()
    assert use.op.op == "Convolution" and use.reduction_axes == (1, 2, 3)
