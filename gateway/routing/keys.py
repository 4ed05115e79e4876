"""The keys that session and prefix routing hash: a session's name, a digest of a request's leading content."""

from __future__ import annotations

import hashlib
from typing import Any

PREFIX_CHARS = 8192  # the leading content that names a prefix: the system prompt and first user message


def user_key(user: object) -> bytes | None:
    """The OpenAI ``user`` field, when a request names one: the session key without a session header."""
    return user.encode("utf-8", "surrogatepass") if isinstance(user, str) and user else None


def prefix_key(obj: dict[str, Any]) -> bytes | None:
    """A digest of a request's leading content: for a chat its system messages and first user message (the
    same on every turn of a conversation), for a completion its prompt's start; PREFIX_CHARS at most."""
    messages = obj.get("messages")
    h = hashlib.blake2b(digest_size=16)
    left = PREFIX_CHARS
    if isinstance(messages, list):
        for m in messages:
            if not isinstance(m, dict):
                break
            left = _feed(h, m.get("content"), left)
            if m.get("role") not in ("system", "developer") or left <= 0:
                break
    else:
        prompt = obj.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], list | str):
            prompt = prompt[0]  # a batch: its first prompt
        left = _feed(h, prompt, left)
    return h.digest() if left < PREFIX_CHARS else None


def _feed(h: Any, content: object, left: int) -> int:
    """Hash up to ``left`` characters of a content: a string, a list of text parts or of token ids."""
    if isinstance(content, str):
        piece = content[:left]
        h.update(piece.encode("utf-8", "surrogatepass") + b"\0")
        return left - len(piece)
    if not isinstance(content, list):
        return left
    for part in content:
        if left <= 0:
            break
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            piece = part["text"][:left]
            h.update(piece.encode("utf-8", "surrogatepass") + b"\0")
            left -= len(piece)
        elif isinstance(part, int):
            h.update(b"%d," % part)
            left -= 1
    return left
