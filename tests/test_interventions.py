"""User-declared interventions against an independent plain-PyTorch implementation.

`tests/interventions_reference.py` shares no code with nnexp: module names typed per
family, torch hooks, one unpadded prompt per forward pass, metrics written from their
definitions. nnexp runs every declared run of several examples of different lengths in
one left-padded, vectorised trace. Every edit of the vocabulary, several edits at one
hook point, a user's registered edit, the reference-row metrics and reads are checked
on random models of three families; the same experiment runs through `remote-local`
(serialised as for a server, with the user's edit shipped by value) with identical
numbers.
"""

from __future__ import annotations

import html as htmllib
import json
import shutil
import subprocess
import threading
from dataclasses import dataclass

import pytest
import torch

import nnexp
from nnexp import (Activation, Add, Apply, Block, Grid, Interpolate, InterventionExample, InterventionExperiment, Mean,
                   Patch, ProjectOut, Read, Run, Scale, Set, Zero)
from nnexp.errors import ConfigError, DataError
from nnexp.interventions import edit_from_json
from nnexp.tracing.jobs import recorded_traces
from tests import interventions_reference as ref
from tests.recall_reference import knockout_attention
from tests.helpers import assert_close, assert_same_records, tiny_model

FAMILIES = ["gpt2", "llama", "gemma3_text"]

EXAMPLES = [
    InterventionExample(prompt="When Mary and John went to the store, John gave a drink to", answer=" Mary",
                        foil=" John", answers=(" Mary", " John", " the"),
                        prompts={"corrupted": "When Mary and John went to the store, Mary gave a drink to"}),
    InterventionExample(prompt="The capital of France is", answer=" Paris", foil=" London", answers=(" Paris",),
                        prompts={"corrupted": "The capital of Spain is"}),
    InterventionExample(prompt="I think dogs are", answer=" great", foil=" bad", answers=(" great", " good"),
                        prompts={"corrupted": "I think cats are"}),
]


@nnexp.register_edit("test_soft_clamp", "scale * tanh(x / scale): a user's edit, for the tests")
def soft_clamp(x, scale):
    return scale.unsqueeze(-1) * torch.tanh(x / scale.unsqueeze(-1))


def _vectors(shape):
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape.d_model, generator=g), torch.randn(shape.head_dim, generator=g)


@dataclass
class EveryEdit(InterventionExperiment):
    name = "test-every-edit"
    metrics: tuple[str, ...] = ("logit_diff", "kl", "log_prob_change", "top1_agreement", "top10_overlap",
                                "answer_set_prob")
    reference: str | None = "clean"

    def default_examples(self):
        return EXAMPLES

    def runs(self, example, model):
        v, u = _vectors(model)
        return {
            "clean": Run(reads=(Read("resid", "resid_post", 1, positions="all"),
                                Read("probe", "resid_post", 1, positions=(0, -1), direction=v))),
            "corrupted": Run(prompt="corrupted"),
            "patched": Run(Patch(source="clean", site="resid_post", layer=1, positions=(-2, -1)), prompt="corrupted"),
            "patched_head": Run(Patch(source="clean", site="head_out", layer=0, heads=1), prompt="corrupted"),
            "interpolated": Run(Interpolate("clean", 0.3, site="mlp_out", layer=0), prompt="corrupted"),
            "added": Run(Add(v, 2.5, site="resid_pre", layer=1, positions="last")),
            "added_heads": Run(Add(u, -1.5, site="head_out", layer=1, heads=(0, 2), positions=(1, 2))),
            "zeroed": Run(Set(Zero(), site="attn_out", layer=0)),
            "mean": Run(Set(Mean(), site="mlp_out", layer=(1, 2), positions=(0, 2))),
            "scaled": Run(Scale(0.5, site="resid_pre", layer=0)),
            "projected_then_added": Run(ProjectOut(v, site="resid_post", layer=0),
                                        Add(v, 0.7, site="resid_post", layer=0)),
            "blocked": Run(Block(keys=(0, 1), layer=(0, 1))),
            "user": Run(Apply("test_soft_clamp", scale=0.5, site="mlp_out", layer=1)),
            "grid": Grid(lambda layer, c: Run(Add(v, c, site="resid_post", layer=layer),
                                              reads=(Read("out", "attn_out", layer, positions="last"),)),
                         layer=range(model.n_layers), c=[0.0, 3.0]),
        }


