"""The model catalog: the bundled data, an operator's catalog merged on top, prices resolved for the config's
endpoints, and GET /v1/models in OpenAI's and OpenRouter's shape."""

from __future__ import annotations

import datetime
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import orjson
import pytest

from adapters.presets import PRESETS
from proxy.accounting.catalog import (
    default_catalog,
    load_catalog,
    per_token,
    price_for,
    pricing_fields,
)
from proxy.config import Config, ConfigError, Price, parse
from proxy.router import build_table
from tests.conftest import AUTH, gateway_config
from tests.fakes import FakeUpstream

# (public name, family, upstream model): what the catalog must cover.
COVERED = [
    ("openai/gpt-4o", "openai", "gpt-4o"),
    ("openai/gpt-4o-mini", "openai", "gpt-4o-mini"),
    ("openai/gpt-4.1", "openai", "gpt-4.1"),
    ("openai/gpt-4.1-mini", "openai", "gpt-4.1-mini"),
    ("openai/gpt-4.1-nano", "openai", "gpt-4.1-nano"),
    ("openai/o3", "openai", "o3"),
    ("openai/o4-mini", "openai", "o4-mini"),
    ("openai/text-embedding-3-small", "openai", "text-embedding-3-small"),
    ("openai/text-embedding-3-large", "openai", "text-embedding-3-large"),
    ("anthropic/claude-sonnet-4", "anthropic", "claude-sonnet-4-20250514"),
    ("anthropic/claude-opus-4", "anthropic", "claude-opus-4-20250514"),
    ("anthropic/claude-3.5-haiku", "anthropic", "claude-3-5-haiku-20241022"),
    ("google/gemini-2.5-pro", "gemini", "gemini-2.5-pro"),
    ("google/gemini-2.5-flash", "gemini", "gemini-2.5-flash"),
    ("google/gemini-2.0-flash-001", "gemini", "gemini-2.0-flash"),
    ("meta-llama/llama-3.3-70b-instruct", "groq", "llama-3.3-70b-versatile"),
    ("meta-llama/llama-3.3-70b-instruct", "together", "meta-llama/Llama-3.3-70B-Instruct-Turbo"),
    ("deepseek/deepseek-chat", "deepseek", "deepseek-chat"),
    ("deepseek/deepseek-reasoner", "deepseek", "deepseek-reasoner"),
    ("mistralai/mistral-large", "mistral", "mistral-large-latest"),
    ("mistralai/mistral-small", "mistral", "mistral-small-latest"),
]
ADAPTER_FAMILIES = {"openai", "anthropic", "gemini", "azure", "bedrock"}


def test_the_bundled_catalog_loads_and_every_family_says_where_and_when_its_prices_are_from():
    cat = default_catalog()
    assert len(cat.models) >= 20
    families = {e.provider for m in cat.models.values() for e in m.endpoints}
    assert families <= set(cat.providers), "every endpoint's family has a provider entry"
    for name, p in cat.providers.items():
        assert name in PRESETS or name in ADAPTER_FAMILIES, name
        assert isinstance(p.as_of, datetime.date) and p.as_of <= datetime.date.today()
        assert re.match(r"https://[a-z0-9.-]+\.[a-z]+/", p.source), p.source
    for m in cat.models.values():
        assert m.endpoints and m.context_length, m.name
        assert len({(e.provider, e.model) for e in m.endpoints}) == len(m.endpoints), m.name
        for e in m.endpoints:
            assert e.price.input > 0, (m.name, e.provider)
            assert not m.name.startswith(("openai/", "anthropic/", "google/")) or "embed" in m.name or e.price.output


@pytest.mark.parametrize(("name", "family", "upstream"), COVERED)
def test_the_popular_models_are_covered(name: str, family: str, upstream: str):
    model = default_catalog().model(name)
    assert model is not None and model.display_name and model.context_length
    assert any(e.provider == family and e.model == upstream for e in model.endpoints)
    assert price_for(family, upstream) is not None


