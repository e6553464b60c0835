"""The key-management and credits API, in OpenRouter's shapes: provisioning keys manage keys, organisations and
top-ups; any key may read its own limit, its organisation's credits and the generations it made.

Off the hot path: every handler awaits the store. A key write goes to the store first, then `keys_changed()`
makes this node reload at once (other nodes notice through `keys_version`, or Redis's push). The key logic
(`KeySpec`, `new_key`, `create_key`) is shared with `hedgerow keys …` (proxy/cli.py).

Secrets: `sk-hr-` + 48 url-safe characters from `secrets`, shown once in the create answer; the store keeps only
their SHA-256 (proxy/accounting/keys.py says why a digest lookup is safe).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar
from urllib.parse import parse_qs

import msgspec
import orjson
from aiohttp import web
from msgspec import UNSET, Meta, UnsetType

from proxy.accounting.settings import OrgConfig
from proxy.config import key_hash
from proxy.errors import BadRequest, Conflict, Forbidden, NotFound, Unavailable
from proxy.store.base import GenerationRecord, KeyRecord, OrgRecord, Reset, Store, StoreError

log = logging.getLogger("hedgerow")

DEFAULT_ORG = "org_default"
SECRET_PREFIX = "sk-hr-"
_SECRET_BYTES = 36  # 288 random bits, which base64 spells in exactly 48 url-safe characters

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Route = tuple[str, str, Handler]

Money = Annotated[float, Meta(ge=0)]
PerMinute = Annotated[int, Meta(ge=1)]
Label = Annotated[str, Meta(min_length=1, max_length=200)]
Models = Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(min_length=1)]  # null, not [], means "every"
OrgId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


class KeySpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A key's fields as a client sends them (POST and PATCH). UNSET: not given, so PATCH keeps the field;
    null: cleared. `name` is OpenRouter's word for what Hedgerow calls the label; either is accepted."""

    name: Label | UnsetType = UNSET
    label: Label | UnsetType = UNSET
    org: str | UnsetType = UNSET
    limit: Money | UnsetType | None = UNSET  # USD per period (or ever, without limit_reset)
    limit_reset: Reset | UnsetType | None = UNSET
    allowed_models: Models | UnsetType | None = UNSET
    rpm: PerMinute | UnsetType | None = UNSET
    tpm: PerMinute | UnsetType | None = UNSET
    expires_at: float | str | UnsetType | None = UNSET  # unix seconds or ISO 8601 (UTC unless it says otherwise)
    disabled: bool | UnsetType = UNSET


class _OrgBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    id: OrgId
    name: str = ""  # default: the id
    credits: Money | None = None  # initial balance, USD; None: unlimited


