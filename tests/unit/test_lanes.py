"""streamagg.lanes: work in a few lanes at once, a failure raised as itself."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from streamagg.lanes import in_lanes
from streamagg.store import StoreError


def test_lanes_take_consecutive_runs_and_run_at_once() -> None:
    running, most = 0, 0

    async def run(items: Sequence[int]) -> list[int]:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.01)
        running -= 1
        return list(items)

    assert asyncio.run(in_lanes(list(range(7)), 2, run)) == [[0, 1, 2, 3], [4, 5, 6]]
    assert most == 2
    assert asyncio.run(in_lanes([], 2, run)) == []
    assert asyncio.run(in_lanes([1], 2, run)) == [[1]]


def test_a_failure_is_raised_as_itself_and_stops_the_other_lane() -> None:
    finished = []

    async def run(items: Sequence[int]) -> None:
        if items[0] == 0:
            await asyncio.sleep(0)
            raise StoreError("upsert failed: connection lost", retriable=True)
        await asyncio.sleep(1)
        finished.append(items)

    with pytest.raises(StoreError, match="connection lost"):  # what the flush and roll-up catch
        asyncio.run(in_lanes([0, 1], 2, run))
    assert finished == []
