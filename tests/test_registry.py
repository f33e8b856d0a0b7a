"""Registries, plugins and the catalogue: names resolve the same way for every sort of thing,
a user's module adds names from Python and the command line, and nothing on a user's
sys.path can hide the ready-made experiments."""

from __future__ import annotations

import ast
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

import nnexp
from nnexp import ConfigError
from nnexp.cli import main
from nnexp.registry import Registry
from tests.helpers import REPO

pytestmark = pytest.mark.fast


def test_registry_names_what_it_knows_and_refuses_a_second_owner():
    registry: Registry = Registry("widget", load_plugins=False)

    @registry.register("spanner", description="turns nuts")
    def spanner():
        pass

    assert registry.get("spanner") is spanner and "spanner" in registry and registry.names() == ["spanner"]
    assert registry.describe("spanner") == "turns nuts"
    with pytest.raises(ConfigError, match=r"unknown widget 'hammer'; choose one of: spanner"):
        registry.get("hammer")
    with pytest.raises(ConfigError, match="widget 'spanner' is already registered"):
        registry.register("spanner", lambda: None)
    registry.register("spanner", spanner)  # the same object again (a module imported twice) is fine
    replacement = registry.register("spanner", lambda: None, replace=True)
    assert registry.get("spanner") is replacement


def test_every_registry_holds_the_built_in_names():
    assert nnexp.KINDS.names() == ["patching", "logit-attribution", "gradient-attribution", "attention-knockout",
                                   "attribute-extraction", "sublayer-knockout", "causal-tracing", "interventions",
                                   "attribution-patching"]
    for name, cls in nnexp.KINDS.items():
        assert issubclass(cls, nnexp.Experiment) and getattr(nnexp, cls.__name__) is cls, name
    assert {"ioi-patching", "logit-lens", "counterfact-attribution", "causal-tracing"} <= set(nnexp.EXPERIMENTS)
    for name, cls in nnexp.EXPERIMENTS.items():
        assert cls.name == name and any(issubclass(cls, kind) for kind in dict(nnexp.KINDS.items()).values())
    # (other tests register a user's site or metric for the rest of the session: the built-in ones come first)
    assert nnexp.SITES.names()[:5] == ["resid_pre", "resid_post", "attn_out", "mlp_out", "head_out"]
    assert nnexp.EDITS.names()[:7] == ["patch", "interpolate", "add", "set", "scale", "project_out", "block"]
    assert {"logit_diff", "prob", "rank", "contrast_prob_diff"} <= set(nnexp.METRICS)


def test_a_project_experiments_package_does_not_hide_the_catalogue(tmp_path, monkeypatch):
    # The most common folder name in research repositories, first on sys.path.
    own = tmp_path / "experiments"
    own.mkdir()
    (own / "__init__.py").write_text("MINE = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "experiments", raising=False)
    import experiments

    assert experiments.MINE
    assert nnexp.find_experiment("ioi-patching").__module__ == "nnexp_experiments.ioi_patching"


def test_the_library_does_not_import_the_catalogue():
    for path in (REPO / "nnexp").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not any(name.split(".")[0] in ("experiments", "nnexp_experiments") for name in names), path


def test_the_tracing_layer_knows_no_kind():
    for path in (REPO / "nnexp" / "tracing").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = "." * node.level + (node.module or "")
                assert "kinds" not in target.split("."), f"{path} imports {target}"


def test_every_package_is_installed():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(path.parent.relative_to(REPO).parts) for path in (REPO / "nnexp").rglob("__init__.py")}
    assert found <= listed, f"add to pyproject.toml's packages: {sorted(found - listed)}"
    assert config["package-dir"] == {"nnexp_experiments": "experiments"} and "nnexp_experiments" in listed
    folders = {path.parent for path in (REPO / "nnexp").rglob("*.py")}
    assert all((folder / "__init__.py").exists() for folder in folders), "every folder of nnexp/ is a package"


PLUGIN = '''
import torch
import nnexp
from nnexp.sites import RANKS
from nnexp.sites import HookPoint


@nnexp.register_metric("{metric}", "answer logit minus the mean logit")
def answer_over_mean(logits, answer, foil):
    return logits.gather(-1, answer[:, None])[:, 0] - logits.mean(-1)


@nnexp.register_site("{site}", "the block's input layer norm output")
def ln1_out(layer, arch):
    return HookPoint(f"{{arch.block(layer)}}.ln_1", "output", None, (layer, RANKS["resid_pre"] + 0.5))
'''


def write_plugin(tmp_path: Path, metric: str, site: str) -> Path:
    path = tmp_path / f"plugin_{metric}.py"
    path.write_text(textwrap.dedent(PLUGIN.format(metric=metric, site=site)))
    return path


def test_include_adds_names_to_the_command_line(tmp_path, capsys):
    plugin = write_plugin(tmp_path, "answer_over_mean_cli", "ln1_out_cli")
    assert main(["list", "--include", str(plugin)]) == 0
    out = capsys.readouterr().out
    assert "answer_over_mean_cli" in out and "answer logit minus the mean logit" in out
    assert "ln1_out_cli" in out
    for section in ("experiment kinds", "experiments:", "sites:", "edits:", "metrics:"):
        assert section in out
    assert main(["list", "--include", str(tmp_path / "missing.py")]) == 2
    assert "--include" in capsys.readouterr().err
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    assert main(["list", "--include", str(broken)]) == 2
    assert "failed to import: RuntimeError: boom" in capsys.readouterr().err


def test_plugin_entry_points_are_loaded():
    from importlib.metadata import entry_points

    names = {entry.name: entry.value for entry in entry_points(group="nnexp.plugins")}
    assert names.get("experiments") == "nnexp_experiments"


def test_every_kind_has_an_oracle_and_a_place_in_the_matrices(tmp_path):
    from tests.helpers import KIND_ORACLES, kind_experiments, make_gpt2_tokenizer

    kinds = set(nnexp.KINDS.names())
    assert kinds == set(KIND_ORACLES), f"kinds without an oracle comparison: {sorted(kinds - set(KIND_ORACLES))}"
    experiments = kind_experiments(tmp_path, make_gpt2_tokenizer())
    assert kinds == set(experiments), "kinds missing from the test matrices (tests/helpers.py kind_experiments)"
    for kind, oracle in KIND_ORACLES.items():
        path, _, test = oracle.partition("::")
        tree = ast.parse((REPO / path).read_text())
        assert test in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}, (kind, oracle)
        assert isinstance(experiments[kind], nnexp.KINDS.get(kind)), kind


@pytest.mark.fast
def test_a_file_already_imported_under_another_name_is_not_run_again(tmp_path, monkeypatch):
    """An experiment file is imported again to rebuild a run's experiment (resume, the
    report): a module already loaded from that file, under any name, is reused, so its
    registrations do not run twice."""
    import importlib.util

    from nnexp.registry import import_file

    path = tmp_path / "my_experiment.py"
    path.write_text("import nnexp\n\n@nnexp.register_edit('twice_test_edit', 'x')\ndef twice(x):\n    return x\n")
    # the file's registration lands in a copy of the registry, gone after the test
    monkeypatch.setattr(nnexp.EDITS, "_entries", dict(nnexp.EDITS._entries))
    monkeypatch.setattr(nnexp.EDITS, "_descriptions", dict(nnexp.EDITS._descriptions))
    spec = importlib.util.spec_from_file_location("pkg.my_experiment", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "pkg.my_experiment", module)
    spec.loader.exec_module(module)
    assert import_file(path) is module  # not run again: a second registration would raise
