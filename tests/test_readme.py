"""The README's commands and code, run as written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, cli

README = (REPO / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def block(containing: str) -> str:
    matches = [b for b in PYTHON_BLOCKS if containing in b]
    assert len(matches) == 1, f"expected one README python block containing {containing!r}"
    return matches[0]


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    script = cwd / "readme_snippet.py"
    script.write_text(code)
    return subprocess.run([sys.executable, str(script)], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_the_two_commands_exist():
    assert "make demo" in README and "make test" in README
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo: setup\n\t\$\(BIN\)/nnexp run ioi-patching$", makefile, flags=re.M)
    assert re.search(r"^test: setup\n\t\$\(BIN\)/python -m pytest", makefile, flags=re.M)
    assert (REPO / ".ci" / "run").read_text().strip().endswith("make test")


@pytest.mark.slow
def test_new_experiment_example_works_as_written(tmp_path, smollm2):
    (tmp_path / "capitals.py").write_text(block("class Capitals(PatchingExperiment)"))
    result = run_python(block("from capitals import Capitals"), tmp_path)
    assert result.returncode == 0, result.stderr
    assert "results/capitals/smollm2-135m/run-" in result.stdout and "LabelledTensor(layer=30, position=5)" in result.stdout
    by_cli = cli("run", "capitals.py", "--quiet", cwd=tmp_path)
    assert by_cli.returncode == 0, by_cli.stderr
    assert by_cli.stdout.strip() in result.stdout  # same run directory: nothing recomputed


@pytest.mark.slow
def test_loading_example_works_on_the_demo_directory(tmp_path, smollm2):
    # --limit does not change the run directory, so one example gives the demo's path
    result = cli("run", "ioi-patching", "--limit", 1, "--no-figures", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    demo_dir = re.search(r"results/ioi-patching/smollm2-135m/run-[0-9a-f]{10}", README).group(0)
    assert result.stdout.strip() == demo_dir
    loaded = run_python(block("record = results[0]") + "\nprint(effect.sel(layer=20).values.shape)\n", tmp_path)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "torch.Size([16])"
    # the notebook example, on the same directory
    shown = run_python(block("results.figure(") + "\nprint(type(results[0].figure('resid_post')).__name__, frame.shape, "
                       "array.dims, 'mean-roles-resid_post' in results.figures())\n", tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == "Figure (480,) ('layer', 'position') True"


@pytest.mark.slow
def test_counterfact_attribution_example_works_as_written(tmp_path, smollm2):
    result = run_python(block("subject_and_last_profile(results)"), tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "LabelledTensor(layer=30, position=5)" and lines[1] == "68 [0, 16, 23]"


@pytest.mark.slow
def test_factual_recall_example_works_as_written(tmp_path, smollm2):
    result = run_python(block("from nnexp_experiments.factual_recall import"), tmp_path)
    assert result.returncode == 0, result.stderr
    knocked, mlp, attn = (json.loads(line) for line in result.stdout.strip().splitlines()[-3:])
    assert knocked[0] > -0.35 and knocked[1] < -0.6
    assert mlp[0] > 0.1 and mlp[0] > 3 * abs(mlp[1])
    assert attn[1] > 0.1 and attn[1] > 3 * abs(attn[0])


def test_writing_your_own_experiment_examples_work_local_and_remote_alike(tmp_path, monkeypatch):
    """The two worked examples, as written, on a random GPT-2: the same numbers locally and
    through remote-local; and the catalogue's activation-addition is the same experiment."""
    import nnexp
    from nnexp_experiments.activation_addition import ActivationAddition
    from tests.helpers import assert_same_records, tiny_model

    (tmp_path / "steer.py").write_text(block("class Steer(InterventionExperiment)"))
    (tmp_path / "ablate_head.py").write_text(block("class AblateHead(InterventionExperiment)"))
    monkeypatch.syspath_prepend(str(tmp_path))
    from ablate_head import AblateHead
    from steer import Steer

    model = tiny_model("gpt2")
    for experiment in (Steer(), AblateHead(layer=1, head=2)):
        local = nnexp.run(experiment, model=model, out=tmp_path / experiment.name / "local", figures=False)
        remote = nnexp.run(experiment, model=model, out=tmp_path / experiment.name / "remote", figures=False,
                           backend="remote-local")
        model.use_backend("local")
        assert_same_records(local.records, remote.records)
        assert local[0].scalars == remote[0].scalars
    assert set(local[0].scalars) == {f"{run}.{metric}" for run in ("clean", "ablated")
                                     for metric in ("kl", "logit_diff", "top1_agreement")} | {"ablated.logit_diff.change"}
    steered = nnexp.load_results(tmp_path / "steer" / "local")[0]["steered.logit_diff"]
    catalogue = nnexp.run(ActivationAddition(coefficients=(-8.0, 0.0, 8.0)), model=model, limit=1, figures=False,
                          out=tmp_path / "catalogue")[0]["steered.logit_diff"]
    assert torch.equal(steered.values, catalogue.values)


@pytest.mark.slow
def test_writing_your_own_experiment_usage_works_as_written(tmp_path, smollm2):
    (tmp_path / "steer.py").write_text(block("class Steer(InterventionExperiment)"))
    (tmp_path / "ablate_head.py").write_text(block("class AblateHead(InterventionExperiment)"))
    result = run_python(block("from ablate_head import AblateHead"), tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "LabelledTensor(layer=30, coefficient=3)"
    scalars = eval(lines[1])  # noqa: S307 - our own printed dict
    assert scalars["ablated.kl"] > 0 and set(scalars) == {"ablated.kl", "ablated.logit_diff",
                                                          "ablated.logit_diff.change", "ablated.top1_agreement"}
    clamp = run_python(block('register_edit("clamp"') + "\nprint(clamp(torch.tensor([[3.0, -0.5]]), "
                       "torch.tensor([2.0])).tolist())\n", tmp_path)
    assert clamp.returncode == 0, clamp.stderr
    assert clamp.stdout.strip() == "[[2.0, -0.5]]"
