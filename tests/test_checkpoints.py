"""Training checkpoints loaded into a base architecture (`load_model(base, checkpoint=)`,
`nnexp run --checkpoint`): the formats and wrappers' prefixes, the weights and logits
they give, refusals (pickled objects, keys that do not fit), and the run identity.

Each checkpoint is written from a random model of the base's config with another seed,
so that loaded weights are told apart from the base's own; they are checked against
that model's state dict and forward pass directly. Tests marked fast read files only.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import nnexp
from nnexp import ModelError, load_model, wrap_model
from nnexp.models import checkpoints
from nnexp.registry import EXPERIMENTS
from nnexp.store import RunDirectory
from tests.helpers import (
    cli,
    make_gpt2_tokenizer,
    nnexp_records,
    one_line_error,
    save_tiny_model,
    tiny_hf_model,
)

SOURCE_SEED = 3  # the checkpoint's weights; the base folders are seed 0
TOKENS = torch.tensor([[15496, 995, 318, 257, 1332, 286, 262]])  # "Hello world is a test of the"


# Set when unpickling runs code of a file: it must never happen.
UNPICKLED: list[str] = []


def _spring(what: str) -> None:
    UNPICKLED.append(what)


class Trap:
    """Unpickling it calls _spring (through __reduce__)."""

    def __reduce__(self):
        return (_spring, ("__reduce__",))


class Stateful:
    """Unpickling it calls __setstate__."""

    def __init__(self) -> None:
        self.x = 1

    def __setstate__(self, state) -> None:
        _spring("__setstate__")
        self.__dict__.update(state)


@pytest.fixture(scope="module")
def gpt2_source():
    return tiny_hf_model("gpt2", seed=SOURCE_SEED)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


def tensors(hf_model, drop_tied: bool = False) -> dict[str, torch.Tensor]:
    """A model's state dict as separate tensors (safetensors refuses shared ones); with
    `drop_tied`, without the second name of a tied weight (GPT-2's lm_head.weight, which
    is wte.weight), as save_pretrained writes it."""
    out, seen = {}, set()
    for key, value in hf_model.state_dict().items():
        if drop_tied and value.data_ptr() in seen:
            continue
        seen.add(value.data_ptr())
        out[key] = value.detach().clone()
    return out


def write_checkpoint(kind: str, source, path: Path) -> Path:
    """The formats training code writes, each holding `source`'s weights."""
    weights = tensors(source)
    if kind == "plain":
        torch.save(weights, path)
    elif kind == "compiled-nested":
        # torch.compile's prefix, nested with the step and an optimizer's state (whose
        # per-parameter dicts of tensors must not be taken for the model's)
        layer = torch.nn.Linear(2, 2)
        optimizer = torch.optim.AdamW(layer.parameters())
        layer(torch.ones(2)).sum().backward()
        optimizer.step()
        nested = {f"_orig_mod.{k}": v for k, v in tensors(source, drop_tied=True).items()}
        torch.save({"model_state_dict": nested, "optimizer_state_dict": optimizer.state_dict(), "step": 100}, path)
    elif kind == "ddp":
        torch.save({f"module.{k}": v for k, v in weights.items()}, path)
    elif kind == "wrappers-combined":
        torch.save({"state_dict": {f"module._orig_mod.module.{k}": v for k, v in weights.items()}}, path)
    elif kind == "inner-model":
        # the state dict of GPT2Model, without the `transformer.` prefix and the head
        torch.save({k: v.detach().clone() for k, v in source.transformer.state_dict().items()}, path)
    elif kind == "safetensors":
        save_file(tensors(source, drop_tied=True), str(path))
    else:
        raise ValueError(kind)
    return path


def assert_holds(model, source) -> None:
    """Every weight of `model` is `source`'s, and so are its logits."""
    expected = source.state_dict()
    loaded = model.hf.state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in loaded.items():
        assert torch.equal(value, expected[key].to(value.dtype)), key
    with torch.no_grad():
        torch.testing.assert_close(model.hf(TOKENS).logits, source(TOKENS).logits, rtol=0, atol=0)


