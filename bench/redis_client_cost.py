"""What one pipelined XADD costs in redis-py's asyncio client (the Redis store's writer, bench/RESULTS.md).

    python -m bench.redis_client_cost    # starts its own redis-server on a temporary unix socket

Client CPU per event, then a cProfile of the same run: where the relay's added CPU per event
in Redis mode goes.
"""

from __future__ import annotations

import asyncio
import cProfile
import io
import pstats
import time

from bench.procs import Redis

DATA = b'id: abcdefghijklmnopqrstuv.12\ndata: {"type":"delta","content":"word"}\n\n'
EVENTS, BATCH = 20_000, 10


async def main() -> None:
    import redis.asyncio as aioredis

    server = Redis()
    client = aioredis.Redis.from_url(server.url)
    try:
        async def run() -> None:
            for batch in range(EVENTS // BATCH):
                pipe = client.pipeline(transaction=False)
                for i in range(BATCH):
                    seq = batch * BATCH + i + 1
                    pipe.xadd(f"bench:{{s{i}}}:log", {"d": DATA}, id=f"{seq}-1", maxlen=50_000, approximate=True)
                await pipe.execute(raise_on_error=False)

        began = time.process_time()
        await run()
        print(f"pipelined XADD: {(time.process_time() - began) / EVENTS * 1e6:.1f} us of client CPU per event "
              f"(batches of {BATCH})")
        await client.flushall()
        profile = cProfile.Profile()
        profile.enable()
        await run()
        profile.disable()
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(16)
        print(out.getvalue())
    finally:
        await client.aclose()
        server.close()


if __name__ == "__main__":
    asyncio.run(main())
