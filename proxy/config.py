"""Gateway configuration: YAML or TOML decoded straight into strict, frozen msgspec Structs.

Why two passes: msgspec stops at the first type error, but an operator fixing a config wants every problem at
once. So each list item is converted on its own (errors carry the path to the field), and `validate()` then
checks what types cannot: cross-references, unique names, the demo key on a public address.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

from health.state import EjectionConfig
from proxy.accounting.settings import AccountingConfig
from proxy.affinity import AffinityConfig
from proxy.cache import CacheConfig
from proxy.insights.tracing import TracingConfig
from proxy.structs import Base, PositiveFloat

DEMO_KEY = "sk-hedgerow-demo"  # documented; accepted only on a loopback listener
BUILTIN_DEMO = "builtin:demo"  # base-url of the in-process demo upstream


class Timeouts(Base):
    connect_s: PositiveFloat = 5.0  # TCP (+TLS) connect to the upstream
    first_byte_s: PositiveFloat = 120.0  # request sent → response headers (reasoning models think first)
    first_token_s: PositiveFloat = 120.0  # streams: request sent → first content token (role frames don't count)
    idle_s: PositiveFloat = 120.0  # longest silence between two body chunks of one response
    total_s: PositiveFloat = 900.0  # whole attempt, streams included


class ProbeConfig(Base):
    enabled: bool = True  # active health probes for this provider
    interval_s: PositiveFloat = 15.0  # between probes while every endpoint is in rotation
    ejected_interval_s: PositiveFloat = 2.0  # faster while one is ejected, so it comes back soon after recovery
    timeout_s: PositiveFloat = 3.0  # a probe slower than this failed
    jitter: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.2  # ± share, so nodes don't probe in lockstep
    kind: Literal["models", "chat"] = "models"  # GET /models (free), or a one-token chat completion per model


class ProviderConfig(Base):
    name: str  # unique; shown in the X-Hedgerow-Provider header, logs and metrics
    base_url: str | None = None  # e.g. https://api.openai.com/v1, or "builtin:demo"; absent: the preset's
    adapter: str = "openai"  # wire format: a key of adapters.REGISTRY
    preset: str | None = None  # adapters/presets.py: base-url, key variable, unsupported params (e.g. "groq")
    api_key: str | None = None  # usually "${OPENAI_API_KEY}" (absent: the preset's variable); never logged
    requires_env: str | None = None  # skip this provider (and its endpoints) unless this env var is set
    headers: dict[str, str] = {}  # extra headers on every upstream request
    timeouts: Timeouts = Timeouts()
    weight: Annotated[float, msgspec.Meta(gt=0, le=1000)] = 1.0
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 1024  # keep-alive pool size
    probe: ProbeConfig = ProbeConfig()


NonNegative = Annotated[float, msgspec.Meta(ge=0)]


class Price(Base):
    """USD per million tokens (`request`: USD per request). Absent cache and reasoning rates are the input's and
    the output's: a provider that does not price them apart bills them as ordinary tokens."""

    input: NonNegative = 0.0  # prompt tokens neither read from nor written to the provider's prompt cache
    output: NonNegative = 0.0  # completion tokens
    cache_read: NonNegative | None = None  # prompt tokens read from the cache (None: as input)
    cache_write: NonNegative | None = None  # prompt tokens written to the cache (None: as input)
    reasoning: NonNegative | None = None  # reasoning tokens, part of the completion (None: as output)
    request: NonNegative = 0.0  # per request, whatever its tokens


class EndpointConfig(Base):
    provider: str  # a provider's name
    model: str  # the upstream's own model name
    weight: Annotated[float, msgspec.Meta(gt=0, le=1000)] = 1.0
    price: Price | None = None  # None: the catalog's (proxy/accounting/catalog.yaml), else zero


