"""Activation addition (Turner et al. 2023): steer a model by adding the difference of two
prompts' activations, written with nnexp's public intervention vocabulary only.

The steering vector at layer L is the activation of `site` at layer L of the
`positive` prompt at its last token minus the same for the `negative` prompt, each
prompt run on its own. Each steered run adds `c * v_L` to the same site and layer of
the example's prompt at every position, and the model computes everything downstream
from there. All (layer, coefficient) runs of an example, and its unsteered run, go
into one batched trace.

    nnexp run activation-addition                                    # "I love" - "I hate", every layer
    nnexp run activation-addition --set positive=" Paris" --set negative=" London" --layers 4,8
    nnexp run activation-addition --set coefficients=-8,-4,0,4,8 --set metric=prob --data prompts.jsonl

The default pair is "I love" - "I hate" (Turner et al. steer GPT-2 XL with " Love" -
" Hate" after its BOS token). Without a BOS token, as in SmolLM2, a one-token prompt's
only token sits at position 0, where the model parks attention (an attention sink), and
its state says little about the token: on SmolLM2 " Love" - " Hate" moves the logit
difference by the same amount at every layer from 12 on, whichever its sign. Two-token
prompts differ where it matters.

Stored per example: `steered.<metric>` (layer x coefficient), `steered.<metric>.change`
(minus the unsteered run's metric), and the scalar `base.<metric>`.
"""

from __future__ import annotations

from dataclasses import dataclass

from nnexp import Activation, Add, Grid, InterventionExample, InterventionExperiment, Run
from nnexp.errors import ConfigError

# prompts whose answer and foil are single next tokens for GPT-2's, SmolLM2's and Gemma 3's tokenizers
PROMPTS = [
    ("I think this movie is", " great", " terrible"),
    ("The food at this restaurant was", " great", " terrible"),
    ("My day today has been", " great", " terrible"),
    ("Honestly, the service here is", " great", " terrible"),
    ("Overall, I would say the book is", " good", " bad"),
    ("The weather this weekend was", " good", " bad"),
    ("In my opinion, the new design looks", " good", " bad"),
    ("Talking to her always makes me feel", " happy", " sad"),
]


@dataclass
class ActivationAddition(InterventionExperiment):
    """Fields:
        positive, negative: the prompts whose activation difference steers.
        coefficients: the multiples of the steering vector added (a grid axis).
        layers: the layers steered (None = every layer).
        site: where the vector is read and added (default resid_pre, the residual
            stream entering block L).
        metric: what is measured at the last position (default logit_diff).
    """

    name = "activation-addition"
    description = "steer with c * (positive - negative) activations at each layer; metric per layer x coefficient"

    positive: str = "I love"
    negative: str = "I hate"
    coefficients: tuple[float, ...] = (-8.0, -4.0, -2.0, 0.0, 2.0, 4.0, 8.0)
    layers: tuple[int, ...] | None = None
    site: str = "resid_pre"
    metric: str = "logit_diff"
    reference: str | None = "base"

    def __post_init__(self) -> None:
        super().__post_init__()  # every field typed first
        if not self.coefficients:
            raise ConfigError("coefficients is empty; give at least one multiple of the steering vector, e.g. 0,4,8")
        if self.metrics not in (("logit_diff",), (self.metric,)):
            raise ConfigError("activation-addition measures one metric: set metric, not metrics")
        self.metrics = (self.metric,)
        self.check_metrics()

    def default_examples(self) -> list[InterventionExample]:
        return [InterventionExample(prompt=p, answer=a, foil=f) for p, a, f in PROMPTS]

    def prompts(self) -> dict[str, str]:
        return {"positive": self.positive, "negative": self.negative}

    def runs(self, example, model) -> dict:
        steer = Activation("positive") - Activation("negative")  # at the edit's site and layer, last token
        layers = list(range(model.n_layers)) if self.layers is None else list(self.layers)
        return {
            "base": Run(),
            "steered": Grid(lambda layer, coefficient: Run(Add(steer, coefficient, site=self.site, layer=layer)),
                            layer=layers, coefficient=list(self.coefficients)),
        }
