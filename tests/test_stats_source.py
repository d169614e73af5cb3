"""`StatsSource` (python/fastlb/control.py): engine snapshots taken in a thread, one at a time,
shared by concurrent callers. Pure logic, so a stand-in engine whose `stats()` blocks like the
real one does when a worker is slow to answer."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, cast

from fastlb.control import StatsSource
from fastlb.engine import Engine


class SlowEngine:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls = 0
        self.writes = 0  # as Engine counts the changes it applied
        self.threads: set[int] = set()

    def stats(self) -> dict[str, Any]:
        self.calls += 1
        n = self.calls
        self.threads.add(threading.get_ident())
        time.sleep(self.seconds)  # as the engine waits up to 250 ms for its workers
        return {"n": n}


def test_concurrent_callers_share_one_snapshot_taken_off_the_loop() -> None:
    engine = SlowEngine(0.3)
    source = StatsSource(cast(Engine, engine))

    async def main() -> tuple[list[dict[str, Any]], int, dict[str, Any]]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        tick = asyncio.create_task(ticker())
        first = await asyncio.gather(*(source() for _ in range(5)))
        tick.cancel()
        # one caller giving up does not cancel the snapshot the others wait for
        waiter = asyncio.create_task(source())
        other = asyncio.create_task(source())
        await asyncio.sleep(0.05)
        waiter.cancel()
        return first, ticks, await other

    first, ticks, after = asyncio.run(main())
    assert first == [{"n": 1}] * 5 and after == {"n": 2} and engine.calls == 2
    assert threading.get_ident() not in engine.threads
    assert ticks > 0, "the event loop was blocked while the snapshot was taken"


def test_a_caller_after_a_write_does_not_share_a_snapshot_begun_before_it() -> None:
    """An operator's promote returns while a canary's snapshot, begun before it, is still being
    taken: /api/status right after must show the promote, so it takes its own snapshot."""
    engine = SlowEngine(0.3)
    source = StatsSource(cast(Engine, engine))

    async def main() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        before = asyncio.create_task(source())
        await asyncio.sleep(0.05)
        engine.writes += 1
        after = asyncio.create_task(source())
        joined = asyncio.create_task(source())  # no write since `after` began: shares it
        return await before, await after, await joined

    before, after, joined = asyncio.run(main())
    assert before == {"n": 1} and after == joined == {"n": 2} and engine.calls == 2
