"""Prompt-cache affinity: prefix keys over the stable part of a prompt, and a bounded, idle-expiring LRU."""

from __future__ import annotations

import msgspec
import orjson
import pytest

from proxy.affinity import MIN_PREFIX_BYTES, AffinityConfig, PrefixAffinity, prefix_key

SYSTEM = "You are a careful assistant for the Hedgerow docs. " * 40  # ≈ 2 KB: a cacheable prefix
TOOLS = [{"type": "function", "function": {"name": f"tool_{i}", "parameters": {"type": "object"}}} for i in range(3)]


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def chat(*messages: tuple[str, str], **extra: object) -> bytes:
    return orjson.dumps(
        {"model": "m", "messages": [{"role": r, "content": c} for r, c in messages], "temperature": 0.3, **extra}
    )


def test_same_prefix_with_a_different_last_user_message_gives_the_same_key():
    a = prefix_key(chat(("system", SYSTEM), ("user", "What is a hedge?")), 4096)
    b = prefix_key(chat(("system", SYSTEM), ("user", "How do I configure Redis?")), 4096)
    assert a is not None and len(a) == 16
    assert a == b


def test_a_different_system_prompt_gives_a_different_key():
    a = prefix_key(chat(("system", SYSTEM), ("user", "q")), 4096)
    b = prefix_key(chat(("system", SYSTEM + "Be brief."), ("user", "q")), 4096)
    assert a is not None and b is not None and a != b


def test_tools_are_part_of_the_prefix():
    plain = prefix_key(chat(("system", SYSTEM), ("user", "q")), 4096)
    with_tools = prefix_key(chat(("system", SYSTEM), ("user", "q"), tools=TOOLS), 4096)
    assert with_tools is not None and with_tools != plain


def test_turns_after_the_last_user_message_do_not_change_the_key():
    # a tool-calling loop: assistant tool call and tool result follow the user's question
    base = prefix_key(chat(("system", SYSTEM), ("user", "q")), 4096)
    loop = prefix_key(chat(("system", SYSTEM), ("user", "q"), ("assistant", "calling"), ("tool", "42")), 4096)
    assert base == loop


def test_short_prompts_have_no_key():
    assert prefix_key(chat(("system", "Be brief."), ("user", "hi")), 4096) is None
    just_under = "x" * (MIN_PREFIX_BYTES - 40)  # the raw message adds ~30 bytes of JSON around it
    assert prefix_key(chat(("system", just_under), ("user", "hi")), 4096) is None
    assert prefix_key(chat(("system", just_under + "x" * 20), ("user", "hi")), 4096) is not None


def test_a_single_message_has_no_key():
    assert prefix_key(chat(("user", SYSTEM)), 4096) is None


def test_only_the_first_prefix_bytes_count():
    # long conversations keep one key from turn to turn once the prefix exceeds the cap
    turn2 = prefix_key(chat(("system", SYSTEM * 3), ("user", "q1")), 4096)
    turn3 = prefix_key(chat(("system", SYSTEM * 3), ("user", "q1"), ("assistant", "a1"), ("user", "q2")), 4096)
    assert turn2 is not None and turn2 == turn3
    assert prefix_key(chat(("system", SYSTEM * 3), ("user", "q1")), 8192) != turn2


def test_bodies_that_are_not_chat_requests_have_no_key():
    assert prefix_key(b"not json", 4096) is None
    assert prefix_key(b'{"model": "m", "messages": "hello"}', 4096) is None
    assert prefix_key(b'{"model": "m", "prompt": "hello"}', 4096) is None


def test_prefix_bytes_below_the_cacheable_minimum_is_a_config_error():
    with pytest.raises(msgspec.ValidationError, match="prefix-bytes"):
        msgspec.convert({"prefix-bytes": 512}, AffinityConfig)
    assert msgspec.convert({"idle-s": 60, "max-entries": 5}, AffinityConfig).max_entries == 5


def test_get_returns_the_endpoint_that_served_the_prefix_last():
    aff = PrefixAffinity(AffinityConfig(), FakeClock())
    aff.put("m", b"k" * 16, "openai-east")
    assert aff.get("m", b"k" * 16) == "openai-east"
    aff.put("m", b"k" * 16, "openai-west")  # failover moved it: the new endpoint wins
    assert aff.get("m", b"k" * 16) == "openai-west"
    assert aff.get("other-model", b"k" * 16) is None
    assert len(aff) == 1


def test_least_recently_used_entry_is_evicted_at_max_entries():
    aff = PrefixAffinity(AffinityConfig(max_entries=2), FakeClock())
    aff.put("m", b"a", "e1")
    aff.put("m", b"b", "e2")
    assert aff.get("m", b"a") == "e1"  # a hit makes `a` the most recent
    aff.put("m", b"c", "e3")
    assert len(aff) == 2
    assert aff.get("m", b"b") is None
    assert aff.get("m", b"a") == "e1" and aff.get("m", b"c") == "e3"


def test_entries_expire_after_idle_s():
    clock = FakeClock()
    aff = PrefixAffinity(AffinityConfig(idle_s=300), clock)
    aff.put("m", b"a", "e1")
    clock.t += 300
    assert aff.get("m", b"a") == "e1"  # exactly idle-s: still warm
    clock.t += 0.001
    assert aff.get("m", b"a") is None
    assert len(aff) == 0  # the expired entry was dropped, not just hidden


def test_a_put_refreshes_the_idle_timer():
    clock = FakeClock()
    aff = PrefixAffinity(AffinityConfig(idle_s=300), clock)
    aff.put("m", b"a", "e1")
    clock.t += 200
    aff.put("m", b"a", "e1")
    clock.t += 200
    assert aff.get("m", b"a") == "e1"


def test_idle_entries_drain_away_as_new_ones_arrive():
    clock = FakeClock()
    aff = PrefixAffinity(AffinityConfig(idle_s=10), clock)
    for i in range(5):
        aff.put("m", bytes([i]), "e")
    clock.t += 11
    for i in range(5):
        aff.put("m", bytes([100 + i]), "e")
    assert len(aff) == 5  # each put dropped up to two idle ones; none of the old five is left


def test_disabled_affinity_remembers_nothing():
    aff = PrefixAffinity(AffinityConfig(enabled=False), FakeClock())
    aff.put("m", b"a", "e1")
    assert aff.get("m", b"a") is None and len(aff) == 0
