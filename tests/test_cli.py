"""The ``callbrain`` command, run as a user runs it: a real process on a real port."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from callbrain.agent import Agent, example_agent_path
from callbrain.testing.client import RetellClient
from callbrain.testing.fake_llm import FakeOpenAIServer
from callbrain.testing.serve import free_port


def callbrain(*args: str) -> list[str]:
    return [sys.executable, "-m", "callbrain", *args]


@pytest.fixture
def served_example() -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """``callbrain serve`` with no agent file: the shipped clinic on the embedded model."""
    port = free_port()
    proc = subprocess.Popen(
        callbrain("serve", "--port", str(port)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
                if response.status == 200:
                    break
        except (urllib.error.URLError, OSError):  # refused (or timed out) until it is up
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            output = proc.communicate(timeout=5)[0] if proc.poll() is not None else ""
            proc.kill()
            pytest.fail(f"callbrain serve did not come up:\n{output}")
        time.sleep(0.1)
    yield port, proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_serve_runs_the_shipped_agent_out_of_the_box(
    served_example: tuple[int, subprocess.Popen[str]],
) -> None:
    port, proc = served_example

    async def one_call() -> tuple[str, str, int]:
        async with RetellClient.connect(f"ws://127.0.0.1:{port}/llm-websocket", "cli-call") as call:
            await call.expect_config()
            await call.send_call_details(
                {"call_id": "cli-call", "retell_llm_dynamic_variables": {"first_name": "Sam"}}
            )
            greeting = await call.expect_begin()
            reply = await call.ask("Hi, what time do you open on Monday?", timeout=60)
            return greeting.text, reply.text, reply.completes

    greeting, reply, completes = asyncio.run(one_call())
    assert greeting.startswith("Hi Sam, thanks for calling Sunrise Clinic")
    assert reply.strip() and completes == 1

    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=15)[0]
    assert "wss://<your-public-host>/llm-websocket" in output
    assert f"ws://127.0.0.1:{port}/llm-websocket/{{call_id}}" in output
    # Every log line of the call names it.
    call_lines = [line for line in output.splitlines() if "call started" in line]
    assert call_lines and all("call=cli-call" in line for line in call_lines)


def serve_refused(agent_file: Path) -> subprocess.CompletedProcess[str]:
    """``callbrain serve`` with an agent file it must refuse before serving."""
    return subprocess.run(
        callbrain("serve", "--agent", str(agent_file), "--port", str(free_port())),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
    )


def test_serve_rejects_a_bad_agent_file_clearly(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nllm: {provider: openai, temprature: 1}\n")
    result = serve_refused(bad)
    assert result.returncode == 2
    assert "bad.yaml" in result.stderr and "temprature" in result.stderr


def test_serve_rejects_a_tool_that_does_not_import(tmp_path: Path) -> None:
    bad = tmp_path / "tools.yaml"
    bad.write_text("name: x\ntools:\n  - type: python\n    function: no_such_module.tools:book\n")
    result = serve_refused(bad)
    assert result.returncode == 2
    assert "no_such_module.tools:book" in result.stderr and "Traceback" not in result.stderr


def test_version() -> None:
    result = subprocess.run(callbrain("--version"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("callbrain ")


def test_example_prints_a_loadable_agent_file(tmp_path: Path) -> None:
    result = subprocess.run(callbrain("example"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    copy = tmp_path / "mine.yaml"
    copy.write_text(result.stdout)
    # The same definition (the folder its tools are looked up in differs).
    assert Agent.from_yaml(copy).model_dump() == Agent.from_yaml(example_agent_path()).model_dump()


PIZZA_TOOLS = '''
def menu() -> list[str]:
    """What is on the menu."""
    return ["margherita"]
'''


async def serve_until(
    args: list[str], marker: bytes
) -> tuple[asyncio.subprocess.Process, list[str]]:
    """``callbrain serve *args`` as a subprocess, its stderr read up to ``marker``."""
    proc = await asyncio.create_subprocess_exec(
        *callbrain("serve", *args), stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "300"},
    )  # fmt: skip
    assert proc.stderr is not None
    lines: list[str] = []
    while marker not in (line := await asyncio.wait_for(proc.stderr.readline(), 60)):
        assert line, "\n".join(lines) + "\ncallbrain serve exited"
        lines.append(line.decode().rstrip("\n"))
    lines.append(line.decode().rstrip("\n"))
    return proc, lines


async def stop(proc: asyncio.subprocess.Process) -> int:
    proc.send_signal(signal.SIGINT)
    return await asyncio.wait_for(proc.wait(), 30)


async def test_serve_a_folder_of_agents_each_at_its_own_url(tmp_path: Path) -> None:
    async with FakeOpenAIServer() as fake:
        llm = f"llm: {{provider: openai, base_url: '{fake.base_url}', api_key: k}}\n"
        (tmp_path / "pizza_tools.py").write_text(PIZZA_TOOLS)
        (tmp_path / "pizza.yaml").write_text(
            "name: pizza\nbegin_message: Pizza here.\n" + llm
            + "tools: [{type: python, function: 'pizza_tools:menu'}]\n"
        )  # fmt: skip
        (tmp_path / "sushi.yaml").write_text("name: sushi\nbegin_message: Sushi here.\n" + llm)
        port = free_port()
        proc, lines = await serve_until([str(tmp_path), "--port", str(port)], b"listening on")
        try:
            banner = "\n".join(lines)
            for name in ("pizza", "sushi"):
                assert f"In Retell   wss://<your-public-host>/llm-websocket/agent/{name}" in banner
                url = f"ws://127.0.0.1:{port}/llm-websocket/agent/{name}"
                assert f"WebSocket   {url}/{{call_id}}" in banner
                async with RetellClient.connect(url, f"call-{name}") as call:
                    await call.expect_config()
                    assert (await call.expect_begin()).text == f"{name.title()} here."
        finally:
            assert await stop(proc) == 0


async def test_with_log_json_the_banner_is_log_lines(tmp_path: Path) -> None:
    async with FakeOpenAIServer() as fake:
        agent_file = tmp_path / "agent.yaml"
        agent_file.write_text(
            f"name: j\nbegin_message: Hi.\nllm: {{provider: openai, base_url: '{fake.base_url}', "
            "api_key: k}\n"
        )
        args = [str(agent_file), "--port", "0", "--log-json"]  # any free port: the banner says
        proc, lines = await serve_until(args, b"listening on")
        try:
            entries = [json.loads(line) for line in lines]  # every line is a JSON object
            [agent] = [e["msg"] for e in entries if e["msg"].startswith("serving agent 'j'")]
            assert "Retell URL wss://<your-public-host>/llm-websocket" in agent
            port = int(agent.split("socket ws://127.0.0.1:")[1].split("/")[0])
            async with RetellClient.connect(f"ws://127.0.0.1:{port}/llm-websocket", "c") as call:
                await call.expect_config()
        finally:
            assert await stop(proc) == 0
