"""IOI attribution patching: AtP and AtP* estimates of every residual, sublayer and
head x position cell, the top cells and a random sample verified by exact patching.

    nnexp run ioi-attribution-patching                         # 8 generated pairs on smollm2-135m
    nnexp run ioi-attribution-patching --set top_k=100 --set sample=200
"""

from __future__ import annotations

from dataclasses import dataclass

from nnexp.kinds.attribution_patching import AttributionPatchingExperiment

from .ioi import builtin_pairs, check_builtin


@dataclass
class IOIAttributionPatching(AttributionPatchingExperiment):
    name = "ioi-attribution-patching"
    description = "attribution patching (AtP, AtP*: GradDrop and the QK fix) on IOI, top cells verified by exact patching"

    # Built-in data: "generated" (seeded, all templates) or "classic" (TransformerLens' 8 prompts).
    dataset: str = "generated"
    n_examples: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_builtin(self.dataset, self.n_examples)

    def default_examples(self):
        return builtin_pairs(self.dataset, self.n_examples, self.seed)
