"""The dashboard in a real browser: Debian's headless Chromium, driven by Playwright, against a gateway with traffic.

The page must draw its charts from what the JSON APIs say, and show the same numbers the APIs give the test. Nothing
is downloaded at run time: Playwright drives the system's Chromium (`executable_path`), never a browser of its own.
The screenshot is saved for a human to look at (tests/artifacts/, git-ignored).
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import re
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import orjson
import pytest
import yaml
from aiohttp import web

from proxy.config import Config, parse
from tests.billing import BillingUpstream, _chunk, openai_usage
from tests.conftest import AUTH, KEY, gateway_config
from tests.functional.test_ledger import PRICES, running

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
ADMIN = "sk-admin-dashboard-0123456789"
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}
SCREENSHOT = Path(__file__).resolve().parents[1] / "artifacts" / "dashboard.png"
REQUESTS = 120

browser_test = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (.ci/run installs it)")


class PacedUpstream(BillingUpstream):
    """The billing fake with streams that take time (tokens spread over ~100 ms, so the endpoint has a throughput
    and latency apart from its TTFB) and, when `fails`, a 503 for a prompt saying "fail" (the gateway fails over)."""

    def __init__(self, name: str, slow_s: float = 0.0, fails: bool = False) -> None:
        super().__init__(name, slow_s)
        self.fails = fails

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if self.fails and b"fail" in await request.read():
            return web.json_response({"error": {"message": "overloaded", "type": "server_error"}}, status=503)
        return await super()._chat(request)

    async def _stream(
        self, request: web.Request, req: dict[str, object], text: str, u: dict[str, int], n: int
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_chunk(n, {"role": "assistant", "content": ""}))
        for word in ("Hello", " from", " a", " paced", " stream"):
            await asyncio.sleep(0.02)
            await resp.write(_chunk(n, {"content": word}))
        await resp.write(_chunk(n, {}, "stop"))
        tail = {"id": f"chatcmpl-{n}", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": []}
        await resp.write(b"data: " + orjson.dumps({**tail, "usage": openai_usage(u)}) + b"\n\n")
        self.reported.add(u)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def dashboard_config(urls: dict[str, str], db: str) -> Config:
    """Two providers; `bill/m` on both (hedged), `bill/mini` on b only; an admin key; a ledger flushed often."""
    tree = {
        "server": {"host": "127.0.0.1", "port": 0, "drain-grace-s": 5.0},
        "keys": [{"name": "test", "key": KEY}, {"name": "admin", "key": ADMIN, "admin": True}],
        "accounting": {"store": {"path": db}, "flush-interval-s": 0.05},
        "providers": [
            {"name": n, "base-url": url, "api-key": f"sk-upstream-{n}", "probe": {"enabled": False}}
            for n, url in urls.items()
        ],
        "models": [
            {
                "name": "bill/m",
                "endpoints": [{"provider": n, "model": f"m-{n}", "price": PRICES[n]} for n in urls],
                "hedge": {"delay-s": 0.2, "budget": 1.0},
            },
            {"name": "bill/mini", "endpoints": [{"provider": "b", "model": "m-mini", "price": PRICES["b"]}]},
        ],
        "routing": {"retry-budget": 10},
    }
    return parse(yaml.safe_dump(tree), "yaml", env={})


def fmt_ms(s: float) -> str:
    """The page's `fmt.ms`. JavaScript's toFixed and Math.round round the exact binary value half up."""
    ms = Decimal(s * 1000)
    if ms < 10:
        return f"{ms.quantize(Decimal('0.1'), ROUND_HALF_UP)} ms"
    if ms < 1000:
        return f"{ms.quantize(Decimal('1'), ROUND_HALF_UP)} ms"
    return f"{Decimal(s).quantize(Decimal('0.01'), ROUND_HALF_UP)} s"


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url, headers=ADMIN_AUTH) as r:
        assert r.status == 200, (url, r.status, await r.text())
        return await r.json()


SLOW = 6  # of the REQUESTS: the last ones, slow streams that a hedge overtakes


async def traffic(http: aiohttp.ClientSession, url: str, secrets: list[str]) -> None:
    """REQUESTS chat requests over both models and both keys: plain, streamed, tool calls, and on `bill/m` prompts
    that provider a fails (the gateway fails over to b). Then SLOW streams sent to a first: a stalls, and the
    hedge on b wins. They come last, so that a's stalls do not steer the load balancer away from a before."""
    sem = asyncio.Semaphore(8)

    async def one(i: int) -> None:
        model = "bill/mini" if i % 4 == 3 else "bill/m"
        kind = ["plain", "stream", "tools", "plain", "stream"][i % 5]
        if model == "bill/m" and i % 10 == 6:
            kind = "fail"
        body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": f"request {i} {kind}"}]}
        body["stream"] = "stream" in kind
        if i >= REQUESTS - SLOW:
            body["model"], body["stream"], body["provider"] = "bill/m", True, {"order": ["a", "b"]}
            body["messages"][0]["content"] = f"request {i} slow stream"
        headers = {"Authorization": f"Bearer {secrets[i % len(secrets)]}"}
        async with sem, http.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status == 200, await r.text()
            await r.read()

    await asyncio.gather(*(one(i) for i in range(REQUESTS - SLOW)))
    await asyncio.gather(*(one(i) for i in range(REQUESTS - SLOW, REQUESTS)))


