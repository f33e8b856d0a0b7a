"""A separate virtual environment holding Inseq 0.7.1, the oracle for gradient attribution.

Inseq 0.7.1 requires typeguard<=2.13.3, TransformerLens requires typeguard>=4.2, so the
two cannot share the test environment. This module builds Inseq its own environment
once (cached under .cache/, rebuilt when the recipe changes) and tests run Inseq in
it as a subprocess, exchanging tensors through safetensors files.

The recipe is the one known to work: torch as in the main environment, transformers
below 5.23, Inseq's runtime imports, then Inseq itself without its dependencies (its
metadata pins typeguard<=2.13.3 and, on Linux, several GB of CUDA 11 packages).

    python tests/inseq_env.py      # build it ahead of the tests (prints its python)
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

from filelock import FileLock

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("NNEXP_TEST_CACHE", REPO / ".cache" / "test-assets"))

REQUIREMENTS = [
    "torch==2.13.0",
    "transformers>=5,<5.23",
    "safetensors",
    "captum==0.8.0",
    "jaxtyping",
    "typeguard==2.13.3",
    "rich",
    "treescope",
    "matplotlib",
    "protobuf",
    "sentencepiece",
    "numpy<3",
]
INSEQ = "inseq==0.7.1"


def _recipe_hash() -> str:
    return hashlib.sha1("\n".join(REQUIREMENTS + [INSEQ]).encode()).hexdigest()[:10]


def inseq_python() -> Path:
    """The python of the Inseq environment, building it first if needed."""
    folder = CACHE / f"inseq-venv-{_recipe_hash()}"
    python = folder / "bin" / "python"
    stamp = folder / ".built"
    if stamp.exists():
        return python
    # Concurrent test processes may all ask at once: one builds, the others wait.
    CACHE.mkdir(parents=True, exist_ok=True)
    with FileLock(CACHE / f".{folder.name}.lock"):
        if not stamp.exists():
            _build(folder, python)
        stamp.touch()
    return python


def _build(folder: Path, python: Path) -> None:
    venv.EnvBuilder(with_pip=True, clear=True).create(folder)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + REQUIREMENTS, check=True)
    subprocess.run(pip + ["--no-deps", INSEQ], check=True)
    subprocess.run([str(python), "-c", "import inseq"], check=True)


if __name__ == "__main__":
    print(inseq_python())
    sys.exit(0)
