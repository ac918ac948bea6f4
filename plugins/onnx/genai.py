"""onnxruntime-genai's `genai_config.json` for a causal-LM artifact, so `onnxruntime_genai.Model(folder)`
generates from the same folder (its "config only" route: a model built outside its builder).

The decoder's I/O names are optimum's, which are also genai's defaults; the KV cache grows by
concatenation, so `past_present_share_buffer` is false. `type` is the family when genai knows it,
else its generic "decoder".
"""

from __future__ import annotations

import json
from pathlib import Path

GENAI_CONFIG = "genai_config.json"
GENAI_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gemma", "gemma2", "gemma3_text", "olmo",
               "granite", "chatglm", "nemotron", "smollm3", "gpt2", "decoder")


def write_genai_config(spec, model_file: str, out_dir: Path) -> list[str]:
    info = spec.model_info
    heads, head_size = spec.past_shapes[0]
    context = int(info.get("context_length") or 2048)
    eos = info.get("eos_token_id")
    config = {
        "model": {
            "bos_token_id": info.get("bos_token_id"),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": model_file, "head_size": head_size, "hidden_size": info.get("hidden_size"),
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": info.get("num_attention_heads"), "num_hidden_layers": len(spec.cache),
                "num_key_value_heads": heads,
            },
            "eos_token_id": eos, "pad_token_id": info.get("pad_token_id", eos),
            "type": info.get("model_type") if info.get("model_type") in GENAI_TYPES else "decoder",
            "vocab_size": info.get("vocab_size"),
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 50, "top_p": 1.0},
    }
    (out_dir / GENAI_CONFIG).write_text(json.dumps(config, indent=2))
    return [GENAI_CONFIG]