def _reference_runs(hf, example_ids, corrupted_ids, all_ids, shape, n_layers):
    """{run: (ids, edits, knockout layers, reads)} of `EveryEdit`, as plain-hook edits."""
    v, u = _vectors(shape)
    n = len(example_ids)
    clean_at = lambda site, layer: ref.run(hf, example_ids, reads=[("x", site, layer, list(range(n)), None)])[1]["x"]  # noqa: E731
    clean_resid1, clean_mlp0 = clean_at("resid_post", 1), clean_at("mlp_out", 0)
    clean_head0 = clean_at("head_out", 0)
    d = u.numel()
    means = {layer: ref.site_mean(hf, all_ids, "mlp_out", layer) for layer in (1, 2)}
    unit = v / v.norm()
    runs = {
        "clean": (example_ids, [], None, [("resid", "resid_post", 1, list(range(n)), None),
                                         ("probe", "resid_post", 1, [0, n - 1], None)]),
        "corrupted": (corrupted_ids, [], None, []),
        "patched": (corrupted_ids, [("resid_post", 1, [n - 2, n - 1], None,
                                     lambda x: clean_resid1[[n - 2, n - 1]])], None, []),
        "patched_head": (corrupted_ids, [("head_out", 0, list(range(n)), 1,
                                          lambda x: clean_head0[:, d : 2 * d])], None, []),
        "interpolated": (corrupted_ids, [("mlp_out", 0, list(range(n)), None,
                                          lambda x: 0.7 * x + 0.3 * clean_mlp0)], None, []),
        "added": (example_ids, [("resid_pre", 1, [n - 1], None, lambda x: x + 2.5 * v)], None, []),
        "added_heads": (example_ids, [("head_out", 1, [1, 2], head, lambda x: x - 1.5 * u) for head in (0, 2)], None,
                        []),
        "zeroed": (example_ids, [("attn_out", 0, list(range(n)), None, lambda x: torch.zeros_like(x))], None, []),
        "mean": (example_ids, [("mlp_out", layer, [0, 2], None, lambda x, layer=layer: means[layer].expand_as(x))
                               for layer in (1, 2)], None, []),
        "scaled": (example_ids, [("resid_pre", 0, list(range(n)), None, lambda x: 0.5 * x)], None, []),
        "projected_then_added": (example_ids, [
            ("resid_post", 0, list(range(n)), None, lambda x: x - (x @ unit)[:, None] * unit[None]),
            ("resid_post", 0, list(range(n)), None, lambda x: x + 0.7 * v)], None, []),
        "blocked": (example_ids, [], (0, 1), []),
        "user": (example_ids, [("mlp_out", 1, list(range(n)), None, lambda x: 0.5 * torch.tanh(x / 0.5))], None, []),
    }
    for layer in range(n_layers):
        for c in (0.0, 3.0):
            runs[("grid", layer, c)] = (example_ids, [("resid_post", layer, list(range(n)), None,
                                                       lambda x, c=c: x + c * v)], None,
                                        [("out", "attn_out", layer, [n - 1], None)])
    return runs


def _reference_values(hf, runs, answer, foil, answers):
    out = {}
    for key, (ids, edits, knocked, reads) in runs.items():
        if knocked:
            with knockout_attention(hf, knocked, [0, 1]):
                logits, saved = ref.run(hf, ids, edits, reads)
        else:
            logits, saved = ref.run(hf, ids, edits, reads)
        out[key] = (logits, saved)
    clean = out["clean"][0]
    metrics = {}
    for key, (logits, _) in out.items():
        metrics[key] = {"logit_diff": ref.logit_diff(logits, answer, foil), "kl": ref.kl(clean, logits),
                        "log_prob_change": ref.log_prob_change(clean, logits, answer),
                        "top1_agreement": ref.top1_agreement(clean, logits),
                        "top10_overlap": ref.top10_overlap(clean, logits),
                        "answer_set_prob": ref.answer_set_prob(logits, answers)}
    return metrics, {key: saved for key, (_, saved) in out.items()}


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return tiny_model(request.param)


