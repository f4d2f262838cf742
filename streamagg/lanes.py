"""Work split into a few lanes that run at once, each lane's items one after the other: the
flush's transactions and the roll-up's batches, so that Python prepares one lane's next item
while PostgreSQL runs the other's statement."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


async def in_lanes(items: Sequence[T], lanes: int, run: Callable[[Sequence[T]], Awaitable[R]]) -> list[R]:
    """``run`` on ``lanes`` runs of consecutive items at once; their results in lane order.

    A failure cancels the other lanes and is raised as itself, as a sequential loop would raise
    it (not as the ExceptionGroup of a TaskGroup, which callers catching StoreError would miss).
    """
    per_lane = max(1, -(-len(items) // lanes))
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(run(items[i : i + per_lane])) for i in range(0, len(items), per_lane)]  # type: ignore[arg-type]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]