def test_prices_are_found_by_name_or_alias_and_cache_semantics_are_kept():
    assert price_for("openai", "gpt-4o-mini") == Price(input=0.15, output=0.60, cache_read=0.075)
    assert price_for("openai", "gpt-4o-mini-2024-07-18") == price_for("openai", "gpt-4o-mini")
    sonnet = price_for("anthropic", "claude-sonnet-4-0")
    assert sonnet == Price(input=3, output=15, cache_read=0.30, cache_write=3.75)
    assert price_for("bedrock", "us.anthropic.claude-sonnet-4-20250514-v1:0") == sonnet
    assert price_for("deepseek", "deepseek-chat") == Price(input=0.28, output=0.42, cache_read=0.028)
    assert price_for("openai", "llama-3.3-70b-versatile") is None  # a family serves only its own
    assert price_for("nowhere", "gpt-4o") is None


def test_an_operator_catalog_overrides_and_extends(tmp_path: Path):
    extra = tmp_path / "prices.yaml"
    extra.write_text(
        """
providers:
  vllm: {as-of: 2026-01-02, source: "https://example.com/our-costs"}
models:
  - name: openai/gpt-4o-mini
    context-length: 64000
    endpoints:
      - {provider: openai, model: gpt-4o-mini, price: {input: 0.1, output: 0.5}}   # replaces
      - {provider: vllm, model: gpt-4o-mini-local, price: {input: 0.01, output: 0.02}}  # extends
  - name: acme/widget
    display-name: "Acme: Widget"
    context-length: 4096
    endpoints: [{provider: vllm, model: widget, price: {input: 1, request: 0.002}}]
"""
    )
    cat = load_catalog(str(extra))
    assert cat.price_for("openai", "gpt-4o-mini") == Price(input=0.1, output=0.5)
    assert cat.price_for("openai", "gpt-4o-mini-2024-07-18") is None  # the replacement names no aliases
    assert cat.price_for("vllm", "gpt-4o-mini-local") == Price(input=0.01, output=0.02)
    mini = cat.model("openai/gpt-4o-mini")
    assert mini is not None and mini.context_length == 64000 and mini.max_output == 16384  # given / kept
    assert [e.provider for e in mini.endpoints] == ["openai", "azure", "openrouter", "vllm"]
    assert cat.price_for("vllm", "widget") == Price(input=1, request=0.002)
    assert cat.providers["vllm"].source == "https://example.com/our-costs" and "openai" in cat.providers
    assert default_catalog().price_for("openai", "gpt-4o-mini") == Price(input=0.15, output=0.60, cache_read=0.075)
    toml = tmp_path / "prices.toml"
    toml.write_text(
        '[[models]]\nname = "x/y"\nendpoints = [{ provider = "groq", model = "y", price = { input = 2 } }]\n'
    )
    assert load_catalog(str(toml)).price_for("groq", "y") == Price(input=2)


def test_every_problem_in_an_operator_catalog_is_reported_with_its_path(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        """
colour: blue
providers:
  groq: {as-of: yesterday, source: "https://groq.com/pricing"}
models:
  - {name: a/b, endpoints: [{provider: groq, model: b, price: {input: -1}}]}
  - {name: a/c, context-length: 0, endpoints: []}
  - {name: a/d, endpoints: [{provider: groq, model: d, price: {inptu: 1}}]}
"""
    )
    with pytest.raises(ConfigError) as e:
        load_catalog(str(bad))
    problems = e.value.problems
    assert all(p.startswith(f"{bad}: ") for p in problems)
    assert any("unknown field `colour` - at `$`" in p for p in problems)
    assert any("at `$.providers.groq.as-of`" in p for p in problems)
    assert any("at `$.models[0].endpoints[0].price.input`" in p for p in problems)
    assert any("at `$.models[1].context-length`" in p for p in problems)
    assert any("unknown field `inptu` - at `$.models[2].endpoints[0].price`" in p for p in problems)
    with pytest.raises(ConfigError, match="cannot read"):
        load_catalog(str(tmp_path / "missing.yaml"))


