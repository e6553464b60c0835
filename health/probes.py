"""Active health probes: one background task per provider, jittered, cheap, never on the request path.

Why probe when requests already report health: an ejected endpoint gets no traffic, so without probes it
could only come back when its ejection timer ran out, blind. Probes also notice a dead provider before the
first user request does. While any endpoint of the provider is ejected, probing is faster, so a recovered
endpoint returns soon after it recovers.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence

import orjson

from health.monitor import Monitor
from health.window import Outcome, outcome_for_status
from proxy.config import ProviderConfig
from proxy.errors import GatewayError
from proxy.router import Endpoint
from proxy.upstream import UpstreamClient

log = logging.getLogger("hedgerow.probes")

_PROBE_BODY_LIMIT = 1 << 20  # a model list is small; a larger answer is read and dropped, never kept


async def _probe_once(client: UpstreamClient, ep: Endpoint, kind: str) -> tuple[Outcome, float]:
    loop = asyncio.get_running_loop()
    target = ep.adapter.target("models" if kind == "models" else "chat", ep.model, False)
    if target is None:
        return Outcome.OK, 0.0
    body = b""
    if kind == "chat":  # one token, no stream: the cheapest real completion, in the provider's own format
        ping = orjson.dumps({"model": ep.model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1})
        body = ep.adapter.request_body(ping, ep.model, ep.model, False)
    started = loop.time()
    try:
        sign = getattr(ep.adapter, "sign", None)  # SigV4 (Bedrock): per-request headers, as in proxy/attempt.py
        resp = await client.send(target, body, None if sign is None else sign(target, body))
        await resp.read(_PROBE_BODY_LIMIT)
        return outcome_for_status(resp.status), loop.time() - started
    except GatewayError as e:
        from proxy.attempt import outcome_of

        return outcome_of(e), loop.time() - started


async def probe_provider(
    provider: ProviderConfig,
    endpoints: Sequence[Endpoint],
    client: UpstreamClient,
    monitor: Monitor,
    rng: random.Random,
) -> None:
    """Probe until cancelled. `models` probes once for the provider; `chat` probes each endpoint."""
    cfg = provider.probe
    if cfg.kind == "models" and endpoints and endpoints[0].adapter.target("models", endpoints[0].model) is None:
        return  # no model list to ask (Bedrock): an "OK" would readmit ejected endpoints without checking them
    while True:
        interval = cfg.ejected_interval_s if monitor.any_ejected(provider.name) else cfg.interval_s
        await asyncio.sleep(interval * (1 + cfg.jitter * rng.uniform(-1, 1)))
        targets = endpoints[:1] if cfg.kind == "models" else endpoints
        for ep in targets:
            try:
                async with asyncio.timeout(cfg.timeout_s):
                    outcome, latency = await _probe_once(client, ep, cfg.kind)
            except TimeoutError:
                outcome, latency = Outcome.TIMEOUT, cfg.timeout_s
            # A model list answers for the provider: every endpoint of it takes the result.
            for each in endpoints if cfg.kind == "models" else (ep,):
                monitor.probe(each, outcome, latency)


async def expire_loop(monitor: Monitor, every_s: float = 0.5) -> None:
    """Readmit endpoints whose ejection ran out, even when no request or probe comes by to notice."""
    while True:
        await asyncio.sleep(every_s)
        monitor.expire()
