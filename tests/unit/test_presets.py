"""Presets (the OpenAI-compatible family as data), `require_parameters`, and Azure's addressing."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from adapters.azure import API_VERSION, AzureOpenAIAdapter
from adapters.openai import OpenAIAdapter
from adapters.presets import PRESETS, Preset
from proxy.config import BUILTIN_DEMO, Config, ConfigError, ProviderConfig, load, parse
from proxy.router import build_table
from proxy.upstream import Target
from tests.conftest import AUTH, KEY
from tests.fakes import FakeUpstream

BASE = """
keys: [{name: k, key: sk-gw-0123456789}]
providers:
  - {name: groq, preset: groq}
models:
  - name: meta-llama/llama-3.3-70b-instruct
    endpoints: [{provider: groq, model: llama-3.3-70b-versatile}]
"""


def test_preset_provider_needs_no_base_url_and_takes_its_key_from_the_preset_variable():
    cfg = parse(BASE, "yaml", env={"GROQ_API_KEY": "gsk-123"})
    p = cfg.providers[0]
    assert p.base_url == "https://api.groq.com/openai/v1"
    assert p.api_key == "gsk-123" and p.requires_env == "GROQ_API_KEY"
    target = OpenAIAdapter(p, "https://api.groq.com/openai/v1").target("chat")
    assert target is not None and target.headers["Authorization"] == "Bearer gsk-123"


def test_preset_provider_is_switched_off_without_its_key():
    cfg = parse(BASE, "yaml", env={})
    assert cfg.providers == [] and cfg.models == []  # and its models, left without endpoints, with it


def test_written_values_win_over_the_preset():
    text = BASE.replace(
        "{name: groq, preset: groq}",
        '{name: groq, preset: groq, base-url: "http://127.0.0.1:9/v1", api-key: "${MY_GROQ}"}',
    )
    cfg = parse(text, "yaml", env={"MY_GROQ": "gsk-mine"})  # GROQ_API_KEY unset: a written key is not gated on it
    p = cfg.providers[0]
    assert (p.base_url, p.api_key, p.requires_env) == ("http://127.0.0.1:9/v1", "gsk-mine", None)


def test_self_hosted_preset_is_on_without_any_key():
    text = BASE.replace("{name: groq, preset: groq}", "{name: groq, preset: vllm}")
    p = parse(text, "yaml", env={}).providers[0]
    assert (p.base_url, p.api_key, p.requires_env) == ("http://127.0.0.1:8000/v1", None, None)


def test_toml_takes_presets_too():
    text = """
[[keys]]
name = "k"
key = "sk-gw-0123456789"
[[providers]]
name = "local"
preset = "ollama"
"""
    assert parse(text, "toml", env={}).providers[0].base_url == "http://127.0.0.1:11434/v1"


def test_unknown_preset_and_a_provider_with_neither_are_reported_with_their_paths():
    text = """
keys: [{name: k, key: sk-gw-0123456789}]
providers:
  - {name: a, preset: groqq}
  - {name: b}
  - {name: c, adapter: azure, preset: groq}