async def ledger_caught_up(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """The rankings once every request of the traffic is in them (the ledger flushes every 50 ms)."""
    for _ in range(100):
        rankings = await get_json(http, url + "/api/v1/rankings?period=day")
        if sum(r["requests"] for r in rankings["data"]) == REQUESTS:
            return rankings
        await asyncio.sleep(0.05)
    raise AssertionError(f"the ledger never caught up: {rankings}")


async def create_key(http: aiohttp.ClientSession, url: str, spec: dict[str, Any]) -> str:
    async with http.post(url + "/api/v1/keys", json=spec, headers=ADMIN_AUTH) as r:
        assert r.status == 201, await r.text()
        return (await r.json())["key"]


def launch(pw: Any) -> Any:
    return pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


@browser_test
async def test_dashboard_draws_live_charts_and_shows_the_numbers_the_apis_return(aiohttp_server, tmp_path):
    from playwright.async_api import async_playwright

    fakes = {"a": PacedUpstream("a", slow_s=0.6, fails=True), "b": PacedUpstream("b")}
    for fake in fakes.values():
        fake.base_url = str((await aiohttp_server(fake.app)).make_url("/v1"))
    cfg = dashboard_config({n: f.base_url for n, f in fakes.items()}, str(tmp_path / "ledger.db"))
    async with running(cfg) as url, aiohttp.ClientSession() as http, async_playwright() as pw:
        secrets = [
            await create_key(http, url, {"name": "team-alpha", "limit": 1.0}),
            await create_key(http, url, {"name": "team-beta"}),
        ]
        await traffic(http, url, secrets)
        rankings = await ledger_caught_up(http, url)

        browser = await launch(pw)
        page = await browser.new_page(viewport={"width": 1440, "height": 900})
        problems: list[str] = []
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        await page.goto(f"{url}/dashboard?key={ADMIN}")
        # two polls of /api/v1/providers make a line, three of /metrics (rates); the slow panels answer at start
        await page.wait_for_function(
            """() => ['#c-latency', '#c-requests'].every(c => [...document.querySelectorAll(c + ' path.line')]
                    .some(p => p.getAttribute('d').includes('L')))
                && document.querySelectorAll('#rankings tbody tr[data-model]').length === 2
                && document.querySelectorAll('#c-tokens rect.bar').length > 0
                && document.querySelectorAll('#keys tbody tr[data-key]').length === 2
                && document.querySelector('#tile-hedges').dataset.fired !== undefined""",
            timeout=15_000,
        )
        providers = await get_json(http, url + "/api/v1/providers")
        keys = await get_json(http, url + "/api/v1/keys")
        async with http.get(url + "/metrics") as r:
            metrics = await r.text()
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(SCREENSHOT), full_page=True)  # first, so that a failure has one too
        print(f"dashboard screenshot: {SCREENSHOT}")

        assert "key=" not in page.url  # the key left the address bar (and the history)
        # charts: lines with points in the live charts, one path per endpoint and quantile
        for chart in ("#c-ttft", "#c-latency", "#c-errors", "#c-throughput", "#c-flight", "#c-requests"):
            paths = await page.locator(f"{chart} path.line").evaluate_all("ps => ps.map(p => p.getAttribute('d'))")
            assert paths and any(len(re.findall(r"[ML]", d)) >= 2 for d in paths), (chart, paths)
        # one line per endpoint and quantile the API has (below the window's minimum of samples it gives none)
        quantiles = [ep["latency_s"][q] for ep in providers["data"] for q in ("p50", "p99")]
        assert await page.locator("#c-latency path.line").count() == sum(v is not None for v in quantiles) > 0

        # the endpoints table shows the API's quantiles (quantiles over 5 min: no traffic since, so they hold)
        shown = 0
        for ep in providers["data"]:
            row = page.locator(f'#endpoints tr[data-endpoint="{ep["endpoint"]}"]')
            for key, value in (("latency_p50", ep["latency_s"]["p50"]), ("ttfb_p99", ep["ttfb_s"]["p99"])):
                cell = row.locator(f'td[data-k="{key}"]')
                if value is None:  # fewer samples than the window's minimum
                    assert await cell.text_content() == "—"
                    continue
                assert float(await cell.get_attribute("data-v")) == value
                assert await cell.text_content() == fmt_ms(value)
                shown += 1
        assert shown, providers  # at least one endpoint had enough samples for its quantiles

        # the rankings table: requests and tokens per model as /api/v1/rankings counts them
        assert [r["model"] for r in rankings["data"]] == await page.locator("#rankings tr[data-model]").evaluate_all(
            "rows => rows.map(r => r.dataset.model)"
        )
        for r in rankings["data"]:
            row = page.locator(f'#rankings tr[data-model="{r["model"]}"]')
            assert await row.locator('td[data-k="requests"]').text_content() == f"{r['requests']:,}"
            assert await row.locator('td[data-k="total_tokens"]').text_content() == f"{r['total_tokens']:,}"
        assert await page.locator("#tile-requests .value").text_content() == f"{REQUESTS:,}"

        # keys: each key's usage as /api/v1/keys reports it
        for k in keys["data"]:
            cell = page.locator(f'#keys tr[data-key="{k["id"]}"] td[data-k="usage"]')
            assert float(await cell.get_attribute("data-v")) == k["usage"]
            assert k["usage"] > 0

        # activity: today's bar holds both models' tokens; hedges from /metrics
        titles = await page.locator("#c-tokens rect.bar title").all_text_contents()
        assert {t.split(" · ")[1].split(":")[0] for t in titles} == {"bill/m", "bill/mini"}
        hedges = {
            m[0]: float(m[1]) for m in re.findall(r'^hedgerow_hedges_total\{result="(\w+)"\} (\S+)$', metrics, re.M)
        }
        tile = page.locator("#tile-hedges")
        assert int(await tile.get_attribute("data-won")) == hedges.get("won", 0) > 0
        assert int(await tile.get_attribute("data-fired")) == sum(hedges.values())

        # nothing in the page complains: no "not available", no console errors
        notes = [n.strip() for n in await page.locator(".note").all_text_contents()]
        assert not any(notes), notes
        assert not problems, problems
        await browser.close()


