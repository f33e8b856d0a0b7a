"""Fixtures: small random models, the real built-in aliases, a quiet console; and the
test tiers. Everything else the tests share is in tests/helpers.py.

Tiers: tests marked `fast` use no model and start no process (`make test-fast`, a few
minutes); `slow` tests run a real pretrained model. `make test` runs everything.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import save_tiny_model, tiny_model

REAL_MODEL_FIXTURES = {"smollm2", "gemma3"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        uses_real = REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ()))
        if uses_real and item.get_closest_marker("fast"):
            raise pytest.UsageError(f"{item.nodeid} is marked fast but loads a real model ({', '.join(uses_real)})")
        if uses_real and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def gpt2_tiny():
    return tiny_model("gpt2")


@pytest.fixture(scope="session")
def llama_tiny():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_gpt2_folder(tmp_path_factory) -> Path:
    return save_tiny_model("gpt2", tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def smollm2():
    from nnexp import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3():
    from nnexp import load_model

    return load_model("gemma3-270m")


@pytest.fixture(autouse=True)
def _quiet_console():
    from nnexp import console

    console.set_quiet(True)
    yield
    console.set_quiet(False)
