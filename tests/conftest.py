"""Shared fixtures. Integration tests get one real local stack per session (Kafka + PostgreSQL
started by streamagg.stack on free loopback ports in a throwaway directory); if it cannot be
started, they fail: nothing here skips."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from streamagg.settings import Settings
from streamagg.stack import Stack, StackInfo, free_port


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def stack_factory() -> Iterator[callable]:
    """Makes stacks in fresh directories on free ports; stops every one at the end."""
    made: list[tuple[Stack, Path]] = []
    cache_dir = Settings().cache_dir  # the jar cache is shared; stack state is not

    def make() -> tuple[Stack, StackInfo]:
        # Not under pytest's tmp_path: that is private to root, and as root the PostgreSQL
        # cluster runs as the postgres user, which must reach its data directory.
        root = Path(tempfile.mkdtemp(prefix="streamagg-test-stack-"))
        root.chmod(0o755)
        stack = Stack(root, cache_dir)
        made.append((stack, root))
        return stack, stack.up(kafka_port=free_port(), postgres_port=free_port())

    yield make
    for stack, root in made:
        stack.down()
        shutil.rmtree(root, ignore_errors=True)
        (root.parent / f".{root.name}.lock").unlink(missing_ok=True)  # the stack's lock, kept by design


@pytest.fixture(scope="session")
def stack(stack_factory: callable) -> tuple[Stack, StackInfo]:
    """The session's stack."""
    return stack_factory()


def create_database(server: str, name: str) -> None:
    """CREATE DATABASE on the PostgreSQL server of ``server`` (a DSN without a database)."""

    async def create() -> None:
        conn = await asyncpg.connect(f"{server}/postgres")
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())


@pytest.fixture(scope="session")
def database_factory(stack: tuple[Stack, StackInfo]) -> Callable[[], str]:
    """Makes fresh databases on the session's PostgreSQL, so tests never see each other's rows."""
    _, info = stack
    server = info.database_url.rsplit("/", 1)[0]

    def make() -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        create_database(server, name)
        return f"{server}/{name}"

    return make


@pytest.fixture
def database(database_factory: Callable[[], str]) -> str:
    """A fresh database per test."""
    return database_factory()


@pytest.fixture
def stack_env(stack: tuple[Stack, StackInfo], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment pointing streamagg at the session's stack."""
    instance, info = stack
    env = {
        "STREAMAGG_KAFKA_BOOTSTRAP": info.kafka_bootstrap,
        "STREAMAGG_DATABASE_URL": info.database_url,
        "STREAMAGG_STACK_DIR": str(instance.root),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return {**os.environ, **env}