CONFIG = """
keys: [{name: k, key: sk-gw-0123456789}]
providers:
  - {name: oa, preset: openai, base-url: "http://127.0.0.1:1/v1", api-key: x}
  - {name: gq, preset: groq, base-url: "http://127.0.0.1:2/v1", api-key: x}
  - {name: claude, adapter: anthropic, base-url: "http://127.0.0.1:3", api-key: x}
  - {name: local, base-url: "http://127.0.0.1:4/v1"}
models:
  - name: openai/gpt-4o-mini
    endpoints:
      - {provider: oa, model: gpt-4o-mini}
  - name: my/llama
    endpoints:
      - {provider: gq, model: llama-3.3-70b-versatile}
  - name: anthropic/claude-sonnet-4
    context-length: 100000
    endpoints:
      - {provider: claude, model: claude-sonnet-4-20250514, price: {input: 1, output: 2, cache-read: 0.5, request: 0.1}}
  - name: local/thing
    endpoints: [{provider: local, model: thing}]
"""


def _table(cfg: Config) -> Any:
    return build_table(cfg, {}, time.monotonic)


def test_config_without_a_price_takes_the_catalogs_and_a_written_price_wins():
    table = _table(parse(CONFIG, "yaml", env={}))
    mini = table.route("openai/gpt-4o-mini")
    assert mini.endpoints[0].price == Price(input=0.15, output=0.60, cache_read=0.075)  # the openai preset
    llama = table.route("my/llama")
    assert llama.endpoints[0].price == Price(input=0.59, output=0.79)  # found by the provider's preset
    sonnet = table.route("anthropic/claude-sonnet-4")
    assert sonnet.endpoints[0].price == Price(input=1, output=2, cache_read=0.5, request=0.1)  # written
    assert table.route("local/thing").endpoints[0].price == Price()  # unknown to the catalog: zero


def test_context_length_and_max_output_come_from_the_config_else_the_catalog():
    table = _table(parse(CONFIG, "yaml", env={}))
    mini = table.route("openai/gpt-4o-mini")
    assert (mini.context_length, mini.max_output) == (128000, 16384)
    assert mini.catalog is not None and mini.catalog.display_name == "OpenAI: GPT-4o-mini"
    llama = table.route("my/llama")  # a name of the operator's own: found through its endpoint
    assert (llama.context_length, llama.max_output) == (131072, 32768)  # Groq's narrower max output
    sonnet = table.route("anthropic/claude-sonnet-4")
    assert (sonnet.context_length, sonnet.max_output) == (100000, 64000)  # the config's context length
    thing = table.route("local/thing")
    assert (thing.context_length, thing.max_output, thing.catalog) == (None, None, None)


def test_a_table_built_with_an_operator_catalog_uses_it(tmp_path: Path):
    extra = tmp_path / "c.yaml"
    # `local` is an openai-adapter server of the operator's: its catalog family is its own name
    extra.write_text("models: [{name: local/thing, endpoints: [{provider: local, model: thing, price: {input: 9}}]}]")
    table = build_table(parse(CONFIG, "yaml", env={}), {}, time.monotonic, load_catalog(str(extra)))
    assert table.route("local/thing").endpoints[0].price == Price(input=9)


def test_new_price_and_model_fields_are_checked_with_their_paths():
    text = CONFIG.replace(
        "{provider: oa, model: gpt-4o-mini}", "{provider: oa, model: gpt-4o-mini, price: {cache-read: -0.5}}"
    ).replace("context-length: 100000", "context-length: 0")
    with pytest.raises(ConfigError) as e:
        parse(text, "yaml", env={})
    problems = "\n".join(e.value.problems)
    assert "at `$.models[0].endpoints[0].price.cache-read`" in problems
    assert "at `$.models[2].context-length`" in problems
    ok = parse(
        CONFIG.replace("{input: 1, output: 2,", "{input: 1, output: 2, reasoning: 7, cache-write: 3,"), "yaml", {}
    )
    price = ok.models[2].endpoints[0].price
    assert price is not None and (price.reasoning, price.cache_write) == (7, 3)
    assert ok.models[0].endpoints[0].price is None  # absent: resolved from the catalog by the router


