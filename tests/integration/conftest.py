"""Session-wide fixtures: the real model (converted once into the cachegen home) and real text."""

from __future__ import annotations

from pathlib import Path

import pytest

from cachegen.config import Settings
from cachegen.model import ensure_model


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return ensure_model(Settings.from_env().home)


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def corpus_ids(tokenizer) -> list[int]:
    """~100K tokens of real English prose: CPython's own documentation topics (no install needed)."""
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics[name] for name in sorted(pydoc_data.topics.topics))
    return tokenizer(text)["input_ids"]
