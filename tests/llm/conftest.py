"""Fixtures shared by the llm_svc tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from llm_svc.server import LlmServer
from tests.llm.fakes import settings


@pytest.fixture
async def server() -> AsyncIterator[LlmServer]:
    """An in-process llm_svc on port 0 (tests.llm.fakes.settings)."""
    server = LlmServer(settings())
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown()
