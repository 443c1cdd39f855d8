"""An asyncio agent: ``heartbeat()`` does no I/O, so calling it inside a coroutine is safe.

    python examples/agents/async_agent.py

It only appends to an in-memory queue (about a microsecond) and never awaits, so it cannot block
the event loop even when Redis is down or hung. Use it like any other cheap function call.
"""

import asyncio
import random

import producers
from producers import heartbeat


async def summarise(doc: str) -> int:
    await asyncio.sleep(random.uniform(0.05, 0.15))  # an async model call
    return random.randint(100, 400)


async def worker(name: str, docs: asyncio.Queue[str]) -> None:
    while True:
        doc = await docs.get()
        tokens = await summarise(doc)
        heartbeat(tokens=tokens, fp=doc, worker=name)  # `worker` is meta for the detectors
        docs.task_done()


async def main() -> None:
    producers.init(agent="async-agent", interval=0.2)
    docs: asyncio.Queue[str] = asyncio.Queue()
    for n in range(30):
        docs.put_nowait(f"doc-{n}")
    workers = [asyncio.create_task(worker(f"w{i}", docs)) for i in range(3)]
    await docs.join()
    for task in workers:
        task.cancel()


if __name__ == "__main__":
    asyncio.run(main())
    # A finite job that ends on purpose says so; otherwise the pipeline alerts that the agent
    # "exited without shutdown()". Called after the event loop: unlike heartbeat(), shutdown()
    # waits for the final flush (at most 2 s, even with Redis hung).
    producers.shutdown()
