"""The model catalog: popular models, the providers that serve them, list prices and limits, as data.

The bundled `catalog.yaml` is read once per process; an operator's catalog file (same format, YAML or TOML by
extension) is merged on top of it: a model of the same name keeps what the file leaves out and takes what it
gives; an endpoint of the same provider family and upstream model replaces the bundled one; new models and
endpoints extend the catalog. Lookups are dict reads, built once.

An endpoint is found by its provider *family* — the provider's preset (`groq`), else its adapter
(`anthropic`, `gemini`, `azure`, `bedrock`; a plain `openai` provider is `openai`) — and the provider's own
model name or one of its aliases. The router resolves each configured endpoint's price through it: the
config's `price` when written, else the catalog's, else zero.
"""

from __future__ import annotations

import datetime
import functools
import tomllib
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
import yaml

from proxy.config import ConfigError, Price, ProviderConfig
from proxy.structs import Base

if TYPE_CHECKING:
    from proxy.router import ModelRoute

PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's when built with it: ~10× faster
ZERO = Price()


class ProviderPrices(Base):
    as_of: datetime.date  # the day the prices below stood on `source`
    source: str  # the provider's public pricing page
    note: str = ""


class CatalogEndpoint(Base):
    provider: str  # a provider family: a preset name, or the adapter name
    model: str  # the provider's own model name
    price: Price
    aliases: list[str] = []  # other names the provider accepts for the same model (dated snapshots …)
    context_length: PositiveInt | None = None  # where this provider serves less than the model's
    max_output: PositiveInt | None = None


class CatalogModel(Base):
    name: str  # public name, OpenRouter style: "openai/gpt-4o-mini"
    display_name: str | None = None  # "OpenAI: GPT-4o-mini"
    created: int | None = None  # Unix time the model was released, where known
    context_length: PositiveInt | None = None
    max_output: PositiveInt | None = None
    supported_parameters: list[str] | None = None  # OpenRouter's names
    endpoints: list[CatalogEndpoint] = []


class CatalogFile(Base):
    providers: dict[str, ProviderPrices] = {}
    models: list[CatalogModel] = []
    x_params: dict[str, list[str]] = {}  # shared parameter lists for YAML anchors; not read


class Catalog:
    """The merged catalog with its lookup tables (read-only once built)."""

    __slots__ = ("_by_endpoint", "models", "providers")

    def __init__(self, providers: dict[str, ProviderPrices], models: dict[str, CatalogModel]) -> None:
        self.providers = providers
        self.models = models
        self._by_endpoint: dict[tuple[str, str], tuple[CatalogModel, CatalogEndpoint]] = {}
        for m in models.values():
            for e in m.endpoints:
                for name in (e.model, *e.aliases):
                    self._by_endpoint.setdefault((e.provider, name), (m, e))

    def model(self, name: str) -> CatalogModel | None:
        """A model by its public name."""
        return self.models.get(name)

    def endpoint(self, family: str, upstream_model: str) -> tuple[CatalogModel, CatalogEndpoint] | None:
        """The catalog model and endpoint a provider family serves under this name (or alias)."""
        return self._by_endpoint.get((family, upstream_model))

    def price_for(self, family: str, upstream_model: str) -> Price | None:
        found = self._by_endpoint.get((family, upstream_model))
        return found[1].price if found else None

    def resolve_price(self, written: Price | None, provider: ProviderConfig, upstream_model: str) -> Price:
        """The price an endpoint is billed at: the config's when written, else the catalog's, else zero."""
        if written is not None:
            return written
        return self.price_for(family(provider), upstream_model) or ZERO

    def limits(
        self, name: str, endpoints: list[tuple[ProviderConfig, str]]
    ) -> tuple[CatalogModel | None, int | None, int | None]:
        """A public model's catalog entry, context length and max output: by its public name, else by its
        first endpoint the catalog knows (a model published under a name of the operator's own); an endpoint's
        narrower limits win over the model's."""
        entry = self.models.get(name)
        ep: CatalogEndpoint | None = None
        for provider, upstream in endpoints:
            found = self._by_endpoint.get((family(provider), upstream))
            if found is not None and (entry is None or found[0] is entry):
                entry, ep = found
                break
        if entry is None:
            return None, None, None
        ctx = ep.context_length if ep is not None and ep.context_length else entry.context_length
        out = ep.max_output if ep is not None and ep.max_output else entry.max_output
        return entry, ctx, out


def family(provider: ProviderConfig) -> str:
    """The catalog family of a configured provider: its preset, else its adapter's name — except that a bare
    `openai` adapter is OpenAI's own only at OpenAI's address. Anywhere else it is a server of the operator's
    (vLLM, a proxy) that may serve a model of the same name at another price, or free: its family is its own
    name, which only an operator catalog can price."""
    if provider.preset:
        return provider.preset
    if provider.adapter == "openai" and "api.openai.com" not in (provider.base_url or ""):
        return provider.name
    return provider.adapter


