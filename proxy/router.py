"""Route table and candidate order: which endpoints may serve a model, and in what order to try them.

The table is an immutable snapshot built from config; whoever changes routing builds a new one and swaps
the reference, so a request never sees a half-updated table and the hot path takes no lock.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from adapters import REGISTRY, Adapter
from proxy.config import BUILTIN_DEMO, Config, Price
from proxy.errors import UnknownModel


class Endpoint:
    """One model served by one provider."""

    __slots__ = ("adapter", "model", "price", "provider", "weight")

    def __init__(self, provider: str, model: str, adapter: Adapter, weight: float, price: Price) -> None:
        self.provider = provider
        self.model = model  # the upstream's own name
        self.adapter = adapter
        self.weight = weight
        self.price = price


class RouteTable:
    __slots__ = ("models", "public")

    def __init__(self, models: Mapping[str, tuple[Endpoint, ...]], public: tuple[str, ...]) -> None:
        self.models = models  # public names and unambiguous short aliases → endpoints
        self.public = public  # the public names, in config order, for /v1/models

    def candidates(self, model: str) -> tuple[Endpoint, ...]:
        eps = self.models.get(model)
        if eps is None:
            raise UnknownModel(f"model `{model}` does not exist or is not served here", param="model")
        return eps


def build_table(cfg: Config, builtin_urls: Mapping[str, str]) -> RouteTable:
    """Build adapters (one per provider) and the model → endpoints table from a validated config."""
    adapters: dict[str, Adapter] = {}
    weights: dict[str, float] = {}
    for p in cfg.providers:
        base = builtin_urls[p.base_url] if p.base_url == BUILTIN_DEMO else p.base_url
        adapters[p.name] = REGISTRY[p.adapter](p, base)
        weights[p.name] = p.weight
    models: dict[str, tuple[Endpoint, ...]] = {}
    for m in cfg.models:
        models[m.name] = tuple(
            Endpoint(e.provider, e.model, adapters[e.provider], e.weight * weights[e.provider], e.price)
            for e in m.endpoints
        )
    # "gpt-4o-mini" finds "openai/gpt-4o-mini" when exactly one public name ends that way.
    short: dict[str, list[str]] = {}
    for name in models:
        if "/" in name:
            short.setdefault(name.rpartition("/")[2], []).append(name)
    aliases = {s: models[names[0]] for s, names in short.items() if len(names) == 1 and s not in models}
    return RouteTable({**models, **aliases}, tuple(m.name for m in cfg.models))


def attempt_order(endpoints: tuple[Endpoint, ...], rng: random.Random) -> tuple[Endpoint, ...]:
    """Weighted random order without replacement: traffic splits by weight; the rest are fallbacks."""
    if len(endpoints) == 1:
        return endpoints
    # Efraimidis–Spirakis: sort by u^(1/w); one pass, no normalisation.
    return tuple(sorted(endpoints, key=lambda e: rng.random() ** (1.0 / e.weight), reverse=True))
