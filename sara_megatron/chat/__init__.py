"""The OpenAI wire format, both sides: a retrying, bounded async client (`client.py`), a real
local server that speaks it and injects faults (`server.py`, the test double and the demo's
translator host), and a SQLite reply cache (`cache.py`) so no request is paid for twice."""

from sara_megatron.chat.client import (
    ChatClient, ChatReply, ChatRequestFailed, ChatSettings, ChatStats, is_reasoning_model,
)

__all__ = ["ChatClient", "ChatReply", "ChatRequestFailed", "ChatSettings", "ChatStats",
           "is_reasoning_model"]