"""
    with pytest.raises(ConfigError) as e:
        parse(text, "yaml", env={"GROQ_API_KEY": "x"})
    problems = e.value.problems
    known = ", ".join(sorted(PRESETS))
    assert f"unknown preset `groqq` (known: {known}) - at `$.providers[0].preset`" in problems
    assert "give `base-url` or a `preset` - at `$.providers[1]`" in problems
    assert any("presets are for the openai adapter" in p and "`$.providers[2].preset`" in p for p in problems)
    assert len(problems) == 3


@pytest.mark.parametrize("preset", ["groq", "mistral", "deepseek", "together", "openrouter"])
def test_embedded_default_switches_a_preset_provider_on_with_its_key(preset: str):
    env_var = PRESETS[preset].api_key_env
    assert env_var is not None
    cfg = load(env={env_var: "sk-x"})
    assert [p.name for p in cfg.providers] == ["demo", preset]
    served = [m.name for m in cfg.models if any(e.provider == preset for e in m.endpoints)]
    table = build_table(cfg, {BUILTIN_DEMO: "http://127.0.0.1:1"}, time.monotonic)
    # every endpoint it serves is priced, by the bundled catalog (the default config writes no prices)
    assert served and all(e.price.input > 0 for m in served for e in table.models[m].endpoints)


def test_every_preset_is_well_formed():
    for name, p in PRESETS.items():
        assert p.base_url.startswith("https://" if p.api_key_env else "http://127.0.0.1:"), name
        assert not p.base_url.endswith("/"), name
        assert p.docs.startswith("https://"), name


def _adapter(preset: str | None, **extra: Any) -> OpenAIAdapter:
    p = ProviderConfig(name="p", base_url="http://127.0.0.1:9/v1", preset=preset, api_key="k", **extra)
    return OpenAIAdapter(p, "http://127.0.0.1:9/v1")


def test_unsupported_parameters_are_dropped_only_when_present():
    a = _adapter("groq")
    plain = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
    assert a.request_body(plain, "m", "m", False) is plain  # zero-copy
    used = b'{"model":"m","logit_bias":{"42":-100},"messages":[{"role":"user","content":"hi"}],"logprobs":true}'
    assert orjson.loads(a.request_body(used, "m", "m", False)) == orjson.loads(plain)
    # A parameter's name as a string value passes the byte pre-check; the rewrite then drops nothing.
    mention = b'{"model":"m","messages":[{"role":"user","content":"logit_bias"}]}'
    assert orjson.loads(a.request_body(mention, "m", "m", False)) == orjson.loads(mention)
    assert _adapter(None).request_body(used, "m", "m", False) is used  # no preset: nothing is dropped


def test_a_preset_may_name_its_own_auth_header(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(PRESETS, "keyed", Preset(base_url="https://x.test/v1", auth_header="x-api-key"))
    target = _adapter("keyed").target("chat")
    assert target is not None
    assert target.headers["x-api-key"] == "k" and "Authorization" not in target.headers


def _azure(base_url: str, **extra: Any) -> AzureOpenAIAdapter:
    return AzureOpenAIAdapter(ProviderConfig(name="az", adapter="azure", base_url=base_url, **extra), base_url)


def _target(a: AzureOpenAIAdapter, kind: str, model: str, stream: bool = False) -> Target:
    t = a.target(kind, model, stream)
    assert t is not None
    return t


def test_azure_builds_deployment_urls_with_its_api_key_header():
    a = _azure("https://res.openai.azure.com/", api_key="az-key")
    chat = _target(a, "chat", "gpt4o-prod", True)
    root = "https://res.openai.azure.com/openai/deployments"
    assert chat.url == f"{root}/gpt4o-prod/chat/completions?api-version={API_VERSION}" and chat.method == "POST"
    assert chat.headers["api-key"] == "az-key" and "Authorization" not in chat.headers
    assert a.target("chat", "gpt4o-prod", False) is chat  # built once, kept (the client keys heads by Target)
    assert _target(a, "embeddings", "embed-prod").url == f"{root}/embed-prod/embeddings?api-version={API_VERSION}"
    models = _target(a, "models", "gpt4o-prod")
    assert models is a.target("models", "other") and models.method == "GET"
    assert a.target("images", "x") is None


def test_azure_takes_the_api_version_from_the_base_url():
    a = _azure("https://res.openai.azure.com/openai?api-version=2025-04-01-preview")
    assert _target(a, "chat", "d").url == (
        "https://res.openai.azure.com/openai/deployments/d/chat/completions?api-version=2025-04-01-preview"
    )


def test_azure_v1_route_uses_plain_openai_paths_and_the_model_in_the_body():
    a = _azure("https://res.openai.azure.com/openai/v1", api_key="az-key")
    assert _target(a, "chat", "d").url == "https://res.openai.azure.com/openai/v1/chat/completions"
    assert a.target("chat", "d") is a.target("chat", "e")
    body = b'{"model":"openai/gpt-4o","messages":[]}'
    assert orjson.loads(a.request_body(body, "openai/gpt-4o", "gpt4o-prod", False))["model"] == "gpt4o-prod"
    same = b'{"model":"d","messages":[]}'
    assert a.request_body(same, "d", "d", False) is same


def test_azure_deployment_body_is_zero_copy_even_when_the_model_name_differs():
    a = _azure("https://res.openai.azure.com")
    body = b'{"model":"openai/gpt-4o","messages":[{"role":"user","content":"hi"}]}'
    assert a.request_body(body, "openai/gpt-4o", "gpt4o-prod", False) is body
    routed = b'{"model":"openai/gpt-4o","provider":{"only":["az"]},"messages":[]}'
    assert orjson.loads(a.request_body(routed, "openai/gpt-4o", "gpt4o-prod", True)) == {
        "model": "openai/gpt-4o",
        "messages": [],
    }


def _config(providers: list[dict[str, Any]], models: dict[str, list[tuple[str, str]]], env: dict[str, str]) -> Config:
    quick = {"connect-s": 1.0, "first-byte-s": 2.0, "idle-s": 2.0, "total-s": 10.0}
    tree = {
        "server": {"host": "127.0.0.1", "port": 0, "drain-grace-s": 5.0},
        "keys": [{"name": "test", "key": KEY}],
        "providers": [{"timeouts": quick, "probe": {"enabled": False}, **p} for p in providers],
        "models": [
            {"name": name, "endpoints": [{"provider": p, "model": m} for p, m in eps]} for name, eps in models.items()
        ],
    }
    return parse(yaml.safe_dump(tree), "yaml", env=env)


async def test_gateway_drops_a_preset_providers_unsupported_params_and_sends_its_key(
    gateway: Any, http: aiohttp.ClientSession, fake_upstream: FakeUpstream
):
    cfg = _config(
        [{"name": "groq", "preset": "groq", "base-url": fake_upstream.base_url}],
        {"llama": [("groq", "llama")]},
        env={"GROQ_API_KEY": "gsk-from-env"},
    )
    gw = await gateway(cfg)
    plain = orjson.dumps({"model": "llama", "messages": [{"role": "user", "content": "hi"}]})
    used = orjson.dumps({"model": "llama", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"1": 2}})
    for body in (used, plain):
        async with http.post(f"{gw.v1}/chat/completions", data=body, headers=AUTH) as r:
            assert r.status == 200
    first, second = fake_upstream.requests
    assert orjson.loads(first.body) == orjson.loads(plain)  # logit_bias dropped, nothing else touched
    assert second.body == plain  # absent: the client's bytes, unchanged
    assert first.headers["Authorization"] == "Bearer gsk-from-env"


async def _two_providers(gateway: Any, aiohttp_server: Any) -> tuple[Any, FakeUpstream, FakeUpstream]:
    fakes = []
    for _ in range(2):
        fake = FakeUpstream()
        fake.base_url = str((await aiohttp_server(fake.app)).make_url("/v1"))
        fakes.append(fake)
    groq, plain = fakes
    cfg = _config(
        [
            {"name": "groq", "preset": "groq", "base-url": groq.base_url},
            {"name": "plain", "base-url": plain.base_url, "api-key": "sk-plain"},
        ],
        {"m": [("groq", "m"), ("plain", "m")]},
        env={"GROQ_API_KEY": "gsk-x"},
    )
    return await gateway(cfg), groq, plain


def _chat(provider: dict[str, Any]) -> bytes:
    messages = [{"role": "user", "content": "hi"}]
    return orjson.dumps({"model": "m", "messages": messages, "logit_bias": {"1": 2}, "provider": provider})


async def test_require_parameters_skips_endpoints_that_would_drop_a_used_parameter(
    gateway: Any, http: aiohttp.ClientSession, aiohttp_server: Any
):
    gw, groq, plain = await _two_providers(gateway, aiohttp_server)
    url = f"{gw.v1}/chat/completions"
    async with http.post(url, data=_chat({"order": ["groq", "plain"], "require_parameters": True}), headers=AUTH) as r:
        assert r.status == 200 and r.headers["X-Hedgerow-Provider"] == "plain"
    assert len(groq.requests) == 0 and b'"logit_bias"' in plain.requests[0].body
    async with http.post(url, data=_chat({"order": ["groq", "plain"]}), headers=AUTH) as r:
        assert r.status == 200 and r.headers["X-Hedgerow-Provider"] == "groq"  # not required: dropped instead
    assert b'"logit_bias"' not in groq.requests[0].body


async def test_require_parameters_with_no_supporting_endpoint_is_a_400_naming_the_parameter(
    gateway: Any, http: aiohttp.ClientSession, aiohttp_server: Any
):
    gw, groq, plain = await _two_providers(gateway, aiohttp_server)
    body = _chat({"only": ["groq"], "require_parameters": True})
    async with http.post(f"{gw.v1}/chat/completions", data=body, headers=AUTH) as r:
        assert r.status == 400
        err = (await r.json())["error"]
    assert err["param"] == "logit_bias" and "`logit_bias`" in err["message"]
    assert groq.requests == [] and plain.requests == []


async def test_azure_through_the_gateway_addresses_the_deployment_and_forwards_the_clients_bytes(
    gateway: Any, http: aiohttp.ClientSession, fake_upstream: FakeUpstream
):
    root = fake_upstream.base_url.removesuffix("/v1")
    cfg = _config(
        [{"name": "az", "adapter": "azure", "base-url": root, "api-key": "az-key"}],
        {"openai/gpt-4o": [("az", "gpt4o-prod")]},
        env={},
    )
    gw = await gateway(cfg)
    body = orjson.dumps({"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    async with http.post(f"{gw.v1}/chat/completions", data=body, headers=AUTH) as r:
        assert r.status == 200
    seen = fake_upstream.requests[0]
    assert seen.path == "/openai/deployments/gpt4o-prod/chat/completions"
    assert seen.headers["api-key"] == "az-key" and "Authorization" not in seen.headers
    assert seen.body == body  # zero-copy: Azure reads the deployment from the URL
