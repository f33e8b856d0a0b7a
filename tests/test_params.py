"""Parameters typed by their fields (`nnexp.params`): every field of every registered
experiment is coerced to its declared type or refused with one line, from Python, from
a stored spec and from the command line, before any model loads.

The command line runs in-process (`nnexp.cli.main` returns the exit status) with the
runner replaced by a recorder, so no model loads and a refused value is seen to be
refused before one would.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing

import pytest

import nnexp
import nnexp.runner
from nnexp.cli import main
from nnexp.errors import ConfigError
from nnexp.experiment import experiment_from_spec
from nnexp.params import field_types
from nnexp.store import run_id

pytestmark = pytest.mark.fast

EXPERIMENTS = sorted(nnexp.EXPERIMENTS.items())


class Recorded(Exception):
    """Raised by the stand-in runner: the experiment reached the point of loading a model."""


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run `nnexp run NAME ARGS...` in-process; returns (exit status, the experiment the
    runner got or None, the error lines printed)."""
    got = []

    def record(experiment, **options):
        got.append(experiment)
        raise Recorded

    monkeypatch.setattr(nnexp.runner, "run", record)

    def call(name, *args):
        got.clear()
        try:
            status = main(["run", name, *args])
        except Recorded:
            status = None
        errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        return status, (got[0] if got else None), errors

    return call


def _one_line_refusal(status, experiment, errors, *fragments):
    assert status == 2, (status, errors)
    assert experiment is None, "the runner was reached: the value was not refused before the model loads"
    assert len(errors) == 1 and errors[0].startswith("nnexp: error: "), errors
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


# -- the cases of issue 20 ----------------------------------------------------------------


@pytest.mark.parametrize("text, value", [("False", False), ("false", False), ("TRUE", True), ("true", True)])
def test_only_correct_false_is_false(cli, text, value):
    """`--set only_correct=False` was stored as the string 'False', which is truthy."""
    status, experiment, errors = cli("attention-knockout", "--set", f"only_correct={text}")
    assert status is None, errors
    assert experiment.only_correct is value


def test_only_correct_no_is_refused(cli):
    _one_line_refusal(*cli("attention-knockout", "--set", "only_correct=no"),
                      "parameter only_correct is 'no'", "true or false")


def test_skip_shared_prefix_false_computes_the_prefix(cli):
    _, experiment, _ = cli("ioi-patching", "--set", "skip_shared_prefix=False")
    assert experiment.skip_shared_prefix is False


def test_keep_hidden_false_keeps_nothing(cli):
    _, experiment, _ = cli("counterfact-attribution", "--set", "keep_hidden=False")
    assert experiment.keep_hidden is False


def test_attribute_true_is_the_text_true(cli):
    """`--set attribute=true` was JSON-decoded to a boolean and refused by a message
    saying to choose 'true'."""
    status, experiment, errors = cli("attention-knockout", "--set", "attribute=true")
    assert status is None, errors
    assert experiment.attribute == "true"


def test_a_single_layer_or_head_is_a_list(cli):
    """`--set layers=1` and `heads=2` ended in tracebacks after the model loaded."""
    _, experiment, _ = cli("ioi-patching", "--set", "layers=1", "--set", "heads=2")
    assert experiment.layers == (1,) and experiment.heads == (2,)


@pytest.mark.parametrize("name, item, fragments", [
    ("ioi-patching", "n_examples=4.0", ["parameter n_examples is '4.0'", "an integer"]),
    ("logit-attribution", "top_k=true", ["parameter top_k is 'true'", "an integer"]),
    ("logit-attribution", "tolerance=true", ["parameter tolerance is 'true'", "a number"]),
    ("ioi-patching", "seed=1.5", ["parameter seed is '1.5'", "an integer"]),
    ("causal-tracing", "seed=1.5", ["parameter seed is '1.5'", "an integer"]),
    ("ioi-patching", "layers=1.5", ["parameter layers is '1.5'", "entry '1.5' is not an integer"]),
])
def test_wrong_types_are_refused_before_the_model_loads(cli, name, item, fragments):
    _one_line_refusal(*cli(name, "--set", item), *fragments)


