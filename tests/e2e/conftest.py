"""The whole stack as `make run` starts it: nats-server and the four services as separate
processes, on free ports, against SQLite or a fresh PostgreSQL database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest

from tests.conftest import timeout
from tests.postgres import postgres_database
from tools.stack import Stack, StackConfig

TEST_ENV = {
    "LOCAL_MODEL_TOKEN_DELAY_MS": "2",
    "LOG_LEVEL": "DEBUG",
    # A developer's provider keys must not send test prompts to a real provider.
    "LLM_DEFAULT_MODEL": "local",
    "OPENAI_API_KEY": "",
    "GEMINI_API_KEY": "",
    "ANTHROPIC_API_KEY": "",
}


@asynccontextmanager
async def running_stack(
    request: pytest.FixtureRequest,
    var_dir: Path,
    database: str = "sqlite",
    env: dict[str, str] | None = None,
) -> AsyncIterator[Stack]:
    """Start the stack; on exit stop it, print its logs if the test failed, and check that
    every service shut down cleanly (exit code 0 on SIGTERM)."""
    async with AsyncExitStack() as resources:
        database_url = None
        if database == "postgresql":
            database_url = await resources.enter_async_context(postgres_database())
        config = StackConfig.on_free_ports(
            var_dir, database_url=database_url, extra_env={**TEST_ENV, **(env or {})}
        )
        stack = Stack(config)
        try:
            await stack.start(timeout=timeout(60))
            yield stack
        finally:
            codes = await stack.stop()
            clean = all(code == 0 for code in codes.values())
            _dump_logs_on_failure(request, config.var_dir, clean)
        assert clean, f"unclean shutdown: {codes}\n{_stuck_shutdowns(config.var_dir, codes)}"


@pytest.fixture(params=["sqlite", "postgresql"])
async def stack(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(request, tmp_path / "var", request.param) as running:
        yield running


@pytest.fixture
async def sqlite_stack(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stack]:
    env = getattr(request, "param", None)
    async with running_stack(request, tmp_path / "var", "sqlite", env) as running:
        yield running


def _dump_logs_on_failure(request: pytest.FixtureRequest, var_dir: Path, clean: bool) -> None:
    report = getattr(request.node, "rep_call", None)
    if not clean or (report is not None and report.failed):
        for log in sorted((var_dir / "logs").glob("*.log")):
            print(f"----- {log.name} (last 150 lines)")
            print("\n".join(log.read_text(errors="replace").splitlines()[-150:]))


def _stuck_shutdowns(var_dir: Path, codes: dict[str, int]) -> str:
    """What each service that did not stop cleanly logged about its shutdown (what every
    task waited on: svckit/lifecycle.py), so the failure says why on its first screen."""
    lines = []
    for service, code in codes.items():
        log = var_dir / "logs" / f"{service}.log"
        if code != 0 and log.exists():
            text = log.read_text(errors="replace")
            lines += [line for line in text.splitlines() if "shutdown still running" in line]
    return "\n".join(lines)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
