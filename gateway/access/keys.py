"""API keys: the keys file (TOML), keys known by their SHA-256 only, and its reload on SIGHUP or on change."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import secrets
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("gateway.access")

ANONYMOUS = "anonymous"
_LIMITS = ("max_concurrency", "requests_per_minute", "tokens_per_minute", "max_prompt_tokens")
_FIELDS = frozenset(("name", "sha256", "key", "models", "weight", "admin", *_LIMITS))


def digest(key: str) -> str:
    """The hex SHA-256 of a key: what the keys file holds and what a presented key is looked up by."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Key:
    """One tenant's key: its name (the label in logs and metrics) and its limits; 0 means no limit."""

    name: str
    sha256: str
    max_concurrency: int = 0
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    max_prompt_tokens: int = 0
    models: frozenset[str] = frozenset()  # empty: every model
    weight: float = 1.0
    admin: bool = False  # may read /status and /metrics

    @property
    def limited(self) -> bool:
        return bool(self.requests_per_minute or self.tokens_per_minute)

    def may_use(self, model: str) -> bool:
        return not self.models or model in self.models


def _entry(i: int, raw: Any) -> Key:
    """One ``[[key]]`` table, checked field by field; errors name the entry."""
    where = f"key #{i + 1}"
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: not a table")
    unknown = set(raw) - _FIELDS
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    name = raw.get("name")
    if not isinstance(name, str) or not name or len(name) > 64 or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"{where}: name must be 1-64 letters, digits, '-' or '_'")
    where = f"key {name!r}"
    if ("sha256" in raw) == ("key" in raw):
        raise ValueError(f"{where}: give exactly one of sha256 (recommended) or key")
    if "key" in raw:
        if not isinstance(raw["key"], str) or len(raw["key"]) < 16:
            raise ValueError(f"{where}: key must be a string of 16 characters or more")
        sha = digest(raw["key"])
    else:
        sha = raw["sha256"]
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha.lower()):
            raise ValueError(f"{where}: sha256 must be 64 hex digits")
        sha = sha.lower()
    limits = {}
    for field in _LIMITS:
        value = raw.get(field, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{where}: {field} must be an integer, 0 (no limit) or more")
        limits[field] = value
    models = raw.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        raise ValueError(f"{where}: models must be a list of model names")
    weight = raw.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"{where}: weight must be a number more than 0")
    admin = raw.get("admin", False)
    if not isinstance(admin, bool):
        raise ValueError(f"{where}: admin must be true or false")
    return Key(name, sha, **limits, models=frozenset(models), weight=float(weight), admin=admin)


def parse(text: str) -> dict[str, Key]:
    """A keys file's text -> keys by digest.  Raises ValueError naming what is wrong."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"not valid TOML: {exc}") from None
    if set(doc) - {"key"}:
        raise ValueError(f"unknown top-level entries: {', '.join(sorted(set(doc) - {'key'}))} (expected [[key]])")
    entries = doc.get("key", [])
    if not isinstance(entries, list) or not entries:
        raise ValueError("no [[key]] entries")
    keys = [_entry(i, raw) for i, raw in enumerate(entries)]
    return _index(keys)


def _index(keys: Iterable[Key]) -> dict[str, Key]:
    out: dict[str, Key] = {}
    names: set[str] = set()
    for key in keys:
        if key.name in names or key.name == ANONYMOUS:
            raise ValueError(f"key {key.name!r}: the name is used twice or reserved")
        if key.sha256 in out:
            raise ValueError(f"key {key.name!r}: the same key as {out[key.sha256].name!r}")
        names.add(key.name)
        out[key.sha256] = key
    return out


def plain_keys(keys: Iterable[str]) -> dict[str, Key]:
    """``--api-key`` values, as vLLM's flag: each may do everything, admin pages included."""
    return _index(Key(f"api-key-{i + 1}", digest(k), admin=True) for i, k in enumerate(keys))


def load(path: str) -> dict[str, Key]:
    with open(path, encoding="utf-8") as f:
        return parse(f.read())


def new_key() -> str:
    """A fresh random key in the style of OpenAI's."""
    return "sk-" + secrets.token_urlsafe(32)


def file_entry(name: str, key: str) -> str:
    """The lines to paste into the keys file for a new key: its digest, never the key."""
    return f'[[key]]\nname = "{name}"\nsha256 = "{digest(key)}"\n'


class KeyRing:
    """The keys in force: looked up by the digest of what the client presents; reloaded in place."""

    def __init__(self, keys: Mapping[str, Key], path: str = "") -> None:
        self.keys = dict(keys)
        self.path = path
        self.reload_failed = False  # the last reload of the file did not parse: the previous keys stay
        self.reloads = 0
        self._stamp = self._file_stamp()

    @classmethod
    def from_settings(cls, api_keys: list[str], keys_file: str) -> KeyRing | None:
        if keys_file:
            return cls(load(keys_file), keys_file)
        if api_keys:
            return cls(plain_keys(api_keys))
        return None

    def lookup(self, presented: str) -> Key | None:
        """The key whose digest matches: the secret itself is never compared, so no early exit leaks it."""
        return self.keys.get(digest(presented))

    def names(self) -> list[str]:
        return sorted(k.name for k in self.keys.values())

    def _file_stamp(self) -> tuple[int, int, int] | None:
        if not self.path:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def changed(self) -> bool:
        """Has the file changed on disk since it was last read?"""
        return bool(self.path) and self._file_stamp() != self._stamp

    def reload(self) -> bool:
        """Read the file again; one that does not parse keeps the previous keys.  True when new keys apply."""
        if not self.path:
            return False
        self._stamp = self._file_stamp()
        try:
            keys = load(self.path)
        except (OSError, ValueError) as exc:
            self.reload_failed = True
            log.error("keys file %s not reloaded, the previous %d keys stay: %s", self.path, len(self.keys), exc)
            return False
        self.keys = keys
        self.reload_failed = False
        self.reloads += 1
        log.info("keys file %s reloaded: %d keys", self.path, len(keys))
        return True