class HedgeConfig(Base):
    enabled: bool = True  # only models with two or more providers can hedge
    delay_s: PositiveFloat | None = None  # fixed delay; unset: the endpoint's rolling TTFT quantile, clamped
    quantile: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.95  # the TTFT quantile that triggers a hedge
    min_s: PositiveFloat = 0.25  # never hedge sooner: below this a second attempt is mostly waste
    max_s: PositiveFloat = 10.0  # never wait longer than this for a first token before hedging
    budget: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.05  # share of requests that may be hedged
    non_streamed: bool = False  # hedge non-streamed requests too (time to first token matters most in streams)


class ModelConfig(Base):
    name: str  # public name in the OpenRouter style, e.g. "openai/gpt-4o-mini"
    endpoints: list[EndpointConfig]
    hedge: HedgeConfig = HedgeConfig()
    cache: bool = False  # serve repeated deterministic requests from the response cache
    context_length: Annotated[int, msgspec.Meta(gt=0)] | None = None  # tokens; None: the catalog's
    max_output: Annotated[int, msgspec.Meta(gt=0)] | None = None  # completion tokens; None: the catalog's


class RoutingConfig(Base):
    ejection: EjectionConfig = EjectionConfig()
    retry_budget: Annotated[float, msgspec.Meta(ge=0, le=10)] = 0.2  # failover attempts per recent request
    retry_floor_per_s: Annotated[float, msgspec.Meta(ge=0)] = 10.0  # …plus this many per second (tower, Finagle: 10)
    stream_keepalive_s: PositiveFloat = 5.0  # SSE comment to the client while waiting for a first token
    affinity: AffinityConfig = AffinityConfig()


class KeyConfig(Base):
    name: str  # label for logs; never the secret
    key: str | None = None  # plaintext, usually "${HEDGEROW_API_KEY}"; hashed at load, then dropped
    key_sha256: str | None = None  # or the hex SHA-256 of the key, so the file holds no secret
    admin: bool = False  # a provisioning key: manages keys and credits (/api/v1/keys…), never calls models
    org: str = "org_default"  # the organisation whose credits this key spends
    rpm: Annotated[int, msgspec.Meta(ge=1)] | None = None  # requests per minute; None: unlimited
    tpm: Annotated[int, msgspec.Meta(ge=1)] | None = None  # tokens per minute; None: unlimited


# What OpenAI and Anthropic SDKs and the gateway's own per-request options send from a page, by default.
CORS_HEADERS = (
    "Authorization",
    "Content-Type",
    "X-Request-Id",
    "X-Api-Key",
    "Anthropic-Version",
    "Anthropic-Beta",
    "X-Hedgerow-Hedge",
    "X-Hedgerow-Cache",
)


class CorsConfig(Base):
    """Cross-origin requests from browsers: off (no CORS header at all) until `allow-origins` lists an origin."""

    allow_origins: list[str] = []  # exact origins ("https://app.example.com"), or "*" for any
    allow_headers: list[str] = msgspec.field(default_factory=lambda: list(CORS_HEADERS))  # "*": what a page asks
    max_age_s: Annotated[int, msgspec.Meta(ge=0, le=86400)] = 600  # how long a browser may cache a preflight


class TlsConfig(Base):
    """TLS termination on the listener (PEM files; TLS 1.2 or newer)."""

    cert_file: str  # the certificate chain, leaf first
    key_file: str  # its private key (unencrypted)


MAX_WORKERS = 256  # `server.workers` and `--workers`


