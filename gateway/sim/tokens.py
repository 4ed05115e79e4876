"""The simulated engine's stand-in tokenizer and its prefix cache (repeated leading prompt blocks are hits)."""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from gateway.sim.generations import BLOCK_SIZE

# A stand-in tokenizer with BPE's shape: up to 4 ASCII letters, one digit or symbol, or up to 2 other
# characters per token, whitespace folded into the next token.  GLM-4's chat template adds 2 tokens
# per message and 3 around the conversation ([gMASK]<sop> ... <|assistant|>).
_TOKEN = re.compile(r"[A-Za-z]{1,4}|[0-9]|[^\x00-\x7f]{1,2}|[^\sA-Za-z0-9\x80-\U0010ffff]")


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text)


def _content(message: Any) -> str:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def chat_tokens(messages: Sequence[Any]) -> list[str]:
    """The prompt GLM-4's chat template makes of ``messages``, as tokens."""
    out = ["[gMASK]", "<sop>"]
    for m in messages:
        role = m.get("role", "user") if isinstance(m, dict) else "user"
        out += [f"<|{role}|>", "\n", *tokenize(_content(m))]
    out.append("<|assistant|>")
    return out


def prompt_tokens(chat: bool, body: dict[str, Any]) -> tuple[list[Any], bool]:
    """The request's prompt as tokens, and whether it was text (token ids are taken as they are)."""
    if chat:
        return chat_tokens(body.get("messages") or []), True
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):
        return list(prompt), False
    return tokenize(prompt if isinstance(prompt, str) else str(prompt)), True


class PrefixCache:
    """Full blocks of ``BLOCK_SIZE`` tokens, keyed by the hash of everything up to and including them (as vLLM's
    prefix caching): a prompt's leading blocks seen before are cached tokens. Least recently used blocks go
    first once ``capacity`` blocks are held."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def lookup_and_store(self, tokens: Sequence[Any]) -> int:
        """The number of leading tokens already cached; every full block of ``tokens`` is cached afterwards."""
        key, cached, hitting = 0, 0, True
        for start in range(0, len(tokens) - BLOCK_SIZE + 1, BLOCK_SIZE):
            key = hash((key, *tokens[start : start + BLOCK_SIZE]))
            if hitting and key in self.blocks:
                cached += BLOCK_SIZE
                self.blocks.move_to_end(key)
                continue
            hitting = False
            self.blocks[key] = None
            if len(self.blocks) > self.capacity:
                self.blocks.popitem(last=False)
        # as vLLM, the last prompt token is always computed: a fully cached prompt recomputes its last block
        return max(0, min(cached, (len(tokens) - 1) // BLOCK_SIZE * BLOCK_SIZE))

    def clear(self) -> None:
        self.blocks.clear()