def _run(experiment, model, tmp_path, **options):
    return nnexp.run(experiment, model=model, out=tmp_path / "run", figures=False, **options)


def test_every_edit_metric_and_read_matches_plain_hooks(family_model, tmp_path):
    model = family_model
    results = _run(EveryEdit(), model, tmp_path)
    compiled = EveryEdit().compile(model)
    tok = model.tokenizer
    all_ids = [tok(example.prompt).input_ids for example in EXAMPLES]
    assert len({len(ids) for ids in all_ids}) == 3  # one trace, left-padded
    for record, example in zip(results, EXAMPLES):
        ids, corrupted = tok(example.prompt).input_ids, tok(example.prompts["corrupted"]).input_ids
        answer, foil = record.info["answer_id"], record.info["foil_id"]
        answers = record.info["answer_ids"]
        runs = _reference_runs(model.hf, ids, corrupted, all_ids, compiled.shape, compiled.shape.n_layers)
        metrics, reads = _reference_values(model.hf, runs, answer, foil, answers)
        for run in [key for key in runs if isinstance(key, str)]:
            for metric, expected in metrics[run].items():
                got = record.scalars[f"{run}.{metric}"]
                what = f"{model.name} example {record.index} {run} {metric}"
                if metric in ("top1_agreement", "top10_overlap"):
                    assert got == pytest.approx(expected, abs=1e-6), what
                elif metric == "kl" and run in ("clean",):
                    assert abs(got) < 1e-6, what
                else:
                    assert abs(got - expected) <= 1e-4 * max(1.0, abs(expected)), (what, got, expected)
            if run != "clean":
                assert record.scalars[f"{run}.logit_diff.change"] == pytest.approx(
                    record.scalars[f"{run}.logit_diff"] - record.scalars["clean.logit_diff"], abs=1e-6)
        grid = record["grid.logit_diff"]
        assert grid.dims == ("layer", "c") and grid.coords["c"] == [0.0, 3.0]
        expected = torch.tensor([[metrics[("grid", layer, c)]["logit_diff"] for c in (0.0, 3.0)]
                                 for layer in range(compiled.shape.n_layers)])
        assert_close(grid.values, expected, f"{model.name} grid logit_diff")
        assert_close(record["grid.kl"].values, [[metrics[("grid", layer, c)]["kl"] for c in (0.0, 3.0)]
                                                for layer in range(compiled.shape.n_layers)], "grid kl", atol=1e-6)
        assert record["clean.resid"].dims == ("position", "feature")
        assert_close(record["clean.resid"].values, reads["clean"]["resid"], f"{model.name} read")
        v, _ = _vectors(compiled.shape)
        assert record["clean.probe"].dims == ("position",)
        assert_close(record["clean.probe"].values, reads["clean"]["probe"] @ v, f"{model.name} probe")
        out = record["grid.out"]
        assert out.dims == ("layer", "c", "position", "feature")
        expected = torch.stack([torch.stack([reads[("grid", layer, c)]["out"][0] for c in (0.0, 3.0)])
                                for layer in range(compiled.shape.n_layers)])
        assert_close(out.values[:, :, 0], expected, f"{model.name} grid reads")


