"""CUDA runs equal CPU runs of the same seeded weights (skipped without a CUDA GPU).

Randomly initialised models of the real GPT-2 small and GPT-2 XL shapes: weights do
not change what runs where. Each registered kind runs once on the CPU and once on
the GPU (float32, and sharded with device_map="auto"); the numbers must agree within
floating-point tolerance (GPU kernels sum in a different order).
"""

from __future__ import annotations

import pytest
import torch

import nnexp
from tests.helpers import KINDS, assert_same_records, kind_experiments, make_gpt2_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = {"gpt2-small": dict(n_layer=12, n_embd=768, n_head=12), "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25)}


def shaped_model(shape: str, tmp_path) -> str:
    import transformers as T

    folder = tmp_path / shape
    if not folder.exists():
        torch.manual_seed(0)
        config = T.GPT2Config(vocab_size=50257, n_positions=1024, bos_token_id=50256, eos_token_id=50256,
                              **SHAPES[shape])
        T.GPT2LMHeadModel(config).save_pretrained(folder)
        make_gpt2_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("device", ["cuda", "auto"])
@pytest.mark.parametrize("name", KINDS)
def test_cuda_equals_cpu(name, device, shape, tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "cuda-models"
    folder = shaped_model(shape, root)
    cpu = nnexp.load_model(folder)
    gpu = nnexp.load_model(folder, device=device)
    assert gpu.device.type == "cuda"
    out = tmp_path_factory.mktemp(f"{name}-{shape}-{device}")
    experiment = kind_experiments(out, cpu.tokenizer)[name]
    on_cpu = nnexp.run(experiment, cpu, out=out / "cpu", limit=2, figures=False)
    on_gpu = nnexp.run(experiment, gpu, out=out / "gpu", limit=2, figures=False)
    assert_same_records(list(on_cpu), list(on_gpu), exact=False)
