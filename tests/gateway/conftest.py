"""`stack`: a live gateway over a fake TaskService (see live.py). Parametrize it indirectly
with a dict of Settings overrides."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.gateway.live import Stack, running_stack


@pytest.fixture
async def stack(request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    async with running_stack(**getattr(request, "param", {})) as live:
        yield live