def test_activation_addition_matches_plain_hooks(family_model, tmp_path):
    from nnexp_experiments.activation_addition import PROMPTS, ActivationAddition

    model = family_model
    experiment = ActivationAddition(coefficients=(-4.0, 0.0, 2.0, 8.0))
    results = _run(experiment, model, tmp_path, limit=3)
    tok, hf = model.tokenizer, model.hf
    n_layers = hf.config.num_hidden_layers if hasattr(hf.config, "num_hidden_layers") else hf.config.n_layer
    positive, negative = tok("I love").input_ids, tok("I hate").input_ids
    steering = [ref.activation(hf, positive, "resid_pre", layer, -1) - ref.activation(hf, negative, "resid_pre",
                                                                                       layer, -1)
                for layer in range(n_layers)]
    for record, (prompt, answer, foil) in zip(results, PROMPTS):
        ids = tok(prompt).input_ids
        a, f = record.info["answer_id"], record.info["foil_id"]
        base = ref.logit_diff(ref.run(hf, ids)[0], a, f)
        assert record.scalars["base.logit_diff"] == pytest.approx(base, abs=1e-4)
        expected = torch.tensor([[ref.logit_diff(ref.run(hf, ids, [("resid_pre", layer, list(range(len(ids))), None,
                                                                    lambda x, c=c, layer=layer: x + c * steering[layer])])[0], a, f)
                                  for c in experiment.coefficients] for layer in range(n_layers)])
        steered = record["steered.logit_diff"]
        assert steered.dims == ("layer", "coefficient") and steered.coords["layer"] == list(range(n_layers))
        assert_close(steered.values, expected, f"{model.name} activation addition")
        assert_close(record["steered.logit_diff.change"].values, expected - base, f"{model.name} change")
        # coefficient 0 is the unsteered run exactly
        assert torch.equal(record["steered.logit_diff.change"].values[:, 1], torch.zeros(n_layers))


def test_remote_local_gives_identical_numbers_and_ships_the_user_edit(tmp_path):
    model = tiny_model("llama")
    local = _run(EveryEdit(), model, tmp_path / "local", limit=2)
    with recorded_traces(model.use_backend("remote-local")) as rows:
        remote = _run(EveryEdit(), model, tmp_path / "remote", limit=2, backend="remote-local")
    model.use_backend("local")
    assert rows, "nothing ran through remote-local"
    assert_same_records(local.records, remote.records)
    for a, b in zip(local, remote):
        assert a.scalars == b.scalars


def test_traces_split_under_max_rows_give_the_same_numbers(tmp_path):
    model = tiny_model("gpt2")
    whole = _run(EveryEdit(), model, tmp_path / "whole", limit=2)
    with recorded_traces(model) as rows:
        split = _run(EveryEdit(), model, tmp_path / "split", limit=2, max_rows=5)
    assert max(rows) <= 5 and len(rows) > 2
    assert_same_records(whole.records, split.records, exact=False)


def test_spec_saves_the_declared_runs_and_resume_continues(tmp_path):
    from nnexp.store import load_results

    model = tiny_model("gpt2")
    first = _run(EveryEdit(), model, tmp_path, limit=1)
    spec = json.loads((first.path / "spec.json").read_text())
    declared = spec["experiment"]["declared"]
    assert declared["reference"] == "clean"
    runs = declared["runs"]
    assert runs["patched"]["edits"][0] == {"edit": "patch", "site": "resid_post", "layer": 1, "positions": [-2, -1],
                                           "heads": None, "source": "clean"}
    assert runs["user"]["edits"][0]["edit"] == "test_soft_clamp" and runs["user"]["edits"][0]["params"] == {"scale": 0.5}
    assert runs["added"]["edits"][0]["vector"]["vector"] == "given"  # stored by hash
    assert runs["grid"]["grid"] == {"layer": [0, 1, 2], "c": [0.0, 3.0]} and runs["grid"]["n_runs"] == 6
    assert runs["grid"]["last"]["edits"][0]["layer"] == 2 and runs["grid"]["last"]["edits"][0]["coefficient"] == 3.0
    assert len((first.path / "spec.json").read_bytes()) < 20_000  # a sweep's runs are hashed, not listed
    # every edit that holds no given vector comes back from its JSON
    for name in ("patched", "interpolated", "zeroed", "mean", "scaled", "blocked", "user"):
        edit = edit_from_json(runs[name]["edits"][0])
        assert edit.to_json() == runs[name]["edits"][0], name
    more = _run(EveryEdit(), model, tmp_path)  # the same run: computes examples 1 and 2 only
    assert more.path == first.path and len(more) == 3
    assert_same_records(load_results(first.path).records[:1], first.records)


