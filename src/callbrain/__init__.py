"""callbrain: the brain behind Retell voice agents.

Retell does telephony, speech and turn-taking; through its Custom LLM WebSocket
protocol it hands each call's live transcript to a callbrain server and speaks
what the model streams back.
"""

from __future__ import annotations

from callbrain.agent import Agent, AgentConfigError
from callbrain.server.app import create_app

__version__ = "0.1.0"
__all__ = ["Agent", "AgentConfigError", "__version__", "create_app"]
