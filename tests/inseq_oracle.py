"""Run Inseq's layer gradient x activation; executed by the Inseq environment's python.

    python inseq_oracle.py REQUEST.json OUT.safetensors

REQUEST.json: {"model": folder saved with save_pretrained (model and tokenizer),
"module": the MLP's path inside the model with "{layer}" for the layer number,
"layers": [...], "metrics": ["contrast_prob_diff", "contrast_logits_diff"],
"examples": [{"prompt": ..., "target": " Paris", "contrast": " Rome"}, ...]}.

For metric M, example i and layer L it writes `raw.M.i.L` (Inseq's
target_attributions for the one generated step, [prompt positions, hidden]; the
generated token's own row, which Inseq leaves NaN, is dropped), `agg.M.i.L` (the same
after Inseq's default aggregation, [prompt positions]), `score.M.i` (the step score
of the metric) and `tokens.i` (the prompt's token ids as Inseq saw them).

This file imports only what the Inseq environment has: not nnexp, not pytest.
"""

import json
import sys

import inseq
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def module_at(root, path):
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def main(request_path, out_path):
    request = json.loads(open(request_path).read())
    tokenizer = AutoTokenizer.from_pretrained(request["model"])
    hf = AutoModelForCausalLM.from_pretrained(request["model"], dtype=torch.float32, attn_implementation="eager").eval()
    out = {}
    for metric, layer in [(m, layer) for m in request["metrics"] for layer in request["layers"]]:
        target_layer = module_at(hf, request["module"].format(layer=layer))
        model = inseq.load_model(hf, "layer_gradient_x_activation", tokenizer=tokenizer, target_layer=target_layer)
        for i, example in enumerate(request["examples"]):
            prompt = example["prompt"]
            result = model.attribute(
                prompt,
                prompt + example["target"],
                attributed_fn=metric,
                contrast_targets=prompt + example["contrast"],
                step_scores=[metric],
                show_progress=False,
            )
            sequence = result.sequence_attributions[0]
            raw = sequence.target_attributions  # [positions incl. the generated token, 1 step, hidden]
            n_prompt = raw.shape[0] - 1
            out[f"raw.{metric}.{i}.{layer}"] = raw[:n_prompt, 0].float().contiguous()
            aggregated = sequence.aggregate().target_attributions  # [positions, 1 step]
            out[f"agg.{metric}.{i}.{layer}"] = aggregated[:n_prompt, 0].float().contiguous()
            out[f"score.{metric}.{i}"] = sequence.step_scores[metric].float().reshape(-1)[:1].contiguous()
            out[f"tokens.{i}"] = torch.tensor([t.id for t in sequence.target[:n_prompt]])
    save_file(out, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