@pytest.mark.parametrize("name, field, text, value", [
    ("ioi-patching", "sites", "resid_post,attn_out", ("resid_post", "attn_out")),
    ("ioi-patching", "sites", '["resid_post", "attn_out"]', ("resid_post", "attn_out")),
    ("causal-tracing", "restore", "mlp_out,attn_out", ("mlp_out", "attn_out")),
    ("causal-tracing", "restore", '["mlp_out", "attn_out"]', ("mlp_out", "attn_out")),
    ("ioi-patching", "positions", "3,-1", (3, -1)),
    ("ioi-patching", "positions", "[3, -1]", (3, -1)),
    ("ioi-patching", "positions", "each", "each"),
    ("logit-attribution", "analyses", "dla_heads", ("dla_heads",)),
])
def test_one_list_rule_for_every_field(cli, name, field, text, value):
    """`--set sites=resid_post,attn_out` was refused while `--set restore=a,b` took commas."""
    status, experiment, errors = cli(name, "--set", f"{field}={text}")
    assert status is None, errors
    assert getattr(experiment, field) == value


def test_the_named_options_read_like_set(cli):
    _, by_option, _ = cli("ioi-patching", "--sites", "resid_post,attn_out", "--layers", "0,-1", "--positions", "3,-1")
    _, by_set, _ = cli("ioi-patching", "--set", "sites=resid_post,attn_out", "--set", "layers=[0, -1]",
                       "--set", "positions=[3, -1]")
    assert by_option == by_set
    assert by_option.params() == by_set.params()


# -- every field of every registered experiment ---------------------------------------------


def _fields(classes=EXPERIMENTS):
    return [pytest.param(cls, f.name, id=f"{name}.{f.name}") for name, cls in classes for f in dataclasses.fields(cls)]


# the kinds' base classes too: a user's experiment subclasses one of them
KINDS_AND_EXPERIMENTS = [(f"kind:{name}", cls) for name, cls in nnexp.KINDS.items()] + EXPERIMENTS


def _members(hint) -> tuple:
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def _wrong_value(hint):
    """A Python value of the wrong type for `hint`."""
    if str in _members(hint) or dict in _members(hint):
        return 5
    if bool in _members(hint):
        return "maybe"
    if int in _members(hint):
        return 4.0
    if float in _members(hint):
        return True
    if _is_tuple_of_floats(hint):
        return ["many"]
    return [1.5]  # a list of a float: no other field takes one


def _wrong_text(hint) -> str | None:
    """Command-line text of the wrong type for `hint`; None where any text is accepted."""
    members = _members(hint)
    if str in members:
        return None
    if bool in members:
        return "yes"
    if int in members:
        return "4.0"
    if float in members:
        return "true"
    if _is_tuple_of_floats(hint):
        return "many"
    return "[1.5]"


def _is_tuple_of_floats(hint) -> bool:
    return any(typing.get_origin(m) is tuple and typing.get_args(m)[:1] == (float,) for m in _members(hint))


@pytest.mark.parametrize("cls, name", _fields(KINDS_AND_EXPERIMENTS))
def test_every_field_is_precisely_typed(cls, name):
    hint = field_types(cls)[name]
    assert hint not in (object, typing.Any, tuple, list), f"{cls.__name__}.{name} is annotated {hint!r}"
    for member in _members(hint):
        if typing.get_origin(member) in (tuple, list):
            assert typing.get_args(member), f"{cls.__name__}.{name}: say what its entries are ({member!r})"


@pytest.mark.parametrize("cls, name", _fields(KINDS_AND_EXPERIMENTS))
def test_every_field_refuses_a_wrong_type_in_python(cls, name):
    value = _wrong_value(field_types(cls)[name])
    for construct in (lambda: cls(**{name: value}), lambda: cls.from_params({name: value})):
        with pytest.raises(ConfigError) as error:
            construct()
        message = str(error.value)
        assert "\n" not in message and f"parameter {name} is {value!r}" in message and "; give " in message


