"""IOI activation patching: where does the model move "who is the indirect object"?

Patches the clean run into the corrupted one (S2 swapped for the IO name) at every
layer and position of the residual stream, the attention output and the MLP output,
and every attention head (all positions at once), measuring
logit(IO) - logit(S) at the last position.

    nnexp run ioi-patching                       # 8 generated prompts on smollm2-135m
    nnexp run ioi-patching --data my_pairs.jsonl # {"clean", "corrupted", "answer", "foil"} per line
"""

from __future__ import annotations

from dataclasses import dataclass

from nnexp.kinds.patching import PatchingExperiment

from .ioi import builtin_pairs, check_builtin


@dataclass
class IOIPatching(PatchingExperiment):
    name = "ioi-patching"
    description = "activation patching on indirect-object identification: residual stream, attention, MLP, heads"

    sites: tuple[str, ...] = ("resid_post", "attn_out", "mlp_out", "head_out")
    # Built-in data: "generated" (seeded, all templates) or "classic" (TransformerLens' 8 prompts).
    dataset: str = "generated"
    n_examples: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_builtin(self.dataset, self.n_examples)

    def default_examples(self):
        return builtin_pairs(self.dataset, self.n_examples, self.seed)
