"""``callbrain fake-llm`` run as users and ``callbrain bench`` run it: a real
process on a real port, driven by the real provider SDKs."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anthropic
import openai
import pytest
from typer.testing import CliRunner

from callbrain.cli import app
from callbrain.testing.serve import free_port

ENV = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
HI = [{"role": "user", "content": "Hi"}]


def fake_llm_command(*flags: str) -> list[str]:
    return [sys.executable, "-m", "callbrain", "fake-llm", *flags]


@dataclass
class Running:
    """A ``callbrain fake-llm`` process."""

    proc: subprocess.Popen[bytes]
    port: int
    stderr: Path

    @classmethod
    def start(cls, stderr: Path, *flags: str) -> Running:
        port = free_port()
        with stderr.open("wb") as sink:
            proc = subprocess.Popen(
                fake_llm_command("--port", str(port), *flags),
                stdout=subprocess.DEVNULL,
                stderr=sink,
                env=ENV,
            )
        return cls(proc, port, stderr)

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_listening(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"callbrain fake-llm did not come up:\n{self.stderr.read_text()}")
            time.sleep(0.05)

    def terminate(self) -> tuple[int, str]:
        """SIGTERM, as a benchmark or a supervisor stops it: exit status and stderr."""
        self.proc.send_signal(signal.SIGTERM)
        status = self.proc.wait(timeout=10)  # a guard against hanging, not a timing check
        return status, self.stderr.read_text()


FAST = ("--ttft", "0", "--token-rate", "0")
SERVERS = {
    "openai": ("--ttft", "0.01", "--token-rate", "1000", "--text", "Hello there, caller. Hi!"),
    "anthropic": ("--provider", "anthropic", *FAST, "--text", "Hi from the fake."),
    "fail": ("--fail-rate", "1", "--fail-status", "500"),
    "stall": ("--stall-rate", "1", "--stall-after", "0", "--ttft", "0"),
    "drop": (*FAST, "--drop-rate", "1", "--drop-after", "2", "--text", "One two three four."),
}


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Running]]:
    """One process per configuration, all started at once: each takes a second
    or more to import, and one after the other they would make this file slow."""
    logs = tmp_path_factory.mktemp("fake-llm")
    started = {name: Running.start(logs / f"{name}.stderr", *f) for name, f in SERVERS.items()}
    try:
        for server in started.values():
            server.wait_listening()
        yield started
    finally:
        for server in started.values():
            if server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait()


def openai_text(client: openai.OpenAI) -> str:
    """Stream one completion and join its content."""
    stream = client.chat.completions.create(model="m", messages=HI, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_openai_streams_the_text_then_sigterm_exits_cleanly(
    servers: dict[str, Running],
) -> None:
    fake = servers["openai"]
    with openai.OpenAI(base_url=f"{fake.root}/v1", api_key="anything", max_retries=0) as oc:
        assert openai_text(oc) == "Hello there, caller. Hi!"
        completion = oc.chat.completions.create(model="m", messages=HI)
        assert completion.choices[0].message.content == "Hello there, caller. Hi!"
    status, stderr = fake.terminate()
    assert status == 0
    url = f"http://127.0.0.1:{fake.port}/v1"
    assert f"base_url    {url}\n" in stderr
    assert f"llm: {{provider: openai, base_url: {url}, api_key: anything}}" in stderr
    assert "served 2 requests (2 completed)" in stderr
    assert "Traceback" not in stderr


def test_anthropic_streams_the_text(servers: dict[str, Running]) -> None:
    fake = servers["anthropic"]
    ac = anthropic.Anthropic(base_url=fake.root, api_key="anything", max_retries=0)
    with ac, ac.messages.stream(model="m", max_tokens=50, messages=HI) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    status, stderr = fake.terminate()
    assert streamed == "Hi from the fake."
    assert final.usage.output_tokens == 4  # one per word-sized chunk
    assert status == 0
    assert f"base_url    http://127.0.0.1:{fake.port}\n" in stderr  # the SDK adds /v1 itself


def test_fail_rate_one_fails_every_request(servers: dict[str, Running]) -> None:
    fake = servers["fail"]
    with openai.OpenAI(base_url=f"{fake.root}/v1", api_key="k", max_retries=0) as oc:
        for _ in range(3):
            with pytest.raises(openai.APIStatusError) as failed:
                openai_text(oc)
            assert failed.value.status_code == 500
    status, stderr = fake.terminate()
    assert status == 0
    assert "served 3 requests (3 error_status)" in stderr


def test_stall_sends_no_content_and_sigterm_still_exits_cleanly(
    servers: dict[str, Running],
) -> None:
    fake = servers["stall"]
    url = f"{fake.root}/v1"
    with openai.OpenAI(base_url=url, api_key="k", max_retries=0, timeout=0.5) as oc:
        received: list[str] = []
        with pytest.raises(openai.APITimeoutError):
            stream = oc.chat.completions.create(model="m", messages=HI, stream=True)
            received.extend(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert "".join(received) == ""
    # A stream stalled when the stop comes must not keep the process alive.
    with openai.OpenAI(base_url=url, api_key="k", max_retries=0, timeout=30) as oc:
        stream = oc.chat.completions.create(model="m", messages=HI, stream=True)
        status, stderr = fake.terminate()
        with pytest.raises(openai.APIConnectionError):  # the SDK's word for a cut stream
            list(stream)
    assert status == 0
    assert "served 2 requests" in stderr


def test_drop_cuts_the_stream_after_the_set_tokens(servers: dict[str, Running]) -> None:
    fake = servers["drop"]
    with openai.OpenAI(base_url=f"{fake.root}/v1", api_key="k", max_retries=0) as oc:
        received: list[str] = []
        stream = oc.chat.completions.create(model="m", messages=HI, stream=True)
        with pytest.raises(openai.APIConnectionError):
            received.extend(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "".join(received) == "One two"
    assert fake.terminate()[0] == 0


def test_an_impossible_rate_exits_2_with_a_clear_message() -> None:
    result = subprocess.run(
        fake_llm_command("--fail-rate", "1.5", "--port", str(free_port())),
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
    )
    assert result.returncode == 2
    assert "Invalid value for '--fail-rate'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--fail-rate", "0.6", "--stall-rate", "0.6"], "together at most 1, not 1.2"),
        (["--stall-rate", "1", "--stall-after", "9", "--text", "Two words."], "past the end"),
        (["--drop-rate", "0.1", "--drop-after", "3", "--text", "Hi."], "past the end"),
        (["--ttft", "inf"], "not a finite number"),
        (["--fail-status", "200"], "--fail-status"),
        (["--provider", "gemini"], "--provider"),
    ],
)
def test_flags_are_checked_before_serving(flags: list[str], message: str) -> None:
    # In-process: these fail before anything is served, and a subprocess each is slow.
    result = CliRunner().invoke(app, ["fake-llm", *flags], env={"NO_COLOR": "1", "COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert message in result.output
