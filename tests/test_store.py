"""The store, labelled tensors and command-line parsing, without a model: what is written
is what is read back, a run's identity decides its folder, submitted jobs keep what
decoding them needs, and options become the parameters they name."""

from __future__ import annotations

import json

import pytest
import torch

from nnexp import LabelledTensor, ResultsError
from nnexp.cli import _experiment_params, build_parser
from nnexp.kinds.patching import PatchingExperiment
from nnexp.results import ExampleRecord
from nnexp.store import FORMAT, RunDirectory, SubmittedJob, load_results, run_id

pytestmark = pytest.mark.fast


def spec(**params) -> dict:
    return {
        "format": FORMAT,
        "experiment": {"name": "x", "class": "mod:X", "params": {"metric": "logit_diff", **params}},
        "model": {"name": "m", "source": {"kind": "alias"}, "dtype": "float32"},
        "data": {"kind": "builtin", "experiment": "x", "n_examples": 3},
        "run": {"examples_per_trace": 1},
    }


def record(index: int) -> ExampleRecord:
    tensor = LabelledTensor(torch.arange(6.0).reshape(2, 3) + index, ("layer", "position"),
                            {"layer": [0, 5], "position": [0, 1, 2]})
    return ExampleRecord(index, {"effect": tensor}, {"clean": 1.5}, {"tokens": ["a", "b", "c"], "prompt": "abc"})


def test_examples_round_trip_and_resume_sees_them(tmp_path):
    directory = RunDirectory(tmp_path / "run")
    directory.open(spec())
    for index in (0, 2):
        directory.write_example(record(index))
    assert directory.done() == {0, 2}
    results = load_results(tmp_path / "run", allow_missing=True)
    assert [r.index for r in results] == [0, 2] and results.missing == [1]
    back = results[1]
    assert torch.equal(back["effect"].values, record(2)["effect"].values)
    assert back["effect"].dims == ("layer", "position") and back["effect"].coords["layer"] == [0, 5]
    assert back.scalars == {"clean": 1.5} and back.tokens == ["a", "b", "c"]
    # a damaged file is recomputed, not trusted
    directory.example_path(2).write_bytes(b"not safetensors")
    assert directory.done() == {0}


def test_identity_decides_the_folder(tmp_path):
    assert run_id(spec()) == run_id({**spec(), "run": {"examples_per_trace": 9}})  # options do not change numbers
    assert run_id(spec()) != run_id(spec(metric="prob"))
    RunDirectory(tmp_path).open(spec())
    with pytest.raises(ResultsError, match=r"holds results of a different run \(differs in experiment.params.metric\)"):
        RunDirectory(tmp_path).open(spec(metric="prob"))


def test_interval_settings_summarise_a_run_without_changing_it(tmp_path):
    """ci and n_boot are not part of the identity; reopening the run with others records
    them in its spec (for `nnexp plot` and `results.summary()`), under the same run id."""
    assert run_id(spec(ci=0.95, n_boot=1000)) == run_id(spec(ci=0.9, n_boot=5000)) == run_id(spec())
    RunDirectory(tmp_path).open(spec(ci=0.95, n_boot=1000))
    stored = RunDirectory(tmp_path).open(spec(ci=0.9, n_boot=5000))
    assert stored["experiment"]["params"]["ci"] == 0.9 and stored["experiment"]["params"]["n_boot"] == 5000
    again = RunDirectory(tmp_path).read_spec()
    assert again["experiment"]["params"]["ci"] == 0.9 and again["run_id"] == run_id(spec())


def test_submitted_jobs_keep_what_decoding_needs(tmp_path):
    directory = RunDirectory(tmp_path)
    directory.open(spec())
    directory.add_job("job-a", SubmittedJob([0, 1], 9, "f00d"))
    directory.add_job("job-b", SubmittedJob([2], None, "beef"))
    assert directory.read_jobs() == {"job-a": SubmittedJob([0, 1], 9, "f00d"), "job-b": SubmittedJob([2], None, "beef")}
    directory.forget_job("job-a")
    assert list(directory.read_jobs()) == ["job-b"]
    directory.forget_job("job-b")
    assert not directory.jobs_path.exists()
    # a job list from before row limits and fingerprints were stored cannot be decoded safely
    directory.jobs_path.write_text(json.dumps({"jobs": {"old": {"examples": [0]}}}))
    with pytest.raises(ResultsError, match="not a valid job list .*delete it and run `nnexp resume`"):
        directory.read_jobs()


def test_labelled_tensors_select_and_average_by_name():
    tensor = record(0)["effect"]
    assert tensor.sel(layer=5).tolist() == [3.0, 4.0, 5.0]
    assert tensor.sel(layer=0, position=2).item() == 2.0
    assert tensor.mean("layer").dims == ("position",) and tensor.mean("layer").tolist() == [1.5, 2.5, 3.5]
    with pytest.raises(KeyError, match="7 is not a label of axis 'layer'"):
        tensor.sel(layer=7)
    with pytest.raises(ValueError, match="axis 'layer' has 2 entries but 3 labels"):
        LabelledTensor(torch.zeros(2), ("layer",), {"layer": [0, 1, 2]})


def test_options_become_parameters():
    args = build_parser().parse_args(["run", "ioi-patching", "--sites", "resid_post,head_out", "--layers", "0,-1",
                                      "--positions", "3,-1", "--metric", "prob", "--set", "skip_shared_prefix=false",
                                      "--include", "a.py", "--include", "b"])
    params = _experiment_params(PatchingExperiment, args)
    assert params == {"sites": ("resid_post", "head_out"), "layers": (0, -1), "positions": (3, -1),
                      "metric": "prob", "skip_shared_prefix": False}
    assert args.include == ["a.py", "b"]