# A text field takes any text from the command line (what it means is the kind's check).
@pytest.mark.parametrize("cls, name", [case for case in _fields() if _wrong_text(field_types(case.values[0])[case.values[1]])])
def test_every_field_refuses_a_wrong_type_on_the_command_line(cli, cls, name):
    text = _wrong_text(field_types(cls)[name])
    _one_line_refusal(*cli(cls.name, "--set", f"{name}={text}"), f"parameter {name} is {text!r}", "; give ")


def _spellings(hint, default):
    """(command-line text, the value it must give) for a field of type `hint` whose
    default is valid: every documented spelling of the type."""
    members = _members(hint)
    out = []
    if type(None) in members:
        out += [("none", None), ("None", None), ("null", None)]
    if default is None:
        default = {int: 0, float: 0.5}.get(next(m for m in members if m is not type(None)))
        if default is None:
            return out
    if isinstance(default, bool):
        out += [(text, text.lower() == "true") for text in ("true", "false", "True", "FALSE")]
    elif isinstance(default, int):
        out += [(str(default), default), (f" {default} ", default)]
    elif isinstance(default, float):
        out += [(repr(default), default), (f"{default:e}", default)]
        if default == int(default):  # an integer stays an integer (what was given is what is stored)
            out += [(str(int(default)), int(default))]
    elif isinstance(default, str):
        out += [(default, default)]
    elif isinstance(default, tuple):
        out += [(",".join(map(str, default)), default), (", ".join(map(str, default)), default),
                (json.dumps(list(default)), default), (str(default[0]), default[:1])]
    return out


def _field_spellings():
    cases = []
    for name, cls in EXPERIMENTS:
        hints = field_types(cls)
        for f in dataclasses.fields(cls):
            if f.name == "data":
                continue  # a file, read by the runner; spelled like any `str | None` below
            for text, value in _spellings(hints[f.name], f.default):
                cases.append(pytest.param(cls, f.name, text, value, id=f"{name}.{f.name}={text}"))
    return cases


@pytest.mark.parametrize("cls, name, text, value", _field_spellings())
def test_every_documented_spelling_has_its_effect(cli, cls, name, text, value):
    status, experiment, errors = cli(cls.name, "--set", f"{name}={text}")
    assert status is None, errors
    got = getattr(experiment, name)
    assert got == value and type(got) is type(value), (got, value)
    assert type(experiment).from_params(experiment.params()) == experiment  # the stored spec rebuilds it


def test_python_values_are_coerced_like_text():
    experiment = nnexp.EXPERIMENTS["ioi-patching"](skip_shared_prefix="false", layers=[0, 1], positions="3,-1",
                                                   sites="resid_post")
    assert experiment.skip_shared_prefix is False
    assert experiment.layers == (0, 1) and experiment.positions == (3, -1) and experiment.sites == ("resid_post",)
    assert nnexp.EXPERIMENTS["causal-tracing"](noise_scale=2).noise_scale == 2  # an integer is a number


@dataclasses.dataclass
class _UserExperiment(nnexp.Experiment):
    """A user's experiment with the less common annotations."""

    name: typing.ClassVar[str] = "user-params"
    mode: typing.Literal["fast", "exact"] = "fast"
    pair: tuple[int, str] = (0, "a")
    options: dict = dataclasses.field(default_factory=dict)
    loose: tuple = ()
    anything: object = None


def test_a_users_annotations_are_followed():
    from nnexp.params import from_text

    experiment = _UserExperiment.from_params({"mode": "exact", "pair": "3,b", "options": '{"k": 1}', "loose": "x,y"})
    assert (experiment.mode, experiment.pair, experiment.options, experiment.loose) == ("exact", (3, "b"), {"k": 1},
                                                                                       ("x", "y"))
    assert from_text(_UserExperiment, "anything", "[1, 2]") == [1, 2]  # an unknown type: JSON, as before
    assert from_text(_UserExperiment, "anything", "plain") == "plain"
    for params, fragment in (({"mode": "slow"}, "one of 'fast', 'exact'"), ({"pair": "1,b,c"}, "3 entries, not 2"),
                             ({"options": "[1]"}, "give a JSON object")):
        with pytest.raises(ConfigError, match=fragment):
            _UserExperiment.from_params(params)


