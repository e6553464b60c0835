"""Config: strict decoding, every problem reported with its path, env expansion, provider auto-enable."""

from __future__ import annotations

import subprocess
import sys

import pytest

from proxy.config import ConfigError, key_hash, load, parse, with_server

GOOD = """
server: {host: 127.0.0.1, port: 9000}
keys: [{name: k, key: "${GW_KEY}"}]
providers:
  - {name: up, base-url: "http://127.0.0.1:1/v1", api-key: "${UP_KEY}", timeouts: {connect-s: 2}}
models:
  - name: up/m
    endpoints: [{provider: up, model: m, price: {input: 1.5, output: 2}}]
"""


def test_yaml_decodes_into_structs_with_env_expansion():
    cfg = parse(GOOD, "yaml", env={"GW_KEY": "sk-gw-0123456789", "UP_KEY": "sk-up"})
    assert cfg.server.port == 9000
    assert cfg.providers[0].api_key == "sk-up"
    assert cfg.providers[0].timeouts.connect_s == 2 and cfg.providers[0].timeouts.total_s == 900
    assert cfg.models[0].endpoints[0].price.input == 1.5


def test_toml_uses_the_same_structs():
    digest = key_hash("sk-secret-123")
    text = """
[server]
port = 9001
[[keys]]
name = "k"
key-sha256 = "DIGEST"
[[providers]]
name = "up"
base-url = "http://127.0.0.1:1/v1"
[[models]]
name = "up/m"
endpoints = [{ provider = "up", model = "m" }]
""".replace("DIGEST", digest)
    cfg = parse(text, "toml", env={})
    assert cfg.server.port == 9001 and cfg.keys[0].key_sha256 == key_hash("sk-secret-123")


def test_every_problem_is_reported_at_once_with_its_path():
    bad = """
server: {port: 99999}
colour: blue
keys: [{name: k, key: short}]
providers:
  - {name: up, base-url: "ftp://x", wieght: 2}
  - {name: up2, base-url: "http://x", adapter: nope}
  - {name: up2, base-url: "http://y"}
models:
  - name: m
    endpoints: [{provider: ghost, model: m}]
"""
    with pytest.raises(ConfigError) as e:
        parse(bad, "yaml", env={})
    text = "\n".join(e.value.problems)
    assert "unknown field `colour` - at `$`" in text
    assert "unknown field `wieght` - at `$.providers[0]`" in text
    assert "at `$.server.port`" in text
    # Type errors stop the cross-reference pass; fix them and the second pass reports the rest together.
    fixed = bad.replace("server: {port: 99999}\n", "").replace("colour: blue\n", "").replace(", wieght: 2", "")
    with pytest.raises(ConfigError) as e:
        parse(fixed, "yaml", env={})
    problems = e.value.problems
    assert any("`$.providers[0].base-url`" in p for p in problems)
    assert any("unknown adapter `nope`" in p and "`$.providers[1].adapter`" in p for p in problems)
    assert any("duplicate provider name `up2`" in p for p in problems)
    assert any("unknown provider `ghost`" in p and "`$.models[0].endpoints[0].provider`" in p for p in problems)
    assert any("shorter than 8" in p and "`$.keys[0].key`" in p for p in problems)
    assert len(problems) == 5


def test_unset_env_var_is_a_problem_unless_defaulted():
    with pytest.raises(ConfigError) as e:
        parse(GOOD, "yaml", env={"GW_KEY": "sk-gw-0123456789"})
    assert e.value.problems == ["environment variable UP_KEY is not set - at `$.providers[0].api-key`"]
    cfg = parse(GOOD.replace("${UP_KEY}", "${UP_KEY:-none}"), "yaml", env={"GW_KEY": "sk-gw-0123456789"})
    assert cfg.providers[0].api_key == "none"


def test_embedded_default_enables_openai_only_with_its_key():
    bare = load(env={})
    assert [p.name for p in bare.providers] == ["demo"]
    assert {m.name for m in bare.models} == {"hedgerow/demo", "hedgerow/demo-embed"}
    assert bare.keys[0].key == "sk-hedgerow-demo"
    full = load(env={"OPENAI_API_KEY": "sk-x", "HEDGEROW_API_KEY": "sk-mine-0123456789"})
    assert [p.name for p in full.providers] == ["demo", "openai"]
    assert "openai/gpt-4o-mini" in {m.name for m in full.models}
    assert full.keys[0].key == "sk-mine-0123456789"


def test_demo_key_only_on_loopback():
    cfg = load(env={})
    assert with_server(cfg, host="::1").server.host == "::1"
    with pytest.raises(ConfigError, match="accepted only on a loopback address"):
        with_server(cfg, host="0.0.0.0")
    assert with_server(load(env={"HEDGEROW_API_KEY": "sk-real-0123456789"}), host="0.0.0.0")


def test_check_config_cli_exits_nonzero_and_lists_problems(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("keys: [{name: k}]\nproviders: [{name: p, base-url: 'http://x', weight: -1}]\n")
    out = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(path)], capture_output=True, text=True)
    assert out.returncode == 1
    assert "`$.providers[0].weight`" in out.stderr
    good = tmp_path / "good.yaml"
    good.write_text(GOOD.replace("${GW_KEY}", "sk-gw-0123456789").replace("${UP_KEY}", "x"))
    out = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(good)], capture_output=True, text=True)
    assert out.returncode == 0 and "OK" in out.stdout


def test_documented_example_config_is_valid():
    env = {
        "HEDGEROW_API_KEY": "sk-example-0123",
        "HEDGEROW_ADMIN_KEY": "sk-admin-0123",
        "OPENAI_API_KEY": "sk-o",
        "GROQ_API_KEY": "gsk-g",
    }
    cfg = load("deploy/hedgerow.example.yaml", env=env)
    assert [p.name for p in cfg.providers] == ["openai", "groq", "local-vllm"]
    assert len(cfg.models[1].endpoints) == 2
