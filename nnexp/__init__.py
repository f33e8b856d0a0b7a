"""nnexp: mechanistic-interpretability experiments on Hugging Face causal LMs, via nnsight.

    import nnexp
    from experiments.ioi_patching import IOIPatching

    results = nnexp.run(IOIPatching(), model="smollm2-135m")
    results[0]["resid_post"]          # LabelledTensor(layer=30, position=16)
    nnexp.load_results(results.path)  # the same, from disk
"""

__version__ = "0.1.0"

from .data import PromptPair, load_prompt_pairs
from .errors import ConfigError, DataError, ModelError, NnexpError, ResultsError
from .experiment import Experiment, find_experiment
from .labelled import LabelledTensor
from .metrics import METRICS, register_metric
from .models import ALIASES, ArchSpec, Model, load_model, register_architecture, wrap_model
from .kinds.patching import PatchingExperiment
from .results import ExampleRecord, Results
from .runner import run
from .sites import SITES
from .store import load_results

__all__ = [
    "ALIASES",
    "ArchSpec",
    "ConfigError",
    "DataError",
    "ExampleRecord",
    "Experiment",
    "LabelledTensor",
    "METRICS",
    "Model",
    "ModelError",
    "NnexpError",
    "PatchingExperiment",
    "PromptPair",
    "Results",
    "ResultsError",
    "SITES",
    "find_experiment",
    "load_model",
    "load_prompt_pairs",
    "load_results",
    "register_architecture",
    "register_metric",
    "run",
    "wrap_model",
]
