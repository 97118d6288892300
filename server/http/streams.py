"""Several engine requests read as one: their outputs interleaved (streaming) or collected (not)."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import Request

from quiver.server.engine.public import RequestOutput

DISCONNECT_POLL_S = 0.25


async def merge(gens) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs as (index, output); closing this closes (and aborts) all."""
    if len(gens) == 1:
        try:
            async for out in gens[0]:
                yield 0, out
        finally:
            await gens[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, gen):
        try:
            async for out in gen:
                await queue.put((i, out))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, exc))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect(request: Request, gens) -> list[list[RequestOutput]] | None:
    """Run requests to completion; None (and everything aborted) if the client goes away."""
    results: list[list[RequestOutput]] = [[] for _ in gens]

    async def run():
        async for i, out in merge(gens):
            results[i].append(out)

    task = asyncio.create_task(run())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                task.result()  # re-raises engine errors
                return results
            if await request.is_disconnected():
                return None
    finally:  # also when this is cancelled (a Ray Serve replica's caller left): the requests are aborted
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
