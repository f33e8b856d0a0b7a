"""Inseq's side of bench/attribution.py; runs in the Inseq environment (tests/inseq_env.py).

    python bench/inseq_worker.py REQUEST.json

REQUEST.json: {"model": folder (save_pretrained), "module": path with "{layer}",
"layers": [...], "examples": [{"prompt", "target", "contrast"}, ...], "out": file}.
It loads the model, then answers lines on stdin: "run" makes one attribution call per
layer per example (Inseq's `layer_gradient_x_activation`, contrast probability
difference) and prints the seconds it took; the first run also writes each call's
attribution, summed over the hidden dimension, to "out" (safetensors) for the parent
to check against nnexp. "quit" ends it. Imports nothing from nnexp.
"""

import json
import sys
import time

import inseq
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def module_at(root, path):
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def main(request_path):
    request = json.loads(open(request_path).read())
    torch.set_num_threads(int(request.get("threads", torch.get_num_threads())))
    tokenizer = AutoTokenizer.from_pretrained(request["model"])
    hf = AutoModelForCausalLM.from_pretrained(request["model"], dtype=torch.float32, attn_implementation="eager").eval()
    models = {layer: inseq.load_model(hf, "layer_gradient_x_activation", tokenizer=tokenizer,
                                      target_layer=module_at(hf, request["module"].format(layer=layer)))
              for layer in request["layers"]}
    first = True
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        out = {}
        start = time.perf_counter()
        for layer, model in models.items():
            for i, example in enumerate(request["examples"]):
                prompt = example["prompt"]
                result = model.attribute(prompt, prompt + example["target"], attributed_fn="contrast_prob_diff",
                                         contrast_targets=prompt + example["contrast"], show_progress=False)
                if first:
                    raw = result.sequence_attributions[0].target_attributions  # [positions + 1, 1, hidden]
                    out[f"{i}.{layer}"] = raw[:-1, 0].float().sum(-1).contiguous()
        seconds = time.perf_counter() - start
        if first:
            save_file(out, request["out"])
            first = False
        print(seconds, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
