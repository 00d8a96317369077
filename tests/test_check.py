"""``callbrain check``, run as CI runs it before a deploy, against fake model servers."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

from callbrain.testing.fake_llm import FakeAnthropicServer, FakeOpenAIServer, Reply
from callbrain.testing.serve import free_port

PROVIDER_ENV = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL")


async def check(*args: str | Path, cwd: Path | None = None) -> tuple[int, list[str]]:
    """``callbrain check *args``: its status and its output lines (the fakes keep serving)."""
    env = {k: v for k, v in os.environ.items() if k not in PROVIDER_ENV}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "callbrain", "check", *map(str, args),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=cwd,
        env={**env, "NO_COLOR": "1", "COLUMNS": "400"},
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode is not None
    return proc.returncode, out.decode().splitlines()


def openai(fake: FakeOpenAIServer, model: str = "primary-model") -> str:
    return (
        f"{{provider: openai, model: {model}, base_url: '{fake.base_url}', api_key: k, "
        "max_retries: 0}"
    )


def anthropic(fake: FakeAnthropicServer) -> str:
    return f"{{provider: anthropic, model: backup-model, base_url: '{fake.base_url}', api_key: k, max_retries: 0}}"  # noqa: E501


async def test_live_asks_every_model_and_names_the_one_that_fails(tmp_path: Path) -> None:
    async with (
        FakeOpenAIServer(Reply("OK.")) as good,
        FakeAnthropicServer(Reply(status=401)) as bad,
        FakeOpenAIServer(Reply("Fine.")) as third,
    ):
        agent = tmp_path / "agent.yaml"
        agent.write_text(
            f"name: a\nllm: {openai(good)}\n"
            f"fallback_llms: [{anthropic(bad)}, {openai(third, 'third-model')}]\n"
        )
        code, lines = await check(agent, "--live")
    assert code == 2, lines
    assert re.search(
        r"ok    llm \(openai: primary-model\): first token in \d+ ms: 'OK\.'", lines[-4]
    )
    assert lines[-3].startswith(
        "  FAIL  fallback_llms[0] (anthropic: backup-model): no answer: "
    ), lines
    assert "401" in lines[-3]
    assert re.search(r"ok    fallback_llms\[1\] \(openai: third-model\): first token", lines[-2])
    assert lines[-1] == f"check failed: {agent}: fallback_llms[0] (anthropic: backup-model)"
    # Each was asked once, on its own (not through the failover).
    assert (len(good.requests), len(bad.requests), len(third.requests)) == (1, 1, 1)


async def test_a_sound_agent_passes_and_nothing_is_sent_without_live(tmp_path: Path) -> None:
    (tmp_path / "pizza_tools.py").write_text(
        'def menu() -> list[str]:\n    """The menu."""\n    return ["margherita"]\n'
    )
    async with FakeOpenAIServer() as fake:
        agent = tmp_path / "pizza.yaml"
        agent.write_text(
            f"name: pizza\nllm: {openai(fake)}\n"
            "tools: [{type: python, function: 'pizza_tools:menu'}, {type: end_call}]\n"
        )
        code, lines = await check(agent, cwd=Path("/"))  # the tools are found beside the file
        assert fake.requests == []
    assert code == 0, lines
    assert lines == [
        str(agent),
        "  ok    agent file: agent 'pizza'",
        "  ok    tools: menu, end_call",
        "  ok    llm (openai: primary-model): settings complete",
        "  ok    server: store in memory, metrics on, webhooks off",
        "check passed",
    ]


async def test_settings_are_checked_for_every_model_and_file(tmp_path: Path) -> None:
    async with FakeOpenAIServer() as fake:
        first = tmp_path / "first.yaml"
        first.write_text(
            f"name: one\nllm: {openai(fake)}\nfallback_llms: [{{provider: anthropic}}]\n"
            "tools: [{type: python, function: 'nowhere_tools:f'}]\n"
        )
        second = tmp_path / "second.yaml"
        second.write_text("name: two\nbegin_mesage: hi\n")
        code, lines = await check(first, second)
    assert code == 2
    text = "\n".join(lines)
    assert "FAIL  tools: tool reference 'nowhere_tools:f': no module named" in text
    assert "FAIL  fallback_llms[0] (anthropic: claude-haiku-4-5): " in text
    assert "ANTHROPIC_API_KEY environment variable" in text
    assert "FAIL  agent file: unknown key 'begin_mesage' (did you mean 'begin_message'?)" in text
    assert lines[-1] == (
        f"check failed: {first}: tools, {first}: fallback_llms[0] (anthropic: claude-haiku-4-5), "
        f"{second}: agent file"
    )


async def test_the_server_blocks_of_several_files_are_checked_together(tmp_path: Path) -> None:
    async with FakeOpenAIServer() as fake:
        for name, drain in (("a", 10), ("b", 20)):
            (tmp_path / f"{name}.yaml").write_text(
                f"name: {name}\nllm: {openai(fake)}\nserver: {{drain_s: {drain}}}\n"
            )
        code, lines = await check(tmp_path)  # a folder: every agent file in it
    assert code == 2
    assert lines[-2] == (
        f"  FAIL  server: {tmp_path}/b.yaml: server.drain_s differs from {tmp_path}/a.yaml; the "
        f"server block applies to the whole process: set it in the first agent file only "
        f"({tmp_path}/a.yaml), or make it the same"
    )


async def test_live_pings_the_store(tmp_path: Path, redis_url: str) -> None:
    async with FakeOpenAIServer() as fake:
        agent = tmp_path / "agent.yaml"
        for url, ok in ((redis_url, True), (f"redis://127.0.0.1:{free_port()}/0", False)):
            agent.write_text(
                f"name: a\nllm: {openai(fake)}\nserver: {{store: {{redis_url: '{url}'}}}}\n"
            )
            code, lines = await check(agent, "--live")
            assert code == (0 if ok else 2), lines
            [store] = [line for line in lines if "  server.store.redis_url" in line]
            expected = "ok    server.store.redis_url: answers" if ok else "FAIL  server.store"
            assert expected in store