# -- bad input: one line, before anything runs -------------------------------------------------


def _refused(experiment, model, tmp_path, *fragments, error=ConfigError, backend=None):
    with recorded_traces(model) as rows:
        with pytest.raises(error) as caught:
            nnexp.run(experiment, model=model, out=tmp_path / "bad", figures=False,
                      **({"backend": backend} if backend else {}))
    message = str(caught.value)
    assert "\n" not in message and rows == []
    for fragment in fragments:
        assert fragment in message, message
    return message


def _one_run(run, **fields):
    @dataclass
    class One(InterventionExperiment):
        name = "test-one"

        def default_examples(self):
            return EXAMPLES[1:2]

        def runs(self, example, model):
            return {"clean": Run(), "edited": run(model)}

    return One(**fields)


@pytest.fixture(scope="module")
def gpt2():
    return tiny_model("gpt2")


def test_bad_declarations_are_refused_before_anything_runs(gpt2, tmp_path):
    _refused(_one_run(lambda m: Run(Set(Zero(), site="nowhere", layer=0))), gpt2, tmp_path, "nowhere", "resid_pre")
    _refused(_one_run(lambda m: Run(Set(Zero(), site="mlp_out", layer=7))), gpt2, tmp_path, "layer 7", "3 layers")
    _refused(_one_run(lambda m: Run(Add(torch.ones(5), site="resid_post", layer=0))), gpt2, tmp_path,
             "width 5", "width 64")
    _refused(_one_run(lambda m: Run(Scale(2.0, site="resid_post", layer=0, positions=(9,)))), gpt2, tmp_path,
             "position 9", "5 tokens")
    _refused(_one_run(lambda m: Run(Patch(source="nope", site="resid_post", layer=0))), gpt2, tmp_path,
             "reads from run 'nope'")
    _refused(_one_run(lambda m: Run(Set(Zero(), site="mlp_out", layer=0, heads=1))), gpt2, tmp_path,
             "not split into heads")
    _refused(_one_run(lambda m: Run(Add(Activation("elsewhere"), site="mlp_out", layer=0))), gpt2, tmp_path,
             "Activation('elsewhere')")
    _refused(_one_run(lambda m: Run(prompt="missing")), gpt2, tmp_path, "prompt 'missing'")
    _refused(_one_run(lambda m: Run(Patch(source="clean", site="resid_post", layer=0)), reference="nope"), gpt2,
             tmp_path, "reference is 'nope'")


def test_bad_parameters_are_refused_at_construction():
    from nnexp_experiments.activation_addition import ActivationAddition

    with pytest.raises(ConfigError, match="coefficients is empty"):
        ActivationAddition(coefficients=())
    with pytest.raises(ConfigError, match="needs a reference|reference run"):
        _one_run(lambda m: Run(), metrics=("kl",))
    with pytest.raises(ConfigError, match="grid axis 'c' is empty"):
        Grid(lambda c: Run(), c=[])
    with pytest.raises(ConfigError, match="positions"):
        Scale(1.0, site="mlp_out", layer=0, positions="first")
    with pytest.raises(ConfigError, match="built-in edit class"):
        Apply("add", site="mlp_out", layer=0)
    with pytest.raises(ConfigError, match="not a number"):
        Apply("test_soft_clamp", scale="big", site="mlp_out", layer=0)


def test_a_metric_needing_a_foil_refuses_examples_without_one(gpt2, tmp_path):
    @dataclass
    class NoFoil(InterventionExperiment):
        name = "test-no-foil"

        def default_examples(self):
            return [InterventionExample(prompt="The capital of France is", answer=" Paris")]

        def runs(self, example, model):
            return {"clean": Run()}

    _refused(NoFoil(), gpt2, tmp_path, "has no foil", "logit_diff", error=DataError)
    assert _run(NoFoil(metrics=("prob",)), gpt2, tmp_path / "ok")[0].scalars["clean.prob"] > 0