def _decode(text: str, fmt: str, where: str) -> CatalogFile:
    """Decode a catalog file, reporting every problem with its path (item by item, as the config does)."""
    try:
        tree = tomllib.loads(text) if fmt == "toml" else yaml.load(text, Loader=_YAML_LOADER)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        raise ConfigError([f"{where}: cannot parse {fmt}: {e}"]) from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError([f"{where}: the catalog must be a mapping at the top level - at `$`"])
    problems: list[str] = []
    known = set(CatalogFile.__struct_encode_fields__)
    problems.extend(f"{where}: Object contains unknown field `{k}` - at `$`" for k in tree if k not in known)
    models: list[CatalogModel] = []
    items = tree.get("models", [])
    if not isinstance(items, list):
        problems.append(f"{where}: Expected `array`, got `{type(items).__name__}` - at `$.models`")
        items = []
    for i, item in enumerate(items):
        try:
            models.append(msgspec.convert(item, CatalogModel))
        except msgspec.ValidationError as e:
            problems.append(f"{where}: {_at(e, f'$.models[{i}]')}")
    providers: dict[str, ProviderPrices] = {}
    section = tree.get("providers", {})
    if not isinstance(section, dict):
        problems.append(f"{where}: Expected `object`, got `{type(section).__name__}` - at `$.providers`")
        section = {}
    for name, item in section.items():
        try:
            providers[name] = msgspec.convert(item, ProviderPrices)
        except msgspec.ValidationError as e:
            problems.append(f"{where}: {_at(e, f'$.providers.{name}')}")
    if problems:
        raise ConfigError(problems)
    return CatalogFile(providers=providers, models=models)


def _at(e: msgspec.ValidationError, path: str) -> str:
    text = str(e)
    return text.replace("`$", f"`{path}") if " - at `$" in text else f"{text} - at `{path}`"


def _merge_model(base: CatalogModel, top: CatalogModel) -> CatalogModel:
    """`top`'s given fields over `base`'s; endpoints replaced by family + model, new ones appended."""
    changes: dict[str, Any] = {
        f: getattr(top, f)
        for f in ("display_name", "created", "context_length", "max_output", "supported_parameters")
        if getattr(top, f) is not None
    }
    endpoints = list(base.endpoints)
    index = {(e.provider, e.model): i for i, e in enumerate(endpoints)}
    for e in top.endpoints:
        i = index.get((e.provider, e.model))
        if i is None:
            index[(e.provider, e.model)] = len(endpoints)
            endpoints.append(e)
        else:
            endpoints[i] = e
    return msgspec.structs.replace(base, endpoints=endpoints, **changes)


def merge(files: list[CatalogFile]) -> Catalog:
    """Later files over earlier ones."""
    providers: dict[str, ProviderPrices] = {}
    models: dict[str, CatalogModel] = {}
    for f in files:
        providers.update(f.providers)
        for m in f.models:
            models[m.name] = _merge_model(models[m.name], m) if m.name in models else m
    return Catalog(providers, models)


@functools.cache
def _bundled() -> CatalogFile:
    text = resources.files("proxy.accounting").joinpath("catalog.yaml").read_text("utf-8")
    return _decode(text, "yaml", "catalog.yaml (bundled)")


def load_catalog(extra: str | None = None) -> Catalog:
    """The bundled catalog, with the operator's catalog file (YAML, or TOML by extension) merged on top.
    Raises ConfigError listing every problem in the file, each with its path."""
    files = [_bundled()]
    if extra is not None:
        p = Path(extra)
        try:
            text = p.read_text("utf-8")
        except OSError as e:
            raise ConfigError([f"cannot read {p}: {e.strerror}"]) from None
        files.append(_decode(text, "toml" if p.suffix == ".toml" else "yaml", str(p)))
    return merge(files)


@functools.cache
def default_catalog() -> Catalog:
    """The bundled catalog alone, built once per process."""
    return load_catalog()


def price_for(family: str, upstream_model: str) -> Price | None:
    """The bundled catalog's price for a provider family's model (by name or alias), or None."""
    return default_catalog().price_for(family, upstream_model)


def per_token(usd_per_million: float) -> str:
    """USD per million tokens as OpenRouter's per-token decimal string: 0.15 → "0.00000015", 0 → "0"."""
    if not usd_per_million:
        return "0"
    text = format(Decimal(repr(usd_per_million)) / 1_000_000, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def pricing_fields(p: Price) -> dict[str, str]:
    """A price in OpenRouter's `pricing` shape (USD per token; cache and reasoning rates resolved)."""
    return {
        "prompt": per_token(p.input),
        "completion": per_token(p.output),
        "request": format(Decimal(repr(p.request)), "f") if p.request else "0",
        "input_cache_read": per_token(p.input if p.cache_read is None else p.cache_read),
        "input_cache_write": per_token(p.input if p.cache_write is None else p.cache_write),
        "internal_reasoning": per_token(p.output if p.reasoning is None else p.reasoning),
    }


def model_entry(route: ModelRoute) -> dict[str, Any]:
    """A served model in the shape of GET /v1/models: OpenAI's fields and OpenRouter's, priced by its first
    endpoint (the price it is billed at, the catalog's or the config's)."""
    first = route.endpoints[0]
    entry = route.catalog
    return {
        "id": route.name,
        "object": "model",
        "created": (entry.created if entry is not None else None) or 0,
        "owned_by": first.provider,
        "name": (entry.display_name if entry is not None else None) or route.name,
        "context_length": route.context_length,
        "pricing": pricing_fields(first.price),
        "top_provider": {
            "context_length": route.context_length,
            "max_completion_tokens": route.max_output,
            "is_moderated": False,
        },
        "supported_parameters": (entry.supported_parameters if entry is not None else None) or [],
    }
