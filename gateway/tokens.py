"""Prompt-token estimate: a fast lower bound of what GLM-4's tokenizer counts, without the tokenizer.

The estimate assumes a token holds at most 4 ASCII characters or 2 other characters (CJK text:
about 2 characters per token on GLM-4's 151,552-token vocabulary), that spaces, tabs and newlines ride
along with their neighbours for free (BPE merges indentation runs into a token or two), plus 2
template tokens per chat message.  Real BPE tokens are usually shorter than that, so the estimate
is at or below the engine's count for natural text and code, and the gateway does not reject what
the engine would accept.  The margin by which it can overshoot: very long common words and long
repeated character runs that the vocabulary holds as single tokens (e.g. "=========").  A prompt
sent as token ids is counted exactly.
"""

from __future__ import annotations

from typing import Any

TOKENS_PER_MESSAGE = 2  # GLM-4 template: a role token and a newline around each message


def text_tokens(text: str) -> int:
    """Estimated tokens of one string: characters / 4 for ASCII, / 2 for the rest; whitespace is free."""
    chars = len(text)
    blank = text.count(" ") + text.count("\n") + text.count("\t")
    if text.isascii():
        return (chars - blank) // 4
    # every non-ASCII character takes 2 to 4 bytes in UTF-8; CJK takes 3
    other = min(chars, (_utf8_length(text) - chars + 1) // 2)
    return max(0, chars - other - blank) // 4 + other // 2


def _utf8_length(text: str, step: int = 1 << 16) -> int:
    """Bytes of text in UTF-8, encoded a slice at a time so a 6 MB prompt is not copied whole."""
    return sum(len(text[i : i + step].encode("utf-8", "surrogatepass")) for i in range(0, len(text), step))


def content_tokens(content: Any) -> int:
    """Tokens of a chat message's content: a string, or a list of parts of which text counts."""
    if isinstance(content, str):
        return text_tokens(content)
    total = 0
    if isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                total += text_tokens(part["text"])
    return total


def messages_tokens(messages: list[dict[str, Any]]) -> int:
    return sum(content_tokens(m.get("content")) + TOKENS_PER_MESSAGE for m in messages)


def prompt_tokens(prompt: Any) -> int | None:
    """Tokens of a completions prompt: a string, token ids, or a batch of strings or of token-id lists (the
    largest counts); None for any other shape.  Flat loops: no recursion that nesting could deepen."""
    if isinstance(prompt, str):
        return text_tokens(prompt)
    if not isinstance(prompt, list):
        return None
    if not prompt:
        return 0
    if all(_is_id(i) for i in prompt):
        return len(prompt)
    if all(isinstance(p, str) for p in prompt):
        return max(text_tokens(p) for p in prompt)
    if all(isinstance(p, list) and all(_is_id(i) for i in p) for p in prompt):
        return max(len(p) for p in prompt)
    return None


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