def test_an_edit_that_cannot_be_shipped_is_refused_for_a_remote_backend(tmp_path):
    lock = threading.Lock()

    def locked(x, scale):
        with lock:
            return x * scale.unsqueeze(-1)

    nnexp.register_edit("test_locked", "needs a lock: cannot travel")(locked)
    model = tiny_model("gpt2")
    experiment = _one_run(lambda m: Run(Apply("test_locked", scale=2.0, site="mlp_out", layer=0)))
    assert _run(experiment, model, tmp_path / "local")  # runs here
    _refused(experiment, model, tmp_path, "'test_locked' cannot be shipped", backend="remote-local")
    model.use_backend("local")


def test_activation_addition_figures_have_titles_axes_and_labels(gpt2, tmp_path):
    from nnexp_experiments.activation_addition import ActivationAddition

    experiment = ActivationAddition(coefficients=(-4.0, 0.0, 4.0))
    results = nnexp.run(experiment, model=gpt2, out=tmp_path / "run", limit=2)
    figures = sorted(p.name for p in (results.path / "figures").glob("*.html"))
    assert {"mean-steered-logit_diff-heatmap.html", "mean-steered-logit_diff-lines.html",
            "example-0000-steered-logit_diff-change-heatmap.html", "mean-runs-logit_diff.html"} <= set(figures)
    page = results.path / "figures" / "mean-steered-logit_diff-change-heatmap.html"
    html = page.read_text()
    assert "mean over 2 examples" in html and "activation-addition on tiny-gpt2" in html
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium:  # a real browser draws it (CI installs Chromium)
        drawn = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                "--disable-background-networking", f"--user-data-dir={tmp_path / 'profile'}",
                                "--virtual-time-budget=15000", "--dump-dom", page.as_uri()],
                               capture_output=True, text=True, timeout=120)
        dom = htmllib.unescape(drawn.stdout)
        assert "main-svg" in dom, drawn.stderr[-2000:]
        assert "change in logit_diff from the run 'base'" in dom and ">coefficient<" in dom and ">layer<" in dom
    from nnexp.kinds.interventions.figures import _grid_figures

    (heat, _), (lines, _) = _grid_figures(results[0]["steered.logit_diff"], "t", "logit_diff", tmp_path / "f")
    assert heat.layout.xaxis.title.text == "coefficient" and heat.layout.yaxis.title.text == "layer"
    assert list(heat.layout.xaxis.ticktext) == ["-4", "0", "4"] and list(heat.layout.yaxis.ticktext) == ["0", "1", "2"]
    assert lines.layout.xaxis.title.text == "coefficient" and len(lines.data) == 3  # one line per layer


def test_activation_addition_on_smollm2_matches_plain_hooks(smollm2, tmp_path):
    from nnexp_experiments.activation_addition import PROMPTS, ActivationAddition

    layers, coefficients = (0, 9, 19, 29), (-8.0, 0.0, 4.0)
    experiment = ActivationAddition(layers=layers, coefficients=coefficients)
    results = _run(experiment, smollm2, tmp_path, limit=2)
    tok, hf = smollm2.tokenizer, smollm2.hf
    positive, negative = tok("I love").input_ids, tok("I hate").input_ids
    for record, (prompt, _, _) in zip(results, PROMPTS):
        ids = tok(prompt).input_ids
        a, f = record.info["answer_id"], record.info["foil_id"]
        expected = []
        for layer in layers:
            v = ref.activation(hf, positive, "resid_pre", layer, -1) - ref.activation(hf, negative, "resid_pre", layer, -1)
            expected.append([ref.logit_diff(ref.run(hf, ids, [("resid_pre", layer, list(range(len(ids))), None,
                                                                lambda x, c=c, v=v: x + c * v)])[0], a, f)
                             for c in coefficients])
        assert_close(record["steered.logit_diff"].values, expected, "SmolLM2 activation addition")


