"""``callbrain fake-llm``: a fake OpenAI or Anthropic server as a process.

For load tests of callbrain (``callbrain bench`` starts it as a subprocess) and
of users' own stacks. What it answers is a :class:`ReplyMix`; this module adds
the flags and runs uvicorn as the process's server. It may serve thousands of
concurrent streams for hours, so it records nothing per request (it only
counts outcomes, printed at exit) and logs no line per request.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable
from typing import Annotated, Literal

import typer
import uvicorn
from rich.console import Console

from callbrain.logs import configure_logging
from callbrain.server.process import ProcessServer
from callbrain.testing.fake_llm.anthropic import FakeAnthropicServer
from callbrain.testing.fake_llm.base import FakeLLMServer
from callbrain.testing.fake_llm.mix import DEFAULT_TEXT, ReplyMix, ReplyMixError
from callbrain.testing.fake_llm.openai import FakeOpenAIServer

Provider = Literal["openai", "anthropic"]

_console = Console(stderr=True, highlight=False, soft_wrap=True)
_DEFAULTS = ReplyMix()


def base_url(provider: Provider, host: str, port: int) -> str:
    """What to give the SDK: the OpenAI SDK wants ``/v1``; Anthropic's adds it itself."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{port}" + ("/v1" if provider == "openai" else "")


def banner(provider: Provider, host: str, port: int, replies: str) -> str:
    """The start-up message: what is served and the exact base URL to use."""
    url = base_url(provider, host, port)
    if provider == "openai":
        what, sdk = "OpenAI chat completions (POST /v1/chat/completions)", "OpenAI"
    else:
        what, sdk = "Anthropic messages (POST /v1/messages)", "Anthropic"
    return (
        f"callbrain fake-llm: a fake {what} on {host}:{port}\n"
        f"  base_url    {url}\n"
        f'  SDK         {sdk}(base_url="{url}", api_key="anything")\n'
        f"  Agent file  llm: {{provider: {provider}, base_url: {url}, api_key: anything}}\n"
        f"  Replies     {replies}\n"
        "  Ctrl-C or SIGTERM stops it."
    )


class _FakeLLMProcess(ProcessServer):
    """uvicorn as the process's server, with three changes for a fake.

    The banner is printed once the socket listens (so ``--port 0`` shows the
    real port); stalled streams are aborted as shutdown begins instead of
    holding it up until the graceful timeout; and SIGINT/SIGTERM end the
    process with status 0 (:class:`~callbrain.server.process.ProcessServer`).
    """

    def __init__(
        self, config: uvicorn.Config, fake: FakeLLMServer, banner: Callable[[int], str]
    ) -> None:
        super().__init__(config)
        self.fake = fake
        self.banner = banner

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            bound = self.servers[0].sockets
            port = int(bound[0].getsockname()[1]) if bound else self.config.port
            _console.print(self.banner(port), markup=False)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.fake.abort_streams()
        await super().shutdown(sockets)


def fake_llm(
    provider: Annotated[Provider, typer.Option(help="The API to fake.")] = "openai",
    host: Annotated[
        str, typer.Option(help="Interface to listen on (0.0.0.0 for all).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port (0: any free one).")] = 8090,
    ttft: Annotated[
        float, typer.Option(min=0, help="Seconds from a request to its first token.")
    ] = _DEFAULTS.ttft,
    ttft_max: Annotated[
        float | None,
        typer.Option(
            min=0, help="Draw each request's time to first token between --ttft and this."
        ),
    ] = None,
    token_rate: Annotated[
        float,
        typer.Option(
            min=0, help="Tokens (word-sized chunks) per second after the first; 0 or inf: no delay."
        ),
    ] = _DEFAULTS.token_rate,
    text: Annotated[str, typer.Option(help="The text of every reply.")] = DEFAULT_TEXT,
    fail_rate: Annotated[
        float, typer.Option(min=0, max=1, help="Share of requests answered with an HTTP error.")
    ] = _DEFAULTS.fail_rate,
    fail_status: Annotated[
        int, typer.Option(min=400, max=599, help="The HTTP status of those errors.")
    ] = _DEFAULTS.fail_status,
    retry_after: Annotated[
        float, typer.Option(min=0, help="Seconds advertised in retry-after on a 429.")
    ] = _DEFAULTS.retry_after,
    stall_rate: Annotated[
        float,
        typer.Option(
            min=0, max=1, help="Share of streams that stall: no more bytes, connection kept open."
        ),
    ] = _DEFAULTS.stall_rate,
    stall_after: Annotated[
        int, typer.Option(min=0, help="Tokens sent before a stall (0: stall before the first).")
    ] = _DEFAULTS.stall_after,
    drop_rate: Annotated[
        float,
        typer.Option(min=0, max=1, help="Share of streams whose connection is dropped mid-stream."),
    ] = _DEFAULTS.drop_rate,
    drop_after: Annotated[
        int | None, typer.Option(min=0, help="Tokens sent before a drop. Default: half the reply.")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed for the random failures, for repeatable runs.")
    ] = None,
    log_level: Annotated[
        Literal["debug", "info", "warning", "error"], typer.Option(help="Log verbosity.")
    ] = "info",
) -> None:
    """Serve a fake OpenAI-compatible or Anthropic LLM for load tests: set speed and failures."""
    try:
        mix = ReplyMix(
            text=text,
            ttft=ttft,
            ttft_max=ttft_max,
            token_rate=token_rate,
            fail_rate=fail_rate,
            fail_status=fail_status,
            retry_after=retry_after,
            stall_rate=stall_rate,
            stall_after=stall_after,
            drop_rate=drop_rate,
            drop_after=drop_after,
            seed=seed,
        )
    except ReplyMixError as exc:
        flags = " + ".join(f"'--{field.replace('_', '-')}'" for field in exc.fields)
        raise typer.BadParameter(exc.message, param_hint=flags) from None
    configure_logging(log_level)
    kind = FakeOpenAIServer if provider == "openai" else FakeAnthropicServer
    fake = kind(default=mix.reply_function(), record=False)
    config = uvicorn.Config(
        fake.asgi_app(),
        host=host,
        port=port,
        log_config=None,  # configure_logging's handler, not uvicorn's
        access_log=False,  # a line per request would flood a load test's terminal
        ws="none",
        lifespan="off",
        timeout_graceful_shutdown=2,
    )
    show = functools.partial(banner, provider, host, replies=mix.describe())
    _FakeLLMProcess(config, fake, show).run()
    counts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(fake.outcomes.items()))
    _console.print(
        f"callbrain fake-llm: served {fake.received} requests ({counts or 'none'}).", markup=False
    )
