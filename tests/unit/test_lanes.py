"""streamagg.lanes: work in a few lanes at once, a failure raised as itself."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from streamagg.lanes import in_lanes
from streamagg.store import StoreError

DEADLINE_SECONDS = 5.0


def test_lanes_take_consecutive_runs_and_run_at_once() -> None:
    async def main() -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
        started = [asyncio.Event(), asyncio.Event()]

        async def run(items: Sequence[int]) -> list[int]:
            lane = 0 if items[0] == 0 else 1
            started[lane].set()
            # Returns only once the other lane has started too: one lane after the other would
            # miss the deadline.
            await asyncio.wait_for(started[1 - lane].wait(), DEADLINE_SECONDS)
            return list(items)

        async def one(items: Sequence[int]) -> list[int]:
            return list(items)

        return await in_lanes(list(range(7)), 2, run), await in_lanes([], 2, one), await in_lanes([1], 2, one)

    both, none, single = asyncio.run(main())
    assert both == [[0, 1, 2, 3], [4, 5, 6]]
    assert none == [] and single == [[1]]


def test_a_failure_is_raised_as_itself_and_stops_the_other_lane() -> None:
    cancelled = []

    async def main() -> None:
        async def run(items: Sequence[int]) -> None:
            if items[0] == 0:
                raise StoreError("upsert failed: connection lost", retriable=True)
            try:
                await asyncio.Event().wait()  # never set: only the cancellation ends it
            except asyncio.CancelledError:
                cancelled.append(items)
                raise

        await asyncio.wait_for(in_lanes([0, 1], 2, run), DEADLINE_SECONDS)

    with pytest.raises(StoreError, match="connection lost"):  # what the flush and roll-up catch
        asyncio.run(main())
    assert cancelled == [[1]]
