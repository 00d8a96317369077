"""What do strangers' webhook bodies cost a ``callbrain serve`` process?

    python benchmarks/webhook_flood.py [--posts N] [--mb M]

Starts ``callbrain serve`` for an agent with a webhook key, then:

* ``unsigned``: ``N`` concurrent POSTs of ``M`` MB with no signature header;
* ``forged``: the same with a well-formed, fresh, wrong ``X-Retell-Signature``,
  which only the body can refute;
* ``slow``: one body sent a byte a second: how long the server holds it.

It prints one JSON object: the server's resident memory before and at its peak
during each flood (sampled every 10 ms from ``/proc``), the answers' status
codes, and how long the slow body was held. Run it with
``PYTHONPATH=<an older checkout>/src`` to measure that version.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx2

from callbrain.testing.serve import free_port

SLOW_CAP_S = 30.0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class PeakMemory:
    """Samples a process's RSS every 10 ms in a thread while in use."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()

    def __enter__(self) -> PeakMemory:
        self.before = rss_mb(self.pid)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_mb(self.pid))


async def flood(base: str, posts: int, body: bytes, headers: dict[str, str]) -> dict[str, int]:
    limits = httpx2.Limits(max_connections=posts)
    async with httpx2.AsyncClient(base_url=base, trust_env=False, timeout=60, limits=limits) as c:

        async def post() -> str:
            try:
                return str((await c.post("/webhook", content=body, headers=headers)).status_code)
            except httpx2.HTTPError as exc:
                return type(exc).__name__

        return dict(collections.Counter(await asyncio.gather(*(post() for _ in range(posts)))))


async def slow_body(port: int) -> dict[str, Any]:
    """A signed-looking POST of 1,000 bytes, sent one byte a second."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    stamp = int(time.time() * 1000)
    writer.write(
        b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
        + f"X-Retell-Signature: v={stamp},d={'0' * 64}\r\n\r\n".encode()
    )
    started = time.perf_counter()

    async def drip() -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(1000):
                writer.write(b"x")
                await writer.drain()
                await asyncio.sleep(1)

    dripping = asyncio.create_task(drip())
    try:
        answer = await asyncio.wait_for(reader.readline(), SLOW_CAP_S)
        status = answer.decode().strip() or "closed"
    except TimeoutError:
        status = f"still open after {SLOW_CAP_S:g} s"
    except ConnectionError:
        status = "reset"
    finally:
        dripping.cancel()
        writer.close()
    return {"answer": status, "held_s": round(time.perf_counter() - started, 1)}


async def main(posts: int, mb: float) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp())
    agent_file, log = folder / "agent.yaml", folder / "server.log"
    agent_file.write_text(
        "name: hooks\nllm: {provider: openai, base_url: 'http://127.0.0.1:9/v1', api_key: x}\n"
        "server:\n  webhooks:\n    api_key: key_webhook_0123456789abcdef\n"
    )
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c",
        # No model is reachable here: serve webhooks without the lifespan's warm-up.
        "import sys, uvicorn; from callbrain import create_app; from callbrain.agent import Agent;"
        "from callbrain.server.process import uvicorn_config;"
        f"a = Agent.from_yaml({str(agent_file)!r});"
        f"uvicorn.Server(uvicorn_config(create_app(a), port={port}, settings=a.server,"
        " lifespan='off', log_level='warning')).run()",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=log.open("wb"),
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    body = b"x" * int(mb * 1_000_000)
    results: dict[str, Any] = {"posts": posts, "body_mb": mb}
    try:
        async with asyncio.timeout(60), httpx2.AsyncClient(base_url=base, trust_env=False) as c:
            while True:
                with contextlib.suppress(httpx2.HTTPError):
                    if (await c.post("/webhook", content=b"{}")).status_code == 401:
                        break
                await asyncio.sleep(0.2)
        forged = {"X-Retell-Signature": f"v={int(time.time() * 1000)},d={'0' * 64}"}
        for case, headers in (("unsigned", {}), ("forged", forged)):
            with PeakMemory(proc.pid) as memory:
                answers = await flood(base, posts, body, headers)
            results[case] = {
                "answers": answers,
                "rss_before_mb": round(memory.before),
                "rss_peak_mb": round(memory.peak),
                "rss_added_mb": round(memory.peak - memory.before),
            }
        results["slow"] = await slow_body(port)
        results["log_lines"] = len(log.read_text().splitlines())
    finally:
        proc.terminate()
        await proc.wait()
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--posts", type=int, default=40)
    parser.add_argument("--mb", type=float, default=5.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.posts, args.mb))))
