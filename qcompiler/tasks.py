"""The tasks qcompiler writes models for, in optimum's names, and what each loads and exports.

optimum-cli infers the task from the config's `architectures` (`BertModel` -> feature-extraction,
`...ForSequenceClassification` -> text-classification, `...ForCausalLM` -> text-generation-with-past);
`--task` overrides it.

Core, not a frontend's: the torch frontend loads a model for its task, backends write the task's
signature, and the torch backend reads an artifact back with the task's transformers class.
"""

from __future__ import annotations

from qcompiler.errors import QCompilerError

CAUSAL = "text-generation-with-past"
# task -> the transformers auto class that loads a model for it
LOADERS = {CAUSAL: "AutoModelForCausalLM", "feature-extraction": "AutoModel",
           "text-classification": "AutoModelForSequenceClassification"}
# an encoder task -> its one exported output
OUTPUTS = {"feature-extraction": "last_hidden_state", "text-classification": "logits"}
ENCODER_TASKS = tuple(OUTPUTS)
ALIASES = {"sequence-classification": "text-classification"}  # optimum's older spelling
# what `task=` / `--task` take ("auto": read from the model's config, as optimum-cli does)
TASKS = (*LOADERS, *ALIASES, "auto")


def task_of(config: dict | None, requested: str | None = None) -> str:
    """The task a model folder's config is for (optimum's inference from `architectures`), or `requested`."""
    if requested not in (None, "auto"):
        return ALIASES.get(requested, requested)
    if config is None:  # a GGUF folder: a causal LM
        return CAUSAL
    architecture = (config.get("architectures") or [""])[0] or ""
    return task_of_class(architecture, config.get("model_type"))


def task_of_class(architecture: str, model_type: str | None = None) -> str:
    """The task of a transformers model class name (`BertModel`, `LlamaForCausalLM`, ...)."""
    if architecture.endswith("ForSequenceClassification"):
        return "text-classification"
    if architecture.endswith(("ForMaskedLM", "ForTokenClassification", "ForQuestionAnswering",
                              "ForMultipleChoice", "ForPreTraining", "ForNextSentencePrediction")):
        raise QCompilerError(f"{architecture} is a model for a task qcompiler does not export yet: pass --task "
                             "feature-extraction to compress its encoder (its head is dropped)")
    if architecture.endswith("Model") and not architecture.endswith("LMHeadModel"):
        return "feature-extraction"
    if not architecture and model_type is not None and not _has_causal_lm(model_type):
        return "feature-extraction"
    return CAUSAL


def _has_causal_lm(model_type: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