@browser_test
async def test_dashboard_without_a_key_asks_for_one_and_calls_no_api(aiohttp_server, tmp_path):
    from playwright.async_api import async_playwright

    fakes = {n: BillingUpstream(n) for n in ("a", "b")}
    for fake in fakes.values():
        fake.base_url = str((await aiohttp_server(fake.app)).make_url("/v1"))
    cfg = dashboard_config({n: f.base_url for n, f in fakes.items()}, str(tmp_path / "ledger.db"))
    async with running(cfg) as url, async_playwright() as pw:
        browser = await launch(pw)
        page = await browser.new_page()
        problems: list[str] = []
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        asked: list[str] = []
        page.on("request", lambda r: asked.append(r.url))
        await page.goto(url + "/dashboard")
        assert await page.locator("#login").is_visible()
        assert not await page.locator("#board").is_visible()
        assert asked == [url + "/dashboard"]  # the page alone: no API call, no favicon, nothing elsewhere

        await page.fill("#key", "sk-not-a-key")
        await page.click("#login button[type=submit]")
        await page.wait_for_function("() => document.querySelector('#login-error').textContent !== ''")
        assert await page.locator("#login").is_visible()  # refused: back to the form, and the key forgotten
        assert await page.evaluate("() => sessionStorage.length") == 0

        await page.fill("#key", ADMIN)
        await page.click("#login button[type=submit]")
        await page.wait_for_selector("#endpoints tr[data-endpoint]")
        assert await page.locator("#board").is_visible()
        await page.click("#signout")
        assert await page.locator("#login").is_visible()
        assert await page.evaluate("() => sessionStorage.length") == 0
        # the refused key's 401s are the browser's own network log lines; nothing else may complain
        assert all("status of 401" in p for p in problems), problems
        await browser.close()