def test_per_token_prices_are_decimal_strings():
    assert per_token(0.15) == "0.00000015"
    assert per_token(2.5) == "0.0000025"
    assert per_token(10.0) == "0.00001"
    assert per_token(0.075) == "0.000000075"
    assert per_token(0) == "0"
    assert pricing_fields(Price(input=3, output=15, cache_read=0.3, request=0.002)) == {
        "prompt": "0.000003",
        "completion": "0.000015",
        "request": "0.002",
        "input_cache_read": "0.0000003",
        "input_cache_write": "0.000003",  # not priced apart: as input
        "internal_reasoning": "0.000015",  # likewise: as output
    }


async def test_models_list_has_openai_and_openrouter_fields(
    fake_upstream: FakeUpstream, gateway: Any, http: aiohttp.ClientSession
):
    cfg = gateway_config(
        {"a": fake_upstream.base_url, "b": fake_upstream.base_url},
        models={
            "openai/gpt-4o-mini": [("a", "gpt-4o-mini"), ("b", "gpt-4o-mini", {"input": 9, "output": 9})],
            "test/unknown": [("b", "no-such-model", {"input": 1.5, "output": 2})],
        },
    )
    a = msgspec.structs.replace(cfg.providers[0], preset="openai")  # OpenAI's prices, served on loopback
    cfg = msgspec.structs.replace(cfg, providers=[a, *cfg.providers[1:]])
    gw = await gateway(cfg)
    async with http.get(gw.v1 + "/models", headers=AUTH) as r:
        assert r.status == 200 and r.content_type == "application/json"
        doc = orjson.loads(await r.read())
    assert doc["object"] == "list"
    mini, unknown = doc["data"]
    assert mini == {
        "id": "openai/gpt-4o-mini",
        "object": "model",
        "created": 0,
        "owned_by": "a",
        "name": "OpenAI: GPT-4o-mini",
        "context_length": 128000,
        "pricing": {  # the first endpoint's: the catalog's price for the `openai` family
            "prompt": "0.00000015",
            "completion": "0.0000006",
            "request": "0",
            "input_cache_read": "0.000000075",
            "input_cache_write": "0.00000015",
            "internal_reasoning": "0.0000006",
        },
        "top_provider": {"context_length": 128000, "max_completion_tokens": 16384, "is_moderated": False},
        "supported_parameters": default_catalog().models["openai/gpt-4o-mini"].supported_parameters,
    }
    assert "tools" in mini["supported_parameters"]
    assert unknown["name"] == "test/unknown" and unknown["context_length"] is None
    assert unknown["pricing"]["prompt"] == "0.0000015" and unknown["pricing"]["completion"] == "0.000002"
    assert unknown["top_provider"] == {"context_length": None, "max_completion_tokens": None, "is_moderated": False}
    assert unknown["supported_parameters"] == []


def test_the_config_names_an_operator_catalog_and_check_config_reads_it(tmp_path: Path):
    extra = tmp_path / "prices.yaml"
    extra.write_text("models: [{name: local/thing, endpoints: [{provider: local, model: thing, price: {input: 4}}]}]")
    text = CONFIG + f"accounting: {{catalog: {extra}}}\n"
    assert _table(parse(text, "yaml", env={})).route("local/thing").endpoints[0].price == Price(input=4)
    extra.write_text("models: [{name: local/thing, endpoints: [{provider: local, model: thing, price: {input: -4}}]}]")
    with pytest.raises(ConfigError) as e:
        parse(text, "yaml", env={})
    assert any("price.input" in p and "$.accounting.catalog" in p for p in e.value.problems)
