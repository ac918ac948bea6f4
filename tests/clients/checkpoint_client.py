"""Run in the clients' venv (.venv-clients): load checkpoint folders the way their users do, with
transformers' `from_pretrained` and each format's own package (gptqmodel + optimum, auto-round,
compressed-tensors), and print one line per folder, `RESULT {json}`: the class of the first
quantized Linear, the logits of `ids` and the greedy tokens after them.

    python checkpoint_client.py '[ids]' NEW_TOKENS FOLDER...
"""

import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

ids, new_tokens = json.loads(sys.argv[1]), int(sys.argv[2])
for folder in sys.argv[3:]:
    config = json.load(open(os.path.join(folder, "config.json")))["quantization_config"]
    kwargs = {}
    if config["quant_method"] == "compressed-tensors" and not config["config_groups"]["group_0"]["weights"]["symmetric"]:
        # transformers 5.24 + compressed-tensors 0.20 refuse, when running compressed, the packed zero points
        # compressed-tensors itself writes ([out*bits/32, groups]); decompressing on load reads them
        from transformers import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(run_compressed=False)
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", **kwargs)
    linear = model.model.layers[0].self_attn.q_proj
    tensor = torch.tensor([ids])
    with torch.no_grad():
        logits = model(tensor).logits[0].float()
        out = model.generate(tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=model.config.eos_token_id)
    print("RESULT " + json.dumps({"folder": folder, "linear": type(linear).__module__ + "." + type(linear).__qualname__,
                                  "dtype": str(model.dtype), "logits": logits.tolist(),
                                  "tokens": out[0, len(ids):].tolist()}), flush=True)