def test_metrics_at_another_position_match_plain_hooks(gpt2, tmp_path):
    """metric_position counts from the end (-2) or the start (3), per example length."""
    v, _ = _vectors(EveryEdit().compile(gpt2).shape)
    for position in (-2, 3):
        experiment = _one_run(lambda m: Run(Add(v, 1.5, site="resid_post", layer=0)), metric_position=position,
                              metrics=("logit_diff", "kl"), reference="clean")
        record = _run(experiment, gpt2, tmp_path / str(position))[0]
        example = EXAMPLES[1]
        ids = gpt2.tokenizer(example.prompt).input_ids
        a, f = record.info["answer_id"], record.info["foil_id"]
        clean = ref.run(gpt2.hf, ids, logits_position=position)[0]
        edited = ref.run(gpt2.hf, ids, [("resid_post", 0, list(range(len(ids))), None, lambda x: x + 1.5 * v)],
                         logits_position=position)[0]
        assert record.scalars["edited.logit_diff"] == pytest.approx(ref.logit_diff(edited, a, f), abs=1e-4)
        assert record.scalars["edited.kl"] == pytest.approx(ref.kl(clean, edited), abs=1e-5)
        assert record.scalars["clean.logit_diff"] == pytest.approx(ref.logit_diff(clean, a, f), abs=1e-4)


def test_the_command_line_runs_and_refuses_with_one_line(tmp_path, capsys):
    from nnexp.cli import main
    from tests.helpers import cli, save_tiny_model

    folder = save_tiny_model("gpt2", tmp_path / "model")
    ok = cli("run", "activation-addition", "--model", folder, "--layers", "0,2", "--set", "coefficients=-2,0,2",
             "--limit", 1, "--no-figures", "--quiet", "--out", tmp_path / "run", "--backend", "remote-local")
    assert ok.returncode == 0, ok.stderr
    record = nnexp.load_results(tmp_path / "run")[0]
    assert record["steered.logit_diff"].coords == {"layer": [0, 2], "coefficient": [-2.0, 0.0, 2.0]}
    # the refusals in-process: the same main() the command runs, without starting Python again
    for options, fragment in ((["--set", "coefficients="], "coefficients"), (["--layers", "5"], "layer 5"),
                              (["--set", "site=nowhere"], "nowhere")):
        capsys.readouterr()
        assert main(["run", "activation-addition", "--model", str(folder), "--quiet", *options]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("nnexp: error:")]
        assert len(errors) == 1 and fragment in errors[0], errors
    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    assert "project_out" in listed and "interventions" in listed and "kl " in listed


def test_activation_addition_metric_field_is_checked_like_metrics():
    from nnexp_experiments.activation_addition import ActivationAddition

    assert ActivationAddition(metric="kl").metrics == ("kl",)  # its reference is the unsteered run
    with pytest.raises(ConfigError, match="compares each run with a reference run"):
        ActivationAddition(metric="kl", reference=None)
    with pytest.raises(ConfigError, match="unknown metric 'nope'"):
        ActivationAddition(metric="nope")


def test_reads_under_a_memory_budget_split_traces_and_keep_the_numbers(tmp_path):
    from nnexp.tracing.memory import peak_memory

    model = tiny_model("gpt2")
    with peak_memory() as whole_peak:
        whole = _run(EveryEdit(), model, tmp_path / "whole")
    for fraction in (3, 2, 1.5):
        budget = int(whole_peak["cpu"] / fraction)
        try:
            with recorded_traces(model) as rows, peak_memory() as split_peak:
                split = _run(EveryEdit(), model, tmp_path / f"split-{fraction}", memory_budget=budget)
            break
        except ConfigError as error:
            assert "is below what" in str(error) or "below" in str(error)
    assert len(rows) > 1 and split_peak["cpu"] <= budget
    assert_same_records(whole.records, split.records, exact=False)
