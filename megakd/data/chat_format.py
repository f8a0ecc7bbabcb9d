"""Reading chat/SFT JSONL: one conversation per line, checked line by line.

Two layouts (docs/data.md):

* OpenAI-style messages: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str},
  ...]}`` (the key is ``--messages-key``). A system message may only come first; there must be
  at least one assistant message, and every assistant message needs non-empty content.
* Prompt/response pairs: ``{"<--prompt-key>": str, "<--response-key>": str}``, read as one
  user message followed by one assistant message.

Every problem raises :class:`ChatFormatError` naming the file and the 1-based line number.
Blank lines are skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

Message = Dict[str, str]  # {"role": ..., "content": ...}
ROLES = ("system", "user", "assistant")


class ChatFormatError(ValueError):
    """A malformed chat JSONL line; the message starts with ``file:line:``."""


@dataclass(frozen=True)
class ChatKeys:
    """Which JSON keys hold a conversation: ``messages`` or a ``prompt``/``response`` pair."""

    messages: str = "messages"
    prompt: Optional[str] = None
    response: Optional[str] = None

    @property
    def is_pair(self) -> bool:
        return self.prompt is not None


def _messages_from_record(record: object, keys: ChatKeys,
                          prompts_only: bool = False) -> List[Message]:
    """The conversation on one line, or ValueError saying what is wrong with it.
    ``prompts_only``: a conversation may end without an assistant answer (generation input;
    a prompt/response pair may then lack its response key)."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if keys.is_pair:
        if prompts_only and keys.response not in record:
            record = {**record, keys.response: ""}
        for key in (keys.prompt, keys.response):
            if key not in record:
                raise ValueError(f"missing key {key!r}")
            if not isinstance(record[key], str):
                raise ValueError(f"{key!r} must be a string, got {type(record[key]).__name__}")
        if not record[keys.response].strip():
            if prompts_only:
                return [{"role": "user", "content": record[keys.prompt]}]
            raise ValueError(f"empty response ({keys.response!r})")
        return [{"role": "user", "content": record[keys.prompt]},
                {"role": "assistant", "content": record[keys.response]}]

    if keys.messages not in record:
        raise ValueError(f"missing key {keys.messages!r}")
    messages = record[keys.messages]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{keys.messages!r} must be a non-empty list of messages")
    out: List[Message] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i} must be an object with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if role == "system" and i != 0:
            raise ValueError(f"message {i}: a system message may only come first")
        if not isinstance(content, str):
            raise ValueError(f"message {i} content must be a string, got {type(content).__name__}")
        if role == "assistant" and not content.strip():
            raise ValueError(f"message {i}: empty assistant response")
        out.append({"role": role, "content": content})
    if not prompts_only and not any(m["role"] == "assistant" for m in out):
        raise ValueError("no assistant message (nothing to train on)")
    return out


def iter_conversations(path: str, keys: ChatKeys,
                       prompts_only: bool = False) -> Iterator[List[Message]]:
    """Yield each line's conversation; raise :class:`ChatFormatError` at the first bad line.
    ``prompts_only``: generation input (see :func:`_messages_from_record`)."""
    try:
        handle = open(path, "r", encoding="utf-8")
    except OSError as error:
        raise ChatFormatError(f"{path}: cannot open ({error.strerror})") from None
    with handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ChatFormatError(f"{path}:{line_number}: invalid JSON ({error.msg} at "
                                      f"column {error.colno})") from None
            try:
                yield _messages_from_record(record, keys, prompts_only)
            except ValueError as error:
                raise ChatFormatError(f"{path}:{line_number}: {error}") from None


def read_conversations(path: str, keys: ChatKeys) -> List[List[Message]]:
    """Every conversation in ``path``; fails at the first malformed line (file:line)."""
    conversations = list(iter_conversations(path, keys))
    if not conversations:
        raise ChatFormatError(f"{path}: no conversations")
    return conversations
