"""Prompt-cache affinity: send requests that share a prompt prefix to the endpoint that served the last one.

Why: OpenAI, Anthropic, DeepSeek and others cache prompt prefixes per account (and often per machine), which cuts
the price of cached input tokens by 50–90 % and the time to first token with it. Load balancing across
endpoints scatters requests with the same prefix and throws those hits away. So the router asks here first: if
the endpoint that served this prefix recently is still healthy, prefer it.

The prefix is what stays the same between requests of one application or conversation: the `tools` (rendered
first by providers) and the messages before the last user message (system prompt, earlier turns). It is hashed
from the raw JSON bytes, never decoded, and capped in length, so the cost per request is small and fixed.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Annotated

import msgspec

from proxy.structs import Base, PositiveFloat

# Providers cache only prompts of at least 1024 tokens (OpenAI, Anthropic; some models need more). A token
# covers at least one byte of text and the raw JSON is never shorter than its text, so a shared prefix under
# 1024 bytes cannot be a cache hit anywhere: sticking to an endpoint for it would only skew the load.
MIN_PREFIX_BYTES = 1024


class AffinityConfig(Base):
    enabled: bool = True
    max_entries: Annotated[int, msgspec.Meta(ge=1)] = 10_000  # LRU bound, ≈ 250 bytes per entry
    idle_s: PositiveFloat = 300.0  # provider caches typically expire after ~5 min without use
    # bytes of prefix hashed; at least MIN_PREFIX_BYTES so two requests stick only if they share a cacheable prefix
    prefix_bytes: Annotated[int, msgspec.Meta(ge=MIN_PREFIX_BYTES)] = 4096


class _Prefix(msgspec.Struct, gc=False):
    messages: list[msgspec.Raw] = msgspec.field(default_factory=list)  # each message stays bytes
    tools: msgspec.Raw = msgspec.Raw()  # empty Raw = absent


class _Role(msgspec.Struct, gc=False):
    role: str = ""  # the content is skipped by the decoder, not decoded


_decode_prefix = msgspec.json.Decoder(_Prefix).decode
_decode_role = msgspec.json.Decoder(_Role).decode


def _stable_end(messages: list[msgspec.Raw]) -> int:
    """Index of the last user message (the part that varies), or of the last message when no user spoke."""
    for i in range(len(messages) - 1, -1, -1):  # the last user message is nearly always the last message
        if _decode_role(messages[i]).role == "user":
            return i
    return len(messages) - 1


def prefix_key(body: bytes, prefix_bytes: int) -> bytes | None:
    """A 16-byte digest of a chat request's stable prompt prefix, or None when it has none worth sticking to.

    The digest covers `tools` then the messages before the last user message, at most `prefix_bytes` of them:
    two requests agreeing on their first `prefix_bytes` get the same key, so a long conversation keeps its key
    from turn to turn. A body that is not a chat request (or not JSON) has no key: affinity is only a hint.
    """
    if len(body) < MIN_PREFIX_BYTES:  # a prefix can't be longer than the body: skip the decode
        return None
    try:
        doc = _decode_prefix(body)
    except msgspec.DecodeError:  # ValidationError included
        return None
    messages = doc.messages
    if not messages:
        return None
    h = hashlib.blake2b(digest_size=16)
    total = len(doc.tools)
    budget = prefix_bytes
    if total:
        h.update(memoryview(doc.tools)[:budget])
        budget -= total
    for i in range(_stable_end(messages)):
        if budget <= 0 and total >= MIN_PREFIX_BYTES:
            break  # digest complete and the length threshold met: nothing further changes the result
        part = messages[i]
        total += len(part)
        if budget > 0:
            h.update(memoryview(part)[:budget])
            budget -= len(part)
    if total < MIN_PREFIX_BYTES:
        return None
    return h.digest()


class PrefixAffinity:
    """Bounded LRU of (model, prefix key) → the endpoint that served it last, forgotten after `idle-s`.

    Call `put` after every request an endpoint served (that use is what keeps the provider's cache warm);
    `get` only refreshes the LRU position. The caller decides whether the endpoint returned is still healthy.
    """

    __slots__ = ("_clock", "_enabled", "_entries", "_idle_s", "_max")

    def __init__(self, cfg: AffinityConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._enabled = cfg.enabled
        self._max = cfg.max_entries
        self._idle_s = cfg.idle_s
        self._clock = clock
        self._entries: OrderedDict[tuple[str, bytes], tuple[str, float]] = OrderedDict()

    def get(self, model: str, key: bytes) -> str | None:
        k = (model, key)
        entry = self._entries.get(k)
        if entry is None:
            return None
        if self._clock() - entry[1] > self._idle_s:
            del self._entries[k]  # the provider has dropped its cache by now; route on load alone
            return None
        self._entries.move_to_end(k)
        return entry[0]

    def put(self, model: str, key: bytes, endpoint_name: str) -> None:
        if not self._enabled:
            return
        entries = self._entries
        now = self._clock()
        k = (model, key)
        entries[k] = (endpoint_name, now)
        entries.move_to_end(k)
        if len(entries) > self._max:
            entries.popitem(last=False)
        # Drop up to two idle entries from the cold end: more than the one entry a put can add, so stale
        # entries drain away without a sweep, and the cost per call stays O(1).
        for _ in range(2):
            oldest = next(iter(entries.values()))
            if now - oldest[1] <= self._idle_s:
                break
            entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
