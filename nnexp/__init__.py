"""nnexp: mechanistic-interpretability experiments on Hugging Face causal LMs, via nnsight.

    import nnexp
    from nnexp_experiments.ioi_patching import IOIPatching

    results = nnexp.run(IOIPatching(), model="smollm2-135m")
    results[0]["resid_post"]          # LabelledTensor(layer=30, position=16)
    nnexp.load_results(results.path)  # the same, from disk
"""

__version__ = "0.1.0"

from .compare import Comparison, compare
from .contract import ChunkPlan, CompiledExperiment
from .data import PromptPair, load_prompt_pairs
from .errors import ConfigError, DataError, ModelError, NnexpError, ResultsError
from .experiment import Experiment, find_experiment, register_experiment
from .kinds.attention_knockout import AttentionKnockoutExperiment
from .kinds.attribute_extraction import AttributeExtractionExperiment
from .kinds.attribution_patching import AttributionPatchingExperiment
from .kinds.causal_tracing import CausalTracingExperiment
from .kinds.gradient_attribution import GradientAttributionExperiment
from .kinds.interventions import InterventionExample, InterventionExperiment
from .kinds.logit_attribution import LogitAttributionExperiment
from .kinds.patching import PatchingExperiment
from .kinds.sublayer_knockout import SublayerKnockoutExperiment
from .labelled import LabelledTensor
from .metrics import METRICS, register_metric
from .models import ALIASES, ArchSpec, Model, load_model, register_architecture, wrap_model
from .registry import EXPERIMENTS, KINDS, include
from .results import ExampleRecord, Results
from .report import write_report
from .runner import run
from .sites import SITES, register_site
from .store import load_results
from .interventions import (EDITS, Activation, Add, Apply, Block, Given, Grid, Interpolate, Mean, Patch, ProjectOut, Read,
                            Run, Scale, Set, Zero, register_edit)

__all__ = [
    "Activation",
    "Add",
    "ALIASES",
    "Apply",
    "ArchSpec",
    "AttentionKnockoutExperiment",
    "AttributeExtractionExperiment",
    "AttributionPatchingExperiment",
    "Block",
    "CausalTracingExperiment",
    "ChunkPlan",
    "compare",
    "Comparison",
    "CompiledExperiment",
    "ConfigError",
    "DataError",
    "EDITS",
    "ExampleRecord",
    "Experiment",
    "EXPERIMENTS",
    "find_experiment",
    "Given",
    "GradientAttributionExperiment",
    "Grid",
    "include",
    "Interpolate",
    "InterventionExample",
    "InterventionExperiment",
    "KINDS",
    "LabelledTensor",
    "load_model",
    "load_prompt_pairs",
    "load_results",
    "LogitAttributionExperiment",
    "Mean",
    "METRICS",
    "Model",
    "ModelError",
    "NnexpError",
    "Patch",
    "PatchingExperiment",
    "ProjectOut",
    "PromptPair",
    "Read",
    "register_architecture",
    "register_edit",
    "register_experiment",
    "register_metric",
    "register_site",
    "Results",
    "ResultsError",
    "Run",
    "run",
    "Scale",
    "Set",
    "SITES",
    "SublayerKnockoutExperiment",
    "wrap_model",
    "write_report",
    "Zero",
]