class _TopUp(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    amount: Annotated[float, Meta(gt=0)]


_T = TypeVar("_T")
_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]*)`")
_AT_PATH = re.compile(r"at `\$\.?([^`]*)`")


def decode(typ: type[_T], data: bytes | dict[str, Any]) -> _T:
    """A request body (JSON bytes, or a dict from the CLI) as `typ`; BadRequest naming the field otherwise."""
    try:
        if isinstance(data, bytes):
            return msgspec.json.decode(data, type=typ, strict=True)
        return msgspec.convert(data, typ, strict=True)
    except msgspec.ValidationError as e:
        msg = str(e)
        m = _UNKNOWN_FIELD.search(msg) or _AT_PATH.search(msg)
        raise BadRequest(f"invalid request body: {msg}", param=(m.group(1) or None) if m else None) from None
    except msgspec.DecodeError as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None


def _timestamp(value: float | str, now: float) -> float:
    if isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            raise BadRequest(
                f"expires_at: {value!r} is neither unix seconds nor ISO 8601", param="expires_at"
            ) from None
        t = (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()
    else:
        t = value
    if not math.isfinite(t) or t <= now:
        raise BadRequest("expires_at must be in the future", param="expires_at")
    return t


def apply_spec(key: KeyRecord, spec: KeySpec, now: float) -> KeyRecord:
    """`key` with the fields `spec` gives (nothing else changes); BadRequest for values types cannot rule out."""
    changes: dict[str, Any] = {"updated_at": now}
    if spec.name is not UNSET and spec.label is not UNSET and spec.name != spec.label:
        raise BadRequest("name and label are the same field: give one", param="label")
    label = spec.label if spec.label is not UNSET else spec.name
    if label is not UNSET:
        changes["label"] = label
    for field in ("org", "limit_reset", "allowed_models", "rpm", "tpm", "disabled"):
        if (value := getattr(spec, field)) is not UNSET:
            changes[field] = value
    if spec.limit is not UNSET:
        if spec.limit is not None and not math.isfinite(spec.limit):
            raise BadRequest("limit must be a finite number of USD (null: no limit)", param="limit")
        changes["limit"] = spec.limit
    if spec.expires_at is not UNSET:
        changes["expires_at"] = None if spec.expires_at is None else _timestamp(spec.expires_at, now)
    return msgspec.structs.replace(key, **changes)


def new_key(spec: KeySpec, now: float) -> tuple[KeyRecord, str]:
    """A new key record from `spec`, and its secret: the one time it exists outside the client."""
    if spec.name is UNSET and spec.label is UNSET:
        raise BadRequest("a key needs a name (or label)", param="name")
    secret = SECRET_PREFIX + secrets.token_urlsafe(_SECRET_BYTES)
    blank = KeyRecord(id="key_" + secrets.token_hex(8), digest=key_hash(secret), org=DEFAULT_ORG, created_at=now)
    return apply_spec(blank, spec, now), secret


async def require_org(store: Store, org_id: str) -> OrgRecord:
    org = await store.get_org(org_id)
    if org is None:
        raise NotFound(f"organisation {org_id!r} does not exist", param="org")
    return org


async def create_key(store: Store, spec: KeySpec, now: float) -> tuple[KeyRecord, str]:
    """Build a key (`new_key`), check its organisation exists, store it; returns the record and the secret."""
    key, secret = new_key(spec, now)
    await require_org(store, key.org)
    await store.put_key(key)
    return key, secret


async def ensure_orgs(store: Store, orgs: list[OrgConfig], now: float) -> None:
    """Create `org_default` and the configured organisations the store does not have yet (startup, CLI).
    Two nodes racing here are harmless: put_org keeps an existing org's balance."""
    wanted = orgs if any(o.id == DEFAULT_ORG for o in orgs) else [OrgConfig(id=DEFAULT_ORG, name="default"), *orgs]
    for o in wanted:
        if await store.get_org(o.id) is None:
            await store.put_org(OrgRecord(id=o.id, name=o.name or o.id, balance=o.credits, created_at=now))


def iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat()


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _query(request: web.Request, name: str) -> str | None:
    values = parse_qs(request.query_string).get(name)
    return values[0] if values else None


def _org_view(org: OrgRecord) -> dict[str, Any]:
    return {
        "id": org.id,
        "name": org.name,
        "balance": org.balance,
        "spent": org.spent,
        "created_at": iso(org.created_at),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def _generation_view(g: GenerationRecord) -> dict[str, Any]:
    total = g.cost + g.fee
    return {
        "id": g.id,
        "total_cost": total,
        "created_at": iso(g.created),
        "model": g.model,
        "streamed": g.streamed,
        "cancelled": g.cancelled,
        "provider_name": g.provider or None,
        "latency": _ms(g.latency),  # arrival to last byte, ms (OpenRouter: total latency)
        "generation_time": _ms(g.latency - g.ttft) if g.ttft is not None else None,  # first byte to last
        "finish_reason": g.finish_reason,
        "tokens_prompt": g.prompt_tokens,
        "tokens_completion": g.completion_tokens,
        "native_tokens_prompt": g.prompt_tokens,  # the provider's own counts: the only ones Hedgerow has
        "native_tokens_completion": g.completion_tokens,
        "native_tokens_reasoning": g.reasoning_tokens,
        "native_tokens_cached": g.cached_tokens,
        "usage": total,
        "upstream_inference_cost": g.cost,
        "gateway_fee": g.fee,
        "cache_discount": None,
        "is_byok": False,
        "origin": "",
        "attempts": [
            {
                "provider": a.provider,
                "endpoint": a.endpoint,
                "outcome": a.outcome,
                "status": a.status,
                "started": _ms(a.started),  # ms after the request arrived
                "duration": _ms(a.duration),
                "tokens_prompt": a.prompt_tokens,
                "tokens_completion": a.completion_tokens,
                "cost": a.cost,
            }
            for a in g.attempts
        ],
    }


class AdminAPI:
    """The `/api/v1/keys…`, `/key`, `/credits…`, `/orgs` and `/generation` handlers, for either server engine."""

    def __init__(
        self,
        store: Store,
        authenticate: Callable[[str | None], KeyRecord],
        is_admin: Callable[[KeyRecord], bool],
        keys_changed: Callable[[], Awaitable[None]],
        unsettled: Callable[[str], float],
        pending_generation: Callable[[str], GenerationRecord | None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._authenticate = authenticate  # Authorization header -> the caller's key, or Unauthorized
        self._is_admin = is_admin
        self._keys_changed = keys_changed
        self._unsettled = unsettled  # key id -> spend this node has not settled yet, USD
        self._pending = pending_generation
        self._clock = clock

    def routes(self) -> list[Route]:
        table: list[Route] = [
            ("POST", "/api/v1/keys", self.create_key),
            ("GET", "/api/v1/keys", self.list_keys),
            ("GET", "/api/v1/keys/{id}", self.get_key),
            ("PATCH", "/api/v1/keys/{id}", self.update_key),
            ("DELETE", "/api/v1/keys/{id}", self.delete_key),
            ("GET", "/api/v1/key", self.current_key),
            ("GET", "/api/v1/credits", self.credits),
            ("POST", "/api/v1/credits/{id}", self.top_up),
            ("POST", "/api/v1/orgs", self.create_org),
            ("GET", "/api/v1/orgs", self.list_orgs),
            ("GET", "/api/v1/generation", self.generation),
        ]
        return [(method, path, _store_errors_unavailable(handler)) for method, path, handler in table]

    def _caller(self, request: web.Request) -> KeyRecord:
        return self._authenticate(request.headers.get("Authorization"))

    def _admin(self, request: web.Request) -> KeyRecord:
        key = self._caller(request)
        if not self._is_admin(key):
            raise Forbidden("this route needs a provisioning (admin) key")
        return key

    async def _usage(self, key: KeyRecord, now: float) -> tuple[float, float | None]:
        """(usage this period, limit remaining or None). What this node spent but has not settled counts as
        usage; it was spent out of this node's lease, which `outstanding` already holds, so the remaining
        limit takes the larger of the two rather than both (more than the lease: spent without one)."""
        u = await self._store.key_usage(key.id, key.limit_reset, now)
        unsettled = self._unsettled(key.id)
        if key.limit is None:
            return u.usage + unsettled, None
        return u.usage + unsettled, max(0.0, key.limit - u.usage - max(u.outstanding, unsettled))

    async def _key_view(self, key: KeyRecord, now: float) -> dict[str, Any]:
        usage, remaining = await self._usage(key, now)
        return {
            "id": key.id,
            "label": key.label,
            "org": key.org,
            "disabled": key.disabled,
            "expires_at": iso(key.expires_at),
            "allowed_models": key.allowed_models,
            "limit": key.limit,
            "limit_reset": key.limit_reset,
            "limit_remaining": remaining,
            "usage": usage,
            "rpm": key.rpm,
            "tpm": key.tpm,
            "created_at": iso(key.created_at),
            "updated_at": iso(key.updated_at),
        }

    async def _stored_key(self, request: web.Request) -> KeyRecord:
        key_id = request.match_info["id"]
        key = await self._store.get_key(key_id)
        if key is None:
            raise NotFound(f"no key with id {key_id!r}")
        return key

    # keys (admin)
    async def create_key(self, request: web.Request) -> web.Response:
        self._admin(request)
        now = self._clock()
        key, secret = await create_key(self._store, decode(KeySpec, await request.read()), now)
        await self._keys_changed()
        return _json({"data": await self._key_view(key, now), "key": secret}, status=201)

    async def list_keys(self, request: web.Request) -> web.Response:
        self._admin(request)
        now = self._clock()
        keys = await self._store.list_keys(_query(request, "org"))
        return _json({"data": await asyncio.gather(*(self._key_view(k, now) for k in keys))})

    async def get_key(self, request: web.Request) -> web.Response:
        self._admin(request)
        return _json({"data": await self._key_view(await self._stored_key(request), self._clock())})

    async def update_key(self, request: web.Request) -> web.Response:
        self._admin(request)
        key = await self._stored_key(request)
        spec = decode(KeySpec, await request.read())
        now = self._clock()
        updated = apply_spec(key, spec, now)
        if updated.org != key.org:
            await require_org(self._store, updated.org)
        await self._store.put_key(updated)
        await self._keys_changed()
        return _json({"data": await self._key_view(updated, now)})

    async def delete_key(self, request: web.Request) -> web.Response:
        self._admin(request)
        key_id = request.match_info["id"]
        if not await self._store.delete_key(key_id):
            raise NotFound(f"no key with id {key_id!r}")
        await self._keys_changed()
        return _json({"data": {"deleted": True}})

    # any key, about itself
    async def current_key(self, request: web.Request) -> web.Response:
        key = self._caller(request)
        usage, remaining = await self._usage(key, self._clock())
        data = {
            "label": key.label,
            "usage": usage,
            "limit": key.limit,
            "limit_remaining": remaining,
            "limit_reset": key.limit_reset,
            "is_free_tier": False,
            "rate_limit": {"requests": key.rpm if key.rpm is not None else -1, "interval": "1m"},
            "tokens_per_minute": key.tpm if key.tpm is not None else -1,
        }
        return _json({"data": data})

    async def credits(self, request: web.Request) -> web.Response:
        key = self._caller(request)
        org = await require_org(self._store, key.org)
        total = None if org.balance is None else org.balance + org.spent
        return _json({"data": {"total_credits": total, "total_usage": org.spent}})

    async def generation(self, request: web.Request) -> web.Response:
        key = self._caller(request)
        gen_id = _query(request, "id")
        if not gen_id:
            raise BadRequest("missing query parameter `id`", param="id")
        record = self._pending(gen_id)
        if record is None:
            record = await self._store.get_generation(gen_id)
        if record is None or (record.key_id != key.id and not self._is_admin(key)):
            raise NotFound(f"no generation with id {gen_id!r}")  # another key's: do not reveal it exists
        return _json({"data": _generation_view(record)})

    # organisations and credits (admin)
    async def create_org(self, request: web.Request) -> web.Response:
        self._admin(request)
        body = decode(_OrgBody, await request.read())
        if body.credits is not None and not math.isfinite(body.credits):
            raise BadRequest("credits must be a finite number of USD (null: unlimited)", param="credits")
        if await self._store.get_org(body.id) is not None:
            raise Conflict(f"organisation {body.id!r} already exists", param="id")
        org = OrgRecord(id=body.id, name=body.name or body.id, balance=body.credits, created_at=self._clock())
        await self._store.put_org(org)
        return _json({"data": _org_view(org)}, status=201)

    async def list_orgs(self, request: web.Request) -> web.Response:
        self._admin(request)
        return _json({"data": [_org_view(o) for o in await self._store.list_orgs()]})

    async def top_up(self, request: web.Request) -> web.Response:
        self._admin(request)
        org_id = request.match_info["id"]
        body = decode(_TopUp, await request.read())
        if not math.isfinite(body.amount):
            raise BadRequest("amount must be a finite number of USD", param="amount")
        await require_org(self._store, org_id)
        balance = await self._store.top_up(org_id, body.amount)
        return _json({"data": {"id": org_id, "balance": balance}})


def _store_errors_unavailable(handler: Handler) -> Handler:
    """The store failing is the gateway's trouble, not the caller's: 503 with Retry-After, never a traceback."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except StoreError as e:
            log.warning("admin API: store error on %s %s: %s", request.method, request.path, e)
            raise Unavailable("the accounting store is unavailable; try again shortly") from e

    return guarded