class ServerConfig(Base):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    workers: Annotated[int, msgspec.Meta(ge=1, le=MAX_WORKERS)] | Literal["auto"] = "auto"  # auto: one per usable CPU
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 16 * 1024 * 1024  # images inline as base64
    header_timeout_s: PositiveFloat = 10.0  # slowloris guard: whole request head must arrive in this time
    body_timeout_s: PositiveFloat = 30.0  # whole request body must arrive in this time
    keepalive_timeout_s: PositiveFloat = 75.0  # idle client connection closed after this
    # Client connection caps; why these defaults: `ConnectionCaps` in proxy/edge.py. IPv6 addresses count by /64.
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 16_384  # per worker, open at once; more: 503 and close
    max_connections_per_ip: Annotated[int, msgspec.Meta(ge=1)] | None = None  # per worker and address; None: no cap
    drain_grace_s: Annotated[float, msgspec.Meta(ge=0)] = 30.0  # SIGTERM: time in-flight streams get to end
    max_response_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 64 * 1024 * 1024  # non-streamed upstream body
    upstream_client: Literal["lean", "aiohttp"] = "lean"  # lean: httptools pool for http:// (https → aiohttp)
    engine: Literal["aiohttp", "lean"] = "lean"  # HTTP server: proxy/lean_server (llhttp), or aiohttp's
    metrics: bool = True  # GET /metrics (Prometheus, every worker; no key: keep it off the public network)
    access_log: bool = False  # one JSON line per request on stdout (logger `hedgerow.access`), written off the hot path
    tracing: TracingConfig = TracingConfig()  # OpenTelemetry spans per request and attempt (the `otel` extra)
    cors: CorsConfig = CorsConfig()  # browser cross-origin access; off unless `allow-origins` is set
    tls: TlsConfig | None = None  # serve HTTPS on the listener; None: plain HTTP


class Config(Base):
    server: ServerConfig = ServerConfig()
    routing: RoutingConfig = RoutingConfig()
    cache: CacheConfig = CacheConfig()
    accounting: AccountingConfig = AccountingConfig()
    providers: list[ProviderConfig] = []
    models: list[ModelConfig] = []
    keys: list[KeyConfig] = []


