"""Does a flood of half-open connections stop real calls? Measured on a real
``callbrain serve`` process with a lowered open-file limit.

    python benchmarks/handshake_flood.py [--sockets N] [--nofile L] [--kind K] [--hold S]

Starts a fake OpenAI server (in this process) and ``callbrain serve`` with
``RLIMIT_NOFILE`` set to ``L`` (soft and hard, so the server cannot raise it),
opens ``N`` connections of one kind that never finish their handshake:

* ``idle``: connects and sends nothing;
* ``slowloris``: starts a WebSocket upgrade and sends one more header byte
  every two seconds, never finishing;
* ``long-url``: a complete upgrade with a 9 KB URL;
* ``many-headers``: a complete upgrade with 200 headers;

then, with those still open, makes a real call (one turn) and asks ``/healthz``,
and prints one JSON object: what happened to each, how many of the ``N``
sockets got an HTTP status line, how many the server had closed after
``--hold`` seconds, and how long the call and the health check took.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from callbrain.testing import FakeOpenAIServer, Reply, RetellClient
from callbrain.testing.serve import free_port

UPGRADE = (
    "GET /llm-websocket/{path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Version: 13\r\n{extra}\r\n"
)


def opening(kind: str) -> bytes:
    """The bytes each flood socket sends once connected."""
    if kind == "idle":
        return b""
    if kind == "slowloris":
        return b"GET /llm-websocket/c HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nX-a"
    if kind == "long-url":
        return UPGRADE.format(path="c" + "x" * 9000, extra="").encode()
    if kind == "many-headers":
        extra = "".join(f"X-H{i}: v\r\n" for i in range(200))
        return UPGRADE.format(path="c", extra=extra).encode()
    raise ValueError(kind)


async def open_flood(port: int, count: int, kind: str) -> list[Any]:
    flood = []
    data = opening(kind)
    for _ in range(count):
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
        except (OSError, TimeoutError):
            break
        if data:
            writer.write(data)
        flood.append((reader, writer))
    return flood


async def drip_bytes(flood: list[Any]) -> None:
    """A slowloris: one more header byte on every socket every two seconds."""
    while True:
        await asyncio.sleep(2)
        for _, writer in flood:
            if not writer.is_closing():
                writer.write(b"a")


async def answered_and_closed(flood: list[Any], hold: float) -> tuple[int, int]:
    """How many got an HTTP status line, and how many were closed, within ``hold`` s."""

    async def one(reader: asyncio.StreamReader) -> tuple[bool, bool]:
        try:
            data = await asyncio.wait_for(reader.read(), hold)
        except TimeoutError:
            return False, False
        except OSError:
            return False, True
        return data.startswith(b"HTTP/1.1 4") or data.startswith(b"HTTP/1.1 5"), True

    results = await asyncio.gather(*(one(r) for r, _ in flood))
    return sum(a for a, _ in results), sum(c for _, c in results)


def health(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            return str(r.status)
    except Exception as exc:  # reported, not handled
        return type(exc).__name__


async def real_call(base: str) -> str:
    try:
        async with RetellClient.connect(base, "real-call", open_timeout=10) as call:
            await call.expect_config(timeout=10)
            turn = await call.ask("Hello?", timeout=10)
            return "ok" if turn.complete and turn.text else "incomplete"
    except Exception as exc:  # reported, not handled
        return type(exc).__name__


async def main(sockets: int, nofile: int, kind: str, hold: float) -> dict[str, Any]:
    async with FakeOpenAIServer(default=Reply("Hi there."), record=False) as fake:
        port = free_port()
        folder = Path(tempfile.mkdtemp())
        agent_file, log = folder / "agent.yaml", folder / "server.log"
        agent_file.write_text(
            "name: flood\nbegin_message: Hi.\n"
            f"llm: {{provider: openai, base_url: '{fake.base_url}', api_key: sk-test}}\n"
        )

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "callbrain", "serve", "--agent", str(agent_file),
            "--port", str(port), "--log-level", "info",
            preexec_fn=limit,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log.open("wb"),
        )  # fmt: skip
        try:
            async with asyncio.timeout(60):
                while await asyncio.to_thread(health, port) != "200":
                    if proc.returncode is not None:
                        raise RuntimeError(f"callbrain serve exited; see {log}")
                    await asyncio.sleep(0.2)
            flood = await open_flood(port, sockets, kind)
            drip = asyncio.create_task(drip_bytes(flood)) if kind == "slowloris" else None
            started = time.perf_counter()
            call = await real_call(f"ws://127.0.0.1:{port}/llm-websocket")
            call_s = time.perf_counter() - started
            started = time.perf_counter()
            healthz = await asyncio.to_thread(health, port)
            health_s = time.perf_counter() - started
            answered, closed = await answered_and_closed(flood, hold)
            if drip is not None:
                drip.cancel()
            for _, writer in flood:
                writer.close()
            lines = log.read_text().splitlines()
            return {
                "kind": kind,
                "nofile": nofile,
                "sockets_opened": len(flood),
                "real_call": call,
                "real_call_s": round(call_s, 2),
                "healthz": healthz,
                "healthz_s": round(health_s, 2),
                f"answered_with_http_error_within_{hold:g}s": answered,
                f"closed_by_server_within_{hold:g}s": closed,
                "server_log_lines": len(lines),
                "server_log_sample": [line.split(" ", 2)[-1] for line in lines[:3]],
            }
        finally:
            proc.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 30)
            if proc.returncode is None:
                proc.kill()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sockets", type=int, default=1100)
    parser.add_argument("--nofile", type=int, default=1024)
    parser.add_argument(
        "--kind", choices=["idle", "slowloris", "long-url", "many-headers"], default="idle"
    )
    parser.add_argument("--hold", type=float, default=15.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.sockets, args.nofile, args.kind, args.hold))))
