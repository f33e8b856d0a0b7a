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

from nnexp.errors import ConfigError
from nnexp.patching import PatchingExperiment

from .ioi import TEMPLATES, classic_ioi, generate_ioi


@dataclass
class IOIPatching(PatchingExperiment):
    name = "ioi-patching"
    description = "activation patching on indirect-object identification: residual stream, attention, MLP, heads"

    sites: tuple = ("resid_post", "attn_out", "mlp_out", "head_out")
    # Built-in data: "generated" (seeded, all templates) or "classic" (TransformerLens' 8 prompts).
    dataset: str = "generated"
    n_examples: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dataset not in ("generated", "classic"):
            raise ConfigError(f"dataset must be 'generated' or 'classic', got {self.dataset!r}")
        if self.n_examples < 1:
            raise ConfigError(f"n_examples is {self.n_examples}; it must be at least 1")

    def default_examples(self):
        if self.dataset == "classic":
            return classic_ioi()
        return generate_ioi(self.n_examples, seed=self.seed, templates=tuple(TEMPLATES))