@browser_test
async def test_dashboard_notes_the_apis_this_gateway_lacks_and_draws_the_rest(gateway, fake_upstream, http):
    """No accounting (no rankings, activity or keys) and no /metrics: those panels say so, the live view works,
    and the browser logs nothing but its own line for each 404."""
    from playwright.async_api import async_playwright

    cfg = gateway_config({"p": fake_upstream.base_url})
    cfg = msgspec.structs.replace(
        cfg,
        server=msgspec.structs.replace(cfg.server, metrics=False),
        accounting=msgspec.structs.replace(cfg.accounting, enabled=False),
    )
    gw = await gateway(cfg)
    for _ in range(3):
        body = {"model": "test/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        async with http.post(gw.v1 + "/chat/completions", json=body, headers=AUTH) as r:
            assert r.status == 200
    absent = ["/api/v1/rankings?period=day", "/api/v1/keys", "/api/v1/activity?days=30", "/metrics"]
    for path in absent:
        async with http.get(gw.url + path, headers=AUTH) as r:
            assert r.status == 404, path
    async with async_playwright() as pw:
        browser = await launch(pw)
        page = await browser.new_page(viewport={"width": 1440, "height": 900})
        problems: list[str] = []
        page.on(
            "console",
            lambda m: problems.append(f"{m.text} {m.location['url']}") if m.type in ("error", "warning") else None,
        )
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        await page.goto(f"{gw.url}/dashboard?key={KEY}")  # any key reads the providers
        await page.wait_for_selector('#endpoints tr[data-endpoint="p/gpt-4o-mini"]')
        for panel in ("#rankings", "#keys", "#activity", "#c-requests"):
            await page.wait_for_function(
                f"() => document.querySelector('{panel} .note').textContent === 'not available on this gateway'"
            )
            assert not await page.locator(f"{panel} table, {panel} svg").first.is_visible()
        assert await page.locator("#tile-hedges .value").text_content() == "—"
        assert await page.locator("#live").get_attribute("class") == "live ok"
        await browser.close()
    expected = {
        f"Failed to load resource: the server responded with a status of 404 (Not Found) {gw.url}{p}" for p in absent
    }
    assert set(problems) == expected, problems


async def test_dashboard_is_one_self_contained_page_that_needs_no_key(gateway, fake_upstream, http):
    gw = await gateway(gateway_config({"p": fake_upstream.base_url}))
    async with http.get(gw.url + "/dashboard", headers={"Accept-Encoding": "identity"}) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/html; charset=utf-8"
        html = await r.text()
        csp = r.headers["Content-Security-Policy"]
        assert r.headers["Referrer-Policy"] == "no-referrer"
    # the style and script are inlined, and the policy allows exactly them (by hash) and this origin only
    style = re.search(r"<style>(.*?)</style>", html, re.S)
    script = re.search(r"<script>(.*?)</script>", html, re.S)
    assert style and script and "src=" not in html.replace('href="data:,"', "")
    for part, m in (("style-src", style), ("script-src", script)):
        digest = base64.b64encode(hashlib.sha256(m.group(1).encode()).digest()).decode()
        assert f"{part} 'sha256-{digest}'" in csp
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    async with http.get(gw.url + "/dashboard", headers={"Accept-Encoding": "gzip"}, auto_decompress=False) as r:
        assert r.headers["Content-Encoding"] == "gzip"
        assert gzip.decompress(await r.read()).decode() == html
    async with http.head(gw.url + "/dashboard") as r:
        assert r.status == 200