def test_a_post_init_that_skips_super_is_still_typed_from_params():
    @dataclasses.dataclass
    class Careless(nnexp.Experiment):
        flag: bool = False

        def __post_init__(self) -> None:  # forgets super().__post_init__()
            pass

    assert Careless.from_params({"flag": "False"}).flag is False
    with pytest.raises(ConfigError, match="parameter flag is 'no'; give true or false"):
        Careless.from_params({"flag": "no"})


def test_an_annotation_out_of_reach_is_not_checked():
    class Local:
        pass

    @dataclasses.dataclass
    class WithLocal(nnexp.Experiment):
        thing: Local = None  # a string under `from __future__ import annotations`, naming a local class

    assert field_types(WithLocal)["thing"] is object
    assert WithLocal(thing=5).thing == 5


def test_none_only_where_the_field_allows_it(cli):
    assert cli("causal-tracing", "--set", "noise_std=none")[1].noise_std is None
    _one_line_refusal(*cli("causal-tracing", "--set", "samples=none"), "parameter samples is 'none'", "an integer")
    with pytest.raises(ConfigError, match="parameter window is None; give an integer"):
        nnexp.EXPERIMENTS["attention-knockout"](window=None)


def test_an_empty_selection_of_layers_is_refused(cli):
    _one_line_refusal(*cli("ioi-patching", "--layers", ""), "layers is empty", "none")


def test_specs_and_run_identities_are_unchanged():
    """Typing changes no stored parameter: a spec rebuilds the same experiment, and the
    README's demo run keeps its folder name."""
    for name, cls in EXPERIMENTS:
        experiment = cls()
        assert experiment_from_spec(experiment.spec()) == experiment
    ioi = nnexp.EXPERIMENTS["ioi-patching"]()
    assert ioi.params() == {
        "data": None, "sites": ["resid_post", "attn_out", "mlp_out", "head_out"], "positions": "each",
        "head_positions": "all", "layers": None, "heads": None, "metric": "logit_diff", "skip_shared_prefix": True,
        "dataset": "generated", "n_examples": 8, "seed": 0, "ci": 0.95, "n_boot": 1000, "prefix_sharing": True,
    }
    spec = {"experiment": ioi.spec(), "data": {**ioi.data_source(), "n_examples": 8},
            "model": {"name": "smollm2-135m", "source": {"kind": "alias", "alias": "smollm2-135m"}, "dtype": "float32"}}
    assert run_id(spec) == "run-a30feb7889"
    # the bootstrap settings summarise a run; they do not make another one
    other = nnexp.EXPERIMENTS["ioi-patching"](ci=0.9, n_boot=5000)
    assert run_id({**spec, "experiment": other.spec()}) == "run-a30feb7889"
    # nor does prefix sharing, which changes how fast the numbers come, not what they are
    other = nnexp.EXPERIMENTS["ioi-patching"](prefix_sharing=False)
    assert run_id({**spec, "experiment": other.spec()}) == "run-a30feb7889"


def test_prefix_sharing_is_on_unless_turned_off(cli):
    assert cli("ioi-patching")[1].prefix_sharing is True
    assert cli("ioi-patching", "--no-prefix-sharing")[1].prefix_sharing is False
    assert cli("attention-knockout", "--set", "prefix_sharing=false")[1].prefix_sharing is False
    # every planned kind shares by default
    assert cli("causal-tracing")[1].prefix_sharing is True
    assert cli("sublayer-knockout")[1].prefix_sharing is True
    assert cli("causal-tracing", "--set", "prefix_sharing=false")[1].prefix_sharing is False
