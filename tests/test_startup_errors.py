"""A mistake at start-up is one line on stderr, status 2, no traceback, and a hint:
the real commands run as a new user runs them, one per mistake."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from callbrain.testing.serve import free_port

PROVIDER_ENV = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL")


def run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> tuple[int, str]:
    """``callbrain *args``: its status and its stderr."""
    clean = {k: v for k, v in os.environ.items() if k not in PROVIDER_ENV}
    result = subprocess.run(
        [sys.executable, "-m", "callbrain", *args],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        env={**clean, "NO_COLOR": "1", "COLUMNS": "400", **(env or {})},
    )
    return result.returncode, result.stderr


def one_error(code: int, stderr: str, *hints: str) -> str:
    """The single ``error:`` line, after checking the status and that nothing else
    (a banner, a traceback) came first."""
    assert code == 2, stderr
    assert "Traceback" not in stderr
    assert "WebSocket" not in stderr  # never a banner for a server that is not there
    [line] = stderr.splitlines()
    assert line.startswith("error: "), line
    for hint in hints:
        assert hint in line, line
    return line


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path


def agent_file(folder: Path, text: str, name: str = "agent.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


OPENAI = "llm: {provider: openai, api_key: test-key, base_url: 'http://127.0.0.1:9/v1'}\n"

# (the agent file's text, what the one line must say)
MISTAKES = {
    "misspelt key": (
        "begin_mesage: Hi\n",
        ["agent.yaml: unknown key 'begin_mesage' (did you mean 'begin_message'?)"],
    ),
    "llm block": (
        "llm: {provider: openai, temprature: 1}\n",
        ["agent.yaml: llm: unknown key 'temprature' (did you mean 'temperature'?)"],
    ),
    "provider": (
        "llm: {provider: opnai}\n",
        ["agent.yaml: llm: unknown provider 'opnai' (did you mean 'openai'?)"],
    ),
    "tools block": (
        OPENAI + "tools: [{type: python, functon: tools:book}]\n",
        ["agent.yaml: tools[0]: unknown key 'functon' (did you mean 'function'?)"],
    ),
    "server block": (
        OPENAI + "server: {acess: {secret: x}}\n",
        ["agent.yaml: server: unknown key 'acess' (did you mean 'access'?)"],
    ),
    "fallback block": (
        OPENAI + "fallback_llms: [{provider: anthropic, modle: x}]\n",
        ["agent.yaml: fallback_llms[0]: unknown key 'modle' (did you mean 'model'?)"],
    ),
    "missing API key": (
        "llm: {provider: openai}\n",
        ["agent.yaml: llm: ", "OPENAI_API_KEY environment variable"],
    ),
    "missing fallback key": (
        OPENAI + "fallback_llms: [{provider: anthropic}]\n",
        ["agent.yaml: fallback_llms[0]: ", "ANTHROPIC_API_KEY environment variable"],
    ),
    "missing model file": (
        "llm: {provider: local, model_path: /nowhere/model.gguf}\n",
        ["agent.yaml: llm: ", "/nowhere/model.gguf", "llm.model_path", "download a GGUF"],
    ),
    "tool that does not import": (
        OPENAI + "tools: [{type: python, function: pizza_tools_nowhere:add}]\n",
        ["no module named 'pizza_tools_nowhere' beside the agent file", "import path"],
    ),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_serve(folder: Path, mistake: str) -> None:
    text, hints = MISTAKES[mistake]
    path = agent_file(folder, text)
    one_error(*run("serve", str(path), "--port", str(free_port())), *hints)


@pytest.mark.parametrize(
    "mistake", ["misspelt key", "missing API key", "tool that does not import"]
)
def test_chat_and_test(folder: Path, mistake: str) -> None:
    text, hints = MISTAKES[mistake]
    path = agent_file(folder, text)
    one_error(*run("chat", "--agent", str(path)), *hints)
    scenario = agent_file(folder, "steps: [{caller: hi}]\n", "hello.yaml")
    one_error(*run("test", str(scenario), "--agent", str(path)), *hints)


def test_a_misspelt_scenario_key(folder: Path) -> None:
    scenario = agent_file(folder, "steps:\n  - caller: hi\n    expect: {say: hello}\n", "s.yaml")
    one_error(
        *run("test", str(scenario)), "s.yaml: steps[0].expect: unknown key 'say' (did you mean"
    )


@pytest.mark.parametrize(
    ("port", "hint"),
    [("99999", "port 99999 is not a TCP port (1-65535"), ("-1", "port -1 is not a TCP port")],
)
def test_a_port_out_of_range(folder: Path, port: str, hint: str) -> None:
    path = agent_file(folder, OPENAI)
    one_error(*run("serve", str(path), "--port", port), hint, "--port")


@pytest.fixture
def port_in_use() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_port_in_use(folder: Path, port_in_use: int) -> None:
    path = agent_file(folder, OPENAI)
    one_error(
        *run("serve", str(path), "--port", str(port_in_use)),
        f"port {port_in_use} on 127.0.0.1 is already in use",
        "--port",
    )


def test_a_missing_extra_is_named(folder: Path) -> None:
    # An installed package that cannot be imported is what a missing extra looks like.
    blocked = folder / "blocked"
    (blocked / "redis").mkdir(parents=True)
    (blocked / "redis" / "__init__.py").write_text("raise ImportError('not installed')\n")
    path = agent_file(folder, OPENAI + "server: {store: {redis_url: 'redis://127.0.0.1:9'}}\n")
    one_error(
        *run("serve", str(path), env={"PYTHONPATH": str(blocked)}),
        "server.store.redis_url needs the 'redis' extra: pip install 'callbrain[redis]'",
    )


def test_a_store_that_does_not_answer(folder: Path) -> None:
    path = agent_file(
        folder, OPENAI + f"server: {{store: {{redis_url: 'redis://127.0.0.1:{free_port()}'}}}}\n"
    )
    line = one_error(
        *run("serve", str(path), "--port", str(free_port())),
        "agent.yaml: server.store.redis_url does not answer",
    )
    assert "redis://" not in line  # the URL may hold a password


def test_a_store_that_does_not_answer_under_test_and_chat(folder: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}"
    path = agent_file(folder, OPENAI + f"server: {{store: {{redis_url: '{url}'}}}}\n")
    scenario = agent_file(folder, "steps: [{caller: hi}]\n", "hello.yaml")
    hint = "agent.yaml: server.store.redis_url does not answer"
    one_error(*run("test", str(scenario), "--agent", str(path)), hint)
    code, stderr = run("chat", "--agent", str(path))
    assert code == 2 and "Traceback" not in stderr
    last = stderr.splitlines()[-1]  # after "Starting agent ..."
    assert last.startswith("error: ") and hint in last


def test_debug_shows_the_traceback(folder: Path) -> None:
    path = agent_file(folder, "begin_mesage: Hi\n")
    code, stderr = run("serve", str(path), "--debug")
    assert code == 2
    assert "Traceback" in stderr
    assert stderr.splitlines()[-1].startswith("error: ")
