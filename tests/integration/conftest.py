"""Session-wide fixtures: the real model (converted once into the cachegen home), real text, and the one
`cachegen serve` node that every API test module shares (an engine start costs 30-60 s on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cachegen.config import Settings
from cachegen.model import ensure_model
from tests.integration.api_servers import ApiNode, probe_starting, start_node, wait_node

_shared_nodes: list[ApiNode] = []
_last_api_node_user: list[pytest.Item] = []


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


@pytest.fixture(scope="session")
def api_store_dir(tmp_path_factory) -> Path:
    """The shared node's `disk://` KV store."""
    return tmp_path_factory.mktemp("api-kv")


@pytest.fixture(scope="session")
def api_node(api_store_dir: Path, tmp_path_factory) -> ApiNode:
    """One real `cachegen serve` process (keys for alice, bob, carol and dave) for every API test module. Its
    answers while the engine was still starting are kept in ``starting``. Modules keep apart by tenant and text."""
    started = start_node(tmp_path_factory.mktemp("api-node"), "node", f"disk://{api_store_dir}",
                         max_body_bytes=1 << 20)  # fmt: skip
    _shared_nodes.append(started)
    try:
        yield wait_node(probe_starting(started))
    finally:
        started.stop()


@pytest.hookimpl(trylast=True)  # after -m/-k deselection
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    users = [item for item in items if "api_node" in getattr(item, "fixturenames", ())]
    _last_api_node_user[:] = users[-1:]


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Stop the shared node after the last test that uses it, so its engine is not left idle (holding RAM)
    while the rest of the session starts other engines. The session teardown's `stop` is then a no-op."""
    if item in _last_api_node_user:
        for node in _shared_nodes:
            node.stop()