def assert_differs_from_base(model_folder: Path, source) -> None:
    """The base's own weights are other numbers: a load that kept them would fail."""
    base = load_model(str(model_folder))
    assert not torch.equal(base.hf.state_dict()["lm_head.weight"], source.state_dict()["lm_head.weight"])


# -- formats ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["plain", "compiled-nested", "ddp", "wrappers-combined", "inner-model", "safetensors"])
def test_formats_load_the_checkpoints_weights(kind, tmp_path, tiny_gpt2_folder, gpt2_source):
    suffix = ".safetensors" if kind == "safetensors" else ".pth"
    path = write_checkpoint(kind, gpt2_source, tmp_path / f"step100{suffix}")
    model = load_model(str(tiny_gpt2_folder), checkpoint=path)
    assert_holds(model, gpt2_source)
    assert model.hf.lm_head.weight is model.hf.transformer.wte.weight  # still tied
    assert model.name == f"{tiny_gpt2_folder.name}+step100"
    assert model.source == {"kind": "folder", "path": str(tiny_gpt2_folder.resolve()),
                            "checkpoint": {"path": str(path.resolve()),
                                           "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}}
    assert model.describe()["source"] == model.source


def test_base_weights_differ_from_the_checkpoints(tiny_gpt2_folder, gpt2_source):
    assert_differs_from_base(tiny_gpt2_folder, gpt2_source)


@pytest.mark.parametrize("kind", ["compiled-nested", "safetensors"])
def test_llama_checkpoint(kind, tmp_path, llama_folder):
    source = tiny_hf_model("llama", seed=SOURCE_SEED)
    if kind == "compiled-nested":
        weights = {f"_orig_mod.{k}": v for k, v in tensors(source).items()}
        # older transformers saved the rotary frequencies, which the model computes itself
        weights["_orig_mod.model.rotary_emb.inv_freq"] = source.model.rotary_emb.inv_freq.clone()
        torch.save({"model": weights, "step": 7}, tmp_path / "ckpt.pth")
        path = tmp_path / "ckpt.pth"
    else:
        path = write_checkpoint("safetensors", source, tmp_path / "ckpt.safetensors")
    model = load_model(str(llama_folder), checkpoint=path)
    assert_holds(model, source)
    assert_differs_from_base(llama_folder, source)


def test_dtype_and_device_apply_after_loading(tmp_path, tiny_gpt2_folder, gpt2_source):
    path = write_checkpoint("plain", gpt2_source, tmp_path / "ckpt.pth")
    model = load_model(str(tiny_gpt2_folder), checkpoint=path, dtype="bfloat16", device="auto")
    assert model.dtype == torch.bfloat16 and model.describe()["dtype"] == "bfloat16"
    for key, value in model.hf.state_dict().items():
        assert torch.equal(value, gpt2_source.state_dict()[key].to(torch.bfloat16)), key
    if not torch.cuda.is_available():
        assert model.device == torch.device("cpu")  # auto without a GPU stays on the CPU
        with pytest.raises(ModelError, match="no CUDA GPU"):
            load_model(str(tiny_gpt2_folder), checkpoint=path, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_checkpoint_on_the_gpu(device, tmp_path, tiny_gpt2_folder, gpt2_source):
    path = write_checkpoint("plain", gpt2_source, tmp_path / "ckpt.pth")
    model = load_model(str(tiny_gpt2_folder), checkpoint=path, device=device)
    assert model.device.type == "cuda"
    with torch.no_grad():
        torch.testing.assert_close(model.hf(TOKENS.cuda()).logits.cpu(), gpt2_source(TOKENS).logits,
                                   rtol=1e-4, atol=1e-4)


def test_config_file_base(tmp_path, tiny_gpt2_folder, gpt2_source):
    """A config.json (no weights) beside the tokenizer gives the architecture."""
    folder = tmp_path / "arch"
    folder.mkdir()
    for file in tiny_gpt2_folder.iterdir():
        if "safetensors" not in file.name and file.suffix != ".bin":
            shutil.copy(file, folder)
    path = write_checkpoint("plain", gpt2_source, tmp_path / "ckpt.pth")
    model = load_model(str(folder / "config.json"), checkpoint=path)
    assert_holds(model, gpt2_source)
    assert model.name == "arch+ckpt"
    assert model.source["kind"] == "config" and model.source["path"] == str((folder / "config.json").resolve())
    with pytest.raises(ModelError, match="is a config file: an architecture without weights"):
        load_model(str(folder / "config.json"))
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(folder / "config.json", bare)
    with pytest.raises(ModelError, match="no tokenizer files; pass a folder with a tokenizer"):
        load_model(str(bare / "config.json"), checkpoint=path)


# -- refusals: files -----------------------------------------------------------------


@pytest.mark.fast
@pytest.mark.parametrize("content, named", [
    ({"weight": torch.zeros(2), "trap": Trap()}, "_spring"),
    ({"model_state_dict": {"weight": torch.zeros(2)}, "config": Stateful()}, "Stateful"),
    (torch.nn.Linear(2, 2), "torch.nn.modules.linear.Linear"),
])
def test_pickled_objects_are_refused_unopened(content, named, tmp_path):
    path = tmp_path / "checkpoint_step.pth"
    torch.save(content, path)
    with pytest.raises(ModelError) as error:
        checkpoints.read_state_dict(path)
    message = str(error.value)
    assert "\n" not in message
    assert f"checkpoint {path} holds pickled Python objects" in message and named in message
    assert "weights_only" in message and "torch.save(model.state_dict(), path)" in message
    assert UNPICKLED == []
    if named in ("_spring", "Stateful"):  # the trap is armed: unpickling the file would spring it
        torch.load(path, weights_only=False)
        assert UNPICKLED
        UNPICKLED.clear()


@pytest.mark.fast
def test_unreadable_files_are_refused(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    for path in (garbage, empty):
        with pytest.raises(ModelError, match=f"checkpoint {path} is not a file torch.save or safetensors wrote"):
            checkpoints.read_state_dict(path)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ModelError, match="is not a readable safetensors file"):
        checkpoints.read_state_dict(broken)
    with pytest.raises(ModelError, match="does not exist"):
        checkpoints.locate(tmp_path / "nowhere.pth")
    with pytest.raises(ModelError, match="is a folder"):
        checkpoints.locate(tmp_path)


@pytest.mark.fast
def test_the_models_dict_of_tensors_is_found(tmp_path):
    weights = {"a.weight": torch.ones(2), "b.bias": torch.zeros(3)}
    other = {"c.weight": torch.ones(1)}
    cases = [
        (weights, weights),
        ({"model": {"state_dict": weights}, "epoch": 3}, weights),  # the only one, at any depth
        ({"state_dict": weights, "ema": other}, weights),  # a usual key first
        ({"model_state_dict": weights, "optimizer": {"state": {0: {"exp_avg": torch.ones(1)}}}}, weights),
    ]
    for content, expected in cases:
        torch.save(content, tmp_path / "ckpt.pth")
        found = checkpoints.read_state_dict(tmp_path / "ckpt.pth")
        assert found.keys() == expected.keys() and all(torch.equal(found[k], expected[k]) for k in expected)
    torch.save({"ema": weights, "swa": other}, tmp_path / "two.pth")
    with pytest.raises(ModelError, match=r"holds 2 dicts of tensors \(\['ema'\], \['swa'\]\)"):
        checkpoints.read_state_dict(tmp_path / "two.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ModelError, match="holds no dict of named tensors"):
        checkpoints.read_state_dict(tmp_path / "list.pth")


@pytest.mark.fast
@pytest.mark.parametrize("key, expected", [
    ("transformer.wte.weight", "transformer.wte.weight"),
    ("_orig_mod.transformer.wte.weight", "transformer.wte.weight"),
    ("module.transformer.wte.weight", "transformer.wte.weight"),
    ("module._orig_mod.module.transformer.wte.weight", "transformer.wte.weight"),
    ("_orig_mod._orig_mod.transformer.wte.weight", "transformer.wte.weight"),
    ("transformer.h.0._orig_mod.attn.c_attn.weight", "transformer.h.0.attn.c_attn.weight"),  # a compiled block
    ("_fsdp_wrapped_module.transformer.h.0._checkpoint_wrapped_module.mlp.c_fc.bias", "transformer.h.0.mlp.c_fc.bias"),
    ("transformer.module.weight", "transformer.module.weight"),  # an inner module named "module" stays
])
def test_wrapper_prefixes_are_stripped(key, expected):
    assert checkpoints.strip_wrappers(key) == expected


# -- refusals: keys that do not fit ----------------------------------------------------


def refusal(tmp_path, folder, weights: dict) -> str:
    path = tmp_path / "x.pth"
    torch.save(weights, path)
    with pytest.raises(ModelError) as error:
        load_model(str(folder), checkpoint=path)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path, tiny_gpt2_folder, gpt2_source):
    prefix = f"checkpoint {tmp_path / 'x.pth'} does not fit {tiny_gpt2_folder.name}: "
    weights = tensors(gpt2_source)
    for key in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.bias"):
        del weights[key]
    assert refusal(tmp_path, tiny_gpt2_folder, weights) == (
        prefix + "2 missing keys (transformer.h.0.attn.c_attn.weight, transformer.h.1.mlp.c_fc.bias)")
    weights = {**tensors(gpt2_source), "transformer.h.3.mlp.c_fc.bias": torch.zeros(256)}
    assert refusal(tmp_path, tiny_gpt2_folder, weights) == prefix + "1 unexpected key (transformer.h.3.mlp.c_fc.bias)"
    weights = tensors(gpt2_source, drop_tied=True)
    weights["transformer.wte.weight"] = torch.zeros(100, 64)
    assert refusal(tmp_path, tiny_gpt2_folder, weights) == (
        prefix + "1 mis-shaped (transformer.wte.weight: checkpoint [100, 64], model [50257, 64])")
    # a checkpoint of another family: everything at once, a few names of each (of GPT-2's
    # 41 keys, lm_head.weight fits, and gives the wte.weight tied to it)
    llama = tensors(tiny_hf_model("llama"))
    assert refusal(tmp_path, tiny_gpt2_folder, llama) == prefix + (
        "39 missing keys (transformer.wpe.weight, transformer.h.0.ln_1.weight, transformer.h.0.ln_1.bias, ...), "
        "29 unexpected keys (model.embed_tokens.weight, model.layers.0.self_attn.q_proj.weight, "
        "model.layers.0.self_attn.k_proj.weight, ...)")


def test_tied_weights_with_different_values_are_refused(tmp_path, tiny_gpt2_folder, gpt2_source):
    weights = tensors(gpt2_source)
    weights["lm_head.weight"] = weights["lm_head.weight"] + 1
    message = refusal(tmp_path, tiny_gpt2_folder, weights)
    assert "has different values for transformer.wte.weight and lm_head.weight" in message
    assert "ties into one weight" in message


def test_computed_buffers_saved_by_older_transformers_are_ignored(tmp_path, tiny_gpt2_folder, gpt2_source):
    """GPT-2's causal mask was a saved buffer (`attn.bias`) before transformers 4.31."""
    weights = {**tensors(gpt2_source), **{f"transformer.h.{i}.attn.bias": torch.ones(1, 1, 128, 128) for i in range(3)}}
    torch.save(weights, tmp_path / "old.pth")
    assert_holds(load_model(str(tiny_gpt2_folder), checkpoint=tmp_path / "old.pth"), gpt2_source)


def test_refused_with_a_remote_backend_or_8_bits(tmp_path, tiny_gpt2_folder, gpt2_source):
    path = write_checkpoint("plain", gpt2_source, tmp_path / "ckpt.pth")
    with pytest.raises(ModelError, match="a remote server cannot load them"):
        load_model(str(tiny_gpt2_folder), checkpoint=path, backend="remote")
    with pytest.raises(ModelError, match="not available with a checkpoint"):
        load_model(str(tiny_gpt2_folder), checkpoint=path, load_in_8bit=True)
    with pytest.raises(ModelError, match="is a file; .* A checkpoint of weights goes in --checkpoint"):
        load_model(str(path))


# -- run identity ----------------------------------------------------------------------


def test_run_identity_follows_the_checkpoints_content(tmp_path, tiny_gpt2_folder, gpt2_source, monkeypatch):
    monkeypatch.chdir(tmp_path)
    experiment = EXPERIMENTS["ioi-patching"](sites=("resid_post",), n_examples=2)
    first = write_checkpoint("plain", gpt2_source, tmp_path / "step100.pth")
    other = tmp_path / "other" / "step100.pth"  # the same name, in another folder, other weights
    other.parent.mkdir()
    write_checkpoint("plain", tiny_hf_model("gpt2", seed=SOURCE_SEED + 1), other)

    def run(checkpoint):
        return nnexp.run(experiment, str(tiny_gpt2_folder), checkpoint=checkpoint, limit=1, figures=False).path

    a, again, b = run(first), run(first), run(other)
    assert a == again != b
    assert a.parent == b.parent == Path("results") / "ioi-patching" / f"{tiny_gpt2_folder.name}+step100"
    plain = nnexp.run(experiment, str(tiny_gpt2_folder), limit=1, figures=False).path
    assert plain.parent.name == tiny_gpt2_folder.name
    # the same path, rewritten with other weights, is another run
    shutil.copy(other, first)
    assert run(first) not in (a, b)
    with pytest.raises(nnexp.ConfigError, match="checkpoint= applies when model is a name"):
        nnexp.run(experiment, load_model(str(tiny_gpt2_folder)), checkpoint=first)


# -- the command line --------------------------------------------------------------------


def test_cli_run_and_resume_with_a_checkpoint(tmp_path, tiny_gpt2_folder, gpt2_source):
    path = write_checkpoint("compiled-nested", gpt2_source, tmp_path / "checkpoint_step.pth")
    out = tmp_path / "run"
    result = cli("run", "ioi-patching", "--model", tiny_gpt2_folder, "--checkpoint", path, "--limit", 1,
                 "--no-figures", "--sites", "resid_post", "--out", out)
    assert result.returncode == 0, result.stderr
    spec = json.loads((out / "spec.json").read_text())
    assert spec["model"]["name"] == f"{tiny_gpt2_folder.name}+checkpoint_step"
    assert spec["model"]["source"]["checkpoint"] == {"path": str(path.resolve()),
                                                     "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    # the numbers are the checkpoint's: the source model's, computed in this process
    experiment = EXPERIMENTS["ioi-patching"](sites=("resid_post",))
    source = wrap_model(gpt2_source, make_gpt2_tokenizer(), "source", {"kind": "test"})
    expected = nnexp_records(source, experiment, experiment.examples()[:1])[0]
    stored = nnexp.load_results(out)[0]
    assert stored.scalars["clean"] == pytest.approx(expected.scalars["clean"], abs=1e-5)
    torch.testing.assert_close(stored["resid_post"].values, expected["resid_post"].values, rtol=1e-4, atol=1e-5)

    resumed = cli("resume", out, "--limit", 2, "--no-figures")
    assert resumed.returncode == 0, resumed.stderr
    assert "1 of 2 examples already stored" in resumed.stderr and len(nnexp.load_results(out)) == 2

    torch.save(tensors(tiny_hf_model("gpt2", seed=SOURCE_SEED + 1)), path)
    one_line_error(cli("resume", out, "--limit", 3), f"checkpoint {path.resolve()} has changed since the run in",
                   "restore it to resume")
    path.unlink()
    one_line_error(cli("resume", out, "--limit", 3), "which no longer exists")
    assert len(RunDirectory(out).done()) == 2


def test_cli_refusals_are_one_line(tmp_path, tiny_gpt2_folder, gpt2_source):
    pickled = tmp_path / "whole_model.pth"
    torch.save(torch.nn.Linear(2, 2), pickled)
    misshaped = tmp_path / "misshaped.pth"
    torch.save({**tensors(gpt2_source), "transformer.wpe.weight": torch.zeros(64, 64)}, misshaped)
    run = ("run", "ioi-patching", "--model", tiny_gpt2_folder, "--limit", 1, "--no-figures", "--out", tmp_path / "out")
    one_line_error(cli(*run, "--checkpoint", pickled), "holds pickled Python objects", "weights_only",
                   "torch.save(model.state_dict(), path)")
    one_line_error(cli(*run, "--checkpoint", misshaped), "does not fit",
                   "1 mis-shaped (transformer.wpe.weight: checkpoint [64, 64], model [128, 64])")
    assert not (tmp_path / "out" / "spec.json").exists()