class ConfigError(Exception):
    """Every problem found, one per line, each with the path to the field."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(node: Any, path: str, env: dict[str, str], problems: list[str]) -> Any:
    """Replace ${VAR} and ${VAR:-default} in every string; an unset VAR without default is a problem."""
    if isinstance(node, str):

        def sub(m: re.Match[str]) -> str:
            value = env.get(m.group(1))
            if value is None or (value == "" and m.group(2) is not None):
                if m.group(2) is None:
                    problems.append(f"environment variable {m.group(1)} is not set - at `{path}`")
                    return ""
                return m.group(2)
            return value

        return _ENV.sub(sub, node)
    if isinstance(node, dict):
        return {k: _expand(v, f"{path}.{k}", env, problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand(v, f"{path}[{i}]", env, problems) for i, v in enumerate(node)]
    return node


def _apply_presets(tree: dict[str, Any]) -> None:
    """Fill what a provider's `preset` implies and the provider leaves out, before anything else reads it.

    `base-url` defaults to the preset's; with no `api-key`, the key is `${<PRESET_ENV>}` and `requires-env`
    defaults to that variable, so a cloud preset switches itself on when its key is exported. These defaults
    are written into the tree, so the usual rules (`_drop_disabled`, `${VAR}` expansion) apply to them as to
    written values. An unknown preset is left alone for validate() to report with its path.
    """
    from adapters.presets import PRESETS  # late: importing adapters imports this module

    providers = tree.get("providers")
    if not isinstance(providers, list):
        return
    for i, p in enumerate(providers):
        name = p.get("preset") if isinstance(p, dict) else None
        preset = PRESETS.get(name) if isinstance(name, str) else None
        if preset is None:
            continue
        implied: dict[str, Any] = {"base-url": preset.base_url}
        if preset.api_key_env and "api-key" not in p:
            implied["api-key"] = f"${{{preset.api_key_env}}}"
            implied["requires-env"] = preset.api_key_env
        providers[i] = {**implied, **p}


def _drop_disabled(tree: dict[str, Any], env: dict[str, str]) -> None:
    """Remove providers whose `requires-env` is unset, their endpoints, and models left without any."""
    providers = tree.get("providers")
    if not isinstance(providers, list):
        return
    off = {
        p.get("name")
        for p in providers
        if isinstance(p, dict) and p.get("requires-env") and not env.get(p["requires-env"])
    }
    if not off:
        return
    tree["providers"] = [p for p in providers if not (isinstance(p, dict) and p.get("name") in off)]
    models = tree.get("models")
    if isinstance(models, list):
        kept = []
        for m in models:
            if isinstance(m, dict) and isinstance(m.get("endpoints"), list):
                eps = [e for e in m["endpoints"] if not (isinstance(e, dict) and e.get("provider") in off)]
                if not eps:
                    continue
                m = {**m, "endpoints": eps}
            kept.append(m)
        tree["models"] = kept


def _at(e: msgspec.ValidationError, path: str) -> str:
    """msgspec's message with its path made absolute (errors at an item's root carry no path at all)."""
    text = str(e)
    return text.replace("`$", f"`{path}") if " - at `$" in text else f"{text} - at `{path}`"


def _convert_all(tree: dict[str, Any], problems: list[str]) -> Config | None:
    """Convert section by section and item by item so that every type error is reported."""
    known = set(Config.__struct_encode_fields__)
    for key in tree:
        if key not in known:
            problems.append(f"Object contains unknown field `{key}` - at `$`")
    parts: dict[str, Any] = {}
    for key, typ in (("providers", ProviderConfig), ("models", ModelConfig), ("keys", KeyConfig)):
        items = tree.get(key, [])
        if not isinstance(items, list):
            problems.append(f"Expected `array`, got `{type(items).__name__}` - at `$.{key}`")
            continue
        good = []
        for i, item in enumerate(items):
            try:
                good.append(msgspec.convert(item, typ))
            except msgspec.ValidationError as e:
                problems.append(_at(e, f"$.{key}[{i}]"))
        parts[key] = good
    sections = (("server", ServerConfig), ("routing", RoutingConfig), ("cache", CacheConfig))
    for key, typ in (*sections, ("accounting", AccountingConfig)):
        if key in tree:
            try:
                parts[key] = msgspec.convert(tree[key], typ)
            except msgspec.ValidationError as e:
                problems.append(_at(e, f"$.{key}"))
    if problems:
        return None
    return Config(**parts)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate(cfg: Config) -> list[str]:
    """Cross-reference checks that types cannot express; returns every problem found."""
    from adapters import REGISTRY  # late: adapters import config types
    from adapters.presets import PRESETS

    problems: list[str] = []
    seen: set[str] = set()
    for i, p in enumerate(cfg.providers):
        if p.name in seen:
            problems.append(f"duplicate provider name `{p.name}` - at `$.providers[{i}].name`")
        seen.add(p.name)
        if p.adapter not in REGISTRY:
            problems.append(
                f"unknown adapter `{p.adapter}` (known: {', '.join(sorted(REGISTRY))}) - at `$.providers[{i}].adapter`"
            )
        if p.preset is not None and p.preset not in PRESETS:
            problems.append(
                f"unknown preset `{p.preset}` (known: {', '.join(sorted(PRESETS))}) - at `$.providers[{i}].preset`"
            )
        elif p.preset is not None and p.adapter != "openai":
            problems.append(f"presets are for the openai adapter, not `{p.adapter}` - at `$.providers[{i}].preset`")
        elif p.base_url is None:
            problems.append(f"give `base-url` or a `preset` - at `$.providers[{i}]`")
        elif p.base_url != BUILTIN_DEMO and not p.base_url.startswith(("http://", "https://")):
            problems.append(
                f"base-url must start with http:// or https:// (or be {BUILTIN_DEMO}) - at `$.providers[{i}].base-url`"
            )
    names: set[str] = set()
    for i, m in enumerate(cfg.models):
        if m.name in names:
            problems.append(f"duplicate model name `{m.name}` - at `$.models[{i}].name`")
        names.add(m.name)
        if not m.endpoints:
            problems.append(f"model `{m.name}` has no endpoints - at `$.models[{i}].endpoints`")
        for j, e in enumerate(m.endpoints):
            if e.provider not in seen:
                problems.append(f"unknown provider `{e.provider}` - at `$.models[{i}].endpoints[{j}].provider`")
    for i, k in enumerate(cfg.keys):
        if (k.key is None) == (k.key_sha256 is None):
            problems.append(f"give exactly one of `key` and `key-sha256` - at `$.keys[{i}]`")
        elif k.key is not None and len(k.key) < 8:
            problems.append(f"key is shorter than 8 characters - at `$.keys[{i}].key`")
        elif k.key_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", k.key_sha256):
            problems.append(f"key-sha256 must be 64 lowercase hex digits - at `$.keys[{i}].key-sha256`")
        if k.key == DEMO_KEY and not _is_loopback(cfg.server.host):
            problems.append(
                f"the demo key {DEMO_KEY} is accepted only on a loopback address, not {cfg.server.host};"
                f" set HEDGEROW_API_KEY - at `$.keys[{i}]`"
            )
    if not cfg.keys:
        problems.append("no gateway keys configured - at `$.keys`")
    problems.extend(_server_problems(cfg.server))
    if cfg.accounting.catalog is not None:
        from proxy.accounting.catalog import load_catalog  # late: the catalog module imports this one

        try:
            load_catalog(cfg.accounting.catalog)
        except ConfigError as e:
            problems.extend(f"{p} (the catalog named at `$.accounting.catalog`)" for p in e.problems)
    return problems


_ORIGIN = re.compile(r"https?://[^/\s?#]+")  # scheme://host[:port], no path: what browsers send as `Origin`
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name


def _server_problems(s: ServerConfig) -> list[str]:
    """CORS entries a browser could ever match, and TLS files that load (proxy/edge.py builds the context)."""
    problems = []
    for i, origin in enumerate(s.cors.allow_origins):
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            problems.append(
                f"an origin is `*` or scheme://host[:port] without a path, not {origin!r}"
                f" - at `$.server.cors.allow-origins[{i}]`"
            )
    for i, name in enumerate(s.cors.allow_headers):
        if not _TOKEN.fullmatch(name):
            problems.append(f"not a header name: {name!r} - at `$.server.cors.allow-headers[{i}]`")
    if s.tls is not None:
        from proxy.edge import tls_context  # late: proxy.edge imports this module

        try:
            tls_context(s.tls)
        except ValueError as e:
            problems.append(f"cannot load the TLS certificate and key ({e}) - at `$.server.tls`")
    return problems


def parse(text: str, fmt: str, env: dict[str, str] | None = None) -> Config:
    """Decode YAML or TOML text into a validated Config, or raise ConfigError listing every problem."""
    env = dict(os.environ) if env is None else env
    try:
        tree = tomllib.loads(text) if fmt == "toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        raise ConfigError([f"cannot parse {fmt}: {e}"]) from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(["the config must be a mapping at the top level - at `$`"])
    problems: list[str] = []
    _apply_presets(tree)
    _drop_disabled(tree, env)
    tree = _expand(tree, "$", env, problems)
    cfg = _convert_all(tree, problems)
    if cfg is not None:
        problems.extend(validate(cfg))
    if problems:
        raise ConfigError(problems)
    assert cfg is not None
    return cfg


def load(path: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None) -> Config:
    """Load a config file (format by extension), or the embedded default when path is None."""
    if path is None:
        text = resources.files("proxy").joinpath("default.yaml").read_text("utf-8")
        return parse(text, "yaml", env)
    p = Path(path)
    try:
        text = p.read_text("utf-8")
    except OSError as e:
        raise ConfigError([f"cannot read {p}: {e.strerror}"]) from None
    return parse(text, "toml" if p.suffix == ".toml" else "yaml", env)


def key_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def with_server(cfg: Config, **changes: Any) -> Config:
    """A copy with server fields replaced (CLI flags), re-validated (the demo-key rule depends on host)."""
    given = {k: v for k, v in changes.items() if v is not None}
    new = msgspec.structs.replace(cfg, server=msgspec.structs.replace(cfg.server, **given))
    problems = validate(new)
    if problems:
        raise ConfigError(problems)
    return new
