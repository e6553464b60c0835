"""A request's routing preferences in OpenRouter's shape, decoded only when the request carries them.

`provider: {order, only, ignore, allow_fallbacks, sort, max_price, require_parameters}`, the `models: [...]`
fallback list and the `:nitro` (sort by throughput) / `:floor` (sort by price) model suffixes. Most requests
carry none of these, so the common path costs one empty-Raw check.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from proxy.errors import BadRequest

Sort = Literal["price", "latency", "throughput"]


class MaxPrice(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    prompt: float | None = None  # USD per million prompt tokens
    completion: float | None = None  # USD per million completion tokens


class ProviderPrefs(msgspec.Struct, frozen=True):
    order: list[str] | None = None  # try these providers first, in this order
    only: list[str] | None = None  # use only these providers
    ignore: list[str] | None = None  # never use these providers
    allow_fallbacks: bool = True  # False: only the first choice; no other provider on failure
    sort: Sort | None = None  # deterministic order instead of load balancing
    max_price: MaxPrice | None = None  # skip endpoints priced above this
    require_parameters: bool = False  # skip endpoints that would drop a parameter the request uses


NO_PREFS = ProviderPrefs()
_decode_prefs = msgspec.json.Decoder(ProviderPrefs).decode
_decode_models = msgspec.json.Decoder(list[str]).decode
_SUFFIX_SORT: dict[str, Sort] = {":nitro": "throughput", ":floor": "price"}


def provider_prefs(raw: msgspec.Raw) -> ProviderPrefs:
    if not raw:
        return NO_PREFS
    try:
        return _decode_prefs(raw)
    except msgspec.ValidationError as e:
        raise BadRequest(f"invalid `provider` preferences: {e}", param="provider") from None


def fallback_models(raw: msgspec.Raw) -> list[str]:
    if not raw:
        return []
    try:
        return _decode_models(raw)
    except msgspec.ValidationError as e:
        raise BadRequest(f"invalid `models` list: {e}", param="models") from None


_decode_top = msgspec.json.Decoder(dict[str, msgspec.Raw]).decode


def request_params(body: bytes) -> frozenset[str]:
    """The request's top-level parameter names (values stay undecoded): for `require_parameters` only."""
    return frozenset(_decode_top(body))


def split_suffix(model: str) -> tuple[str, Sort | None]:
    """`vendor/model:nitro` → (`vendor/model`, "throughput"); unknown suffixes stay part of the name."""
    head, sep, tail = model.rpartition(":")
    if sep:
        sort = _SUFFIX_SORT.get(":" + tail)
        if sort is not None:
            return head, sort
    return model, None
