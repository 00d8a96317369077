"""Provider-neutral LLM layer: one stream interface, one module per provider."""

from __future__ import annotations

from collections.abc import Sequence

from callbrain.llm.base import LLM, LLMError, LLMStream, LLMTimeoutError
from callbrain.llm.chat import (
    ChatChunk,
    ChatItem,
    ChatRequest,
    Message,
    TextDelta,
    ToolCall,
    ToolOutput,
    ToolSpec,
    Usage,
)
from callbrain.llm.config import AnthropicConfig, LLMConfig, LocalConfig, OpenAIConfig

__all__ = [
    "LLM",
    "AnthropicConfig",
    "ChatChunk",
    "ChatItem",
    "ChatRequest",
    "LLMConfig",
    "LLMError",
    "LLMStream",
    "LLMTimeoutError",
    "LocalConfig",
    "Message",
    "OpenAIConfig",
    "TextDelta",
    "ToolCall",
    "ToolOutput",
    "ToolSpec",
    "Usage",
    "create_llm",
    "create_llms",
]


def create_llm(config: OpenAIConfig | AnthropicConfig | LocalConfig) -> LLM:
    """Build the backend for ``config``; provider SDKs are imported only when used."""
    if isinstance(config, OpenAIConfig):
        from callbrain.llm.openai import OpenAILLM

        return OpenAILLM(config)
    if isinstance(config, AnthropicConfig):
        from callbrain.llm.anthropic import AnthropicLLM

        return AnthropicLLM(config)
    from callbrain.llm.local import LocalLLM

    return LocalLLM(config)


def create_llms(
    configs: Sequence[OpenAIConfig | AnthropicConfig | LocalConfig],
) -> LLM:
    """One backend, or several in order of preference behind a
    :class:`~callbrain.llm.failover.FailoverLLM`."""
    if len(configs) == 1:
        return create_llm(configs[0])
    from callbrain.llm.failover import FailoverLLM

    return FailoverLLM([create_llm(config) for config in configs])
