"""Route table and candidate order: which endpoints may serve a request, and in what order to try them.

The table is an immutable snapshot built from config; the health monitor publishes the healthy subset of
each model as a new tuple whenever membership changes. The hot path reads both without a lock.

Order (see DESIGN.md, Routing): the model's endpoints, filtered by the request's preferences, then the
`models` fallbacks. Within a model: the preferred `order` first; else `sort` (price / latency / throughput);
else power-of-two-choices on a load-aware cost (Peak-EWMA TTFB × (in-flight + 1)) divided by weight, with
the rest ordered by cost as failover candidates. Ejected endpoints are skipped unless all are (panic mode).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping

from adapters import REGISTRY, Adapter
from health.monitor import Monitor
from health.state import EndpointState
from health.window import EndpointHealth
from proxy.accounting.catalog import Catalog, CatalogModel, default_catalog, load_catalog
from proxy.config import BUILTIN_DEMO, Config, HedgeConfig, Price
from proxy.errors import BadRequest, NotFound, UnknownModel
from proxy.preferences import NO_PREFS, ProviderPrefs, Sort, request_params, split_suffix


class Endpoint:
    """One model served by one provider, with its live health."""

    __slots__ = ("adapter", "health", "key", "model", "price", "provider", "state", "weight")

    def __init__(
        self, provider: str, model: str, adapter: Adapter, weight: float, price: Price, clock: Callable[[], float]
    ) -> None:
        self.provider = provider
        self.model = model  # the upstream's own name
        self.key = f"{provider}/{model}"
        self.adapter = adapter
        self.weight = weight
        self.price = price
        self.health = EndpointHealth(clock, key=self.key)
        self.state = EndpointState()

    def unit_price(self) -> float:
        return self.price.input + self.price.output


class ModelRoute:
    __slots__ = ("cache", "catalog", "context_length", "endpoints", "hedge", "max_output", "name")

    def __init__(
        self,
        name: str,
        endpoints: tuple[Endpoint, ...],
        hedge: HedgeConfig,
        cache: bool,
        *,
        context_length: int | None = None,
        max_output: int | None = None,
        catalog: CatalogModel | None = None,
    ) -> None:
        self.name = name
        self.endpoints = endpoints
        self.hedge = hedge
        self.cache = cache
        self.context_length = context_length  # tokens: the config's, else the catalog's; None if unknown
        self.max_output = max_output  # completion tokens, likewise
        self.catalog = catalog  # the catalog's entry for this model (display name, parameters), if any


class RouteTable:
    __slots__ = ("models", "public")

    def __init__(self, models: Mapping[str, ModelRoute], public: tuple[str, ...]) -> None:
        self.models = models  # public names and unambiguous short aliases → route
        self.public = public  # the public names, in config order, for /v1/models

    def route(self, model: str) -> ModelRoute:
        r = self.models.get(model)
        if r is None:
            raise UnknownModel(f"model `{model}` does not exist or is not served here", param="model")
        return r


def build_table(
    cfg: Config, builtin_urls: Mapping[str, str], clock: Callable[[], float], catalog: Catalog | None = None
) -> RouteTable:
    """Build adapters (one per provider), endpoints (one per provider + upstream model) and the table.
    Prices, context lengths and max outputs the config leaves out come from `catalog` (default: the bundled)."""
    if catalog is None:
        catalog = default_catalog() if cfg.accounting.catalog is None else load_catalog(cfg.accounting.catalog)
    providers = {p.name: p for p in cfg.providers}
    adapters: dict[str, Adapter] = {}
    weights: dict[str, float] = {}
    for p in cfg.providers:
        base = builtin_urls[p.base_url] if p.base_url == BUILTIN_DEMO else p.base_url
        adapters[p.name] = REGISTRY[p.adapter](p, base)
        weights[p.name] = p.weight
    shared: dict[str, Endpoint] = {}  # one health record per provider + upstream model, whatever its aliases
    models: dict[str, ModelRoute] = {}
    for m in cfg.models:
        eps = []
        for e in m.endpoints:
            key = f"{e.provider}/{e.model}"
            if key not in shared:
                w = e.weight * weights[e.provider]
                price = catalog.resolve_price(e.price, providers[e.provider], e.model)
                shared[key] = Endpoint(e.provider, e.model, adapters[e.provider], w, price, clock)
            eps.append(shared[key])
        entry, ctx, out = catalog.limits(m.name, [(providers[e.provider], e.model) for e in m.endpoints])
        models[m.name] = ModelRoute(
            m.name,
            tuple(eps),
            m.hedge,
            m.cache,
            context_length=m.context_length or ctx,
            max_output=m.max_output or out,
            catalog=entry,
        )
    # "gpt-4o-mini" finds "openai/gpt-4o-mini" when exactly one public name ends that way.
    short: dict[str, list[str]] = {}
    for name in models:
        if "/" in name:
            short.setdefault(name.rpartition("/")[2], []).append(name)
    aliases = {s: models[names[0]] for s, names in short.items() if len(names) == 1 and s not in models}
    return RouteTable({**models, **aliases}, tuple(m.name for m in cfg.models))


class Router:
    __slots__ = ("monitor", "rng", "table")

    def __init__(self, table: RouteTable, monitor: Monitor, rng: random.Random) -> None:
        self.table = table
        self.monitor = monitor
        self.rng = rng

    def plan(
        self, model: str, prefs: ProviderPrefs = NO_PREFS, fallbacks: list[str] | None = None, body: bytes = b""
    ) -> tuple[ModelRoute, list[Endpoint]]:
        """The primary model's route and every endpoint to try, in order (first = first attempt). `body` is
        read only under `provider.require_parameters`, for the parameter names it uses."""
        name, suffix_sort = split_suffix(model)
        route = self.table.route(name)
        if prefs is NO_PREFS and suffix_sort is None and not fallbacks:
            return route, self._order(route, None)  # the common case: no preferences at all
        out = self._filtered(route, prefs, prefs.sort or suffix_sort)
        for fb in fallbacks or ():
            fb_name, fb_sort = split_suffix(fb)
            fb_route = self.table.models.get(fb_name)
            if fb_route is None:
                continue  # an unknown fallback is skipped, as OpenRouter does
            out.extend(e for e in self._filtered(fb_route, prefs, prefs.sort or fb_sort) if e not in out)
        if prefs.require_parameters and out:
            out = _supporting(out, request_params(body), name)
        if not prefs.allow_fallbacks:
            out = out[:1]
        if not out:  # the request's own filters left nothing (OpenRouter: 404): no 503, a retry cannot help
            raise NotFound(f"no endpoint of `{name}` matches the request's provider preferences", param="provider")
        return route, out

    def _order(self, route: ModelRoute, sort: Sort | None) -> list[Endpoint]:
        healthy: tuple[Endpoint, ...] = self.monitor.healthy.get(route.name, ())  # type: ignore[assignment]
        if not healthy:  # panic: all are ejected; the least bad first, the others as failover candidates
            least_bad = self.monitor.least_bad(route.name)
            if least_bad is None:
                return []
            return [least_bad, *(e for e in route.endpoints if e is not least_bad)]  # type: ignore[list-item]
        if len(healthy) == 1:
            return [healthy[0]]
        if sort is not None:
            return sorted(healthy, key=_SORT_KEYS[sort])
        return self._p2c(healthy)

    def _p2c(self, eps: tuple[Endpoint, ...]) -> list[Endpoint]:
        """Two weighted-random picks, keep the cheaper; the rest follow by cost as failover candidates."""
        rng = self.rng
        n = len(eps)
        if self._equal_weights(eps):
            a = int(rng.random() * n)
            b = (a + 1 + int(rng.random() * (n - 1))) % n
        else:
            a, b = rng.choices(range(n), [e.weight for e in eps], k=2)
            if a == b:
                b = (a + 1 + int(rng.random() * (n - 1))) % n
        costs = [e.health.cost() / e.weight for e in eps]  # each once: cost() reads the clock
        first = a if costs[a] <= costs[b] else b
        if n == 2:
            return [eps[first], eps[1 - first]]
        rest = sorted(range(n), key=costs.__getitem__)
        return [eps[first], *(eps[i] for i in rest if i != first)]

    @staticmethod
    def _equal_weights(eps: tuple[Endpoint, ...]) -> bool:
        w = eps[0].weight
        return all(e.weight == w for e in eps)

    def _filtered(self, route: ModelRoute, prefs: ProviderPrefs, sort: Sort | None) -> list[Endpoint]:
        eps = self._order(route, sort)
        if prefs.only is not None:
            eps = [e for e in eps if e.provider in prefs.only]
        if prefs.ignore:
            eps = [e for e in eps if e.provider not in prefs.ignore]
        mp = prefs.max_price
        if mp is not None:
            eps = [
                e
                for e in eps
                if (mp.prompt is None or e.price.input <= mp.prompt)
                and (mp.completion is None or e.price.output <= mp.completion)
            ]
        if prefs.order:
            rank = {p: i for i, p in enumerate(prefs.order)}
            listed = sorted((e for e in eps if e.provider in rank), key=lambda e: rank[e.provider])
            eps = listed + ([e for e in eps if e.provider not in rank] if prefs.allow_fallbacks else [])
        return eps


_NONE: frozenset[str] = frozenset()


def _supporting(eps: list[Endpoint], used: frozenset[str], name: str) -> list[Endpoint]:
    """The endpoints whose adapter would drop none of the request's parameters (an adapter lists those in an
    optional `unsupported` attribute: the OpenAI adapter, from its preset); a 400 naming them if none is left."""
    kept = [e for e in eps if used.isdisjoint(getattr(e.adapter, "unsupported", _NONE))]
    if kept:
        return kept
    missing = sorted(set().union(*(used & getattr(e.adapter, "unsupported", _NONE) for e in eps)))
    raise BadRequest(
        f"no endpoint of `{name}` supports {', '.join(f'`{m}`' for m in missing)} and the request sets"
        " provider.require_parameters",
        param=missing[0],
    )


def _throughput_key(e: Endpoint) -> float:
    tps = e.health.throughput()
    return -(tps or 0.0)


_SORT_KEYS: dict[str, Callable[[Endpoint], float]] = {
    "price": Endpoint.unit_price,
    "latency": lambda e: e.health.peak_ewma(),
    "throughput": _throughput_key,
}
