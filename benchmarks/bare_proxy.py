"""The bare reference proxy: the least an aiohttp + uvloop pass-through can do.

Hedgerow's overhead is judged against this rather than against zero: what this costs is the price of aiohttp's
server and client themselves, which the gateway pays too, so `gateway − bare` is what Hedgerow's own code adds.
Hence no auth, no parsing, no header copying beyond the content type: the request body goes upstream as-is
to the same path, and the response comes back whole, or chunk by chunk when it is an event stream.

Run: python -m benchmarks.bare_proxy --port 18002 --upstream http://127.0.0.1:18001
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def relay(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    content_type = request.headers.get("Content-Type")
    headers = {"Content-Type": content_type} if content_type else None
    url = request.app[UPSTREAM] + request.path_qs
    async with request.app[SESSION].request(request.method, url, data=body or None, headers=headers) as up:
        up_type = up.headers.get("Content-Type", "application/octet-stream")
        if up_type.startswith("text/event-stream"):
            resp = web.StreamResponse(status=up.status, headers={"Content-Type": up_type})
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp
        return web.Response(status=up.status, body=await up.read(), headers={"Content-Type": up_type})


async def _session_ctx(app: web.Application) -> AsyncIterator[None]:
    # Same client settings as the gateway's pool, so the comparison is about code, not configuration.
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=1024)
    app[SESSION] = aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    yield
    await app[SESSION].close()


def make_app(upstream: str) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")
    app.cleanup_ctx.append(_session_ctx)
    app.router.add_route("*", "/{tail:.*}", relay)
    return app


async def serve(host: str, port: int, upstream: str) -> None:
    runner = web.AppRunner(make_app(upstream), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"bare proxy on http://{host}:{port} -> {upstream}", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bare_proxy", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:18001 (paths are kept)")
    args = parser.parse_args(argv)
    uvloop.run(serve(args.host, args.port, args.upstream))


if __name__ == "__main__":
    main()
