"""A lean HTTP/1.1 server engine for the gateway: asyncio.Protocol + llhttp (httptools).

The default engine (`server.engine: lean`; `aiohttp` selects aiohttp's server instead). It serves the same
handlers as the aiohttp engine, with the same HTTP behaviours and tests, at a fraction of the per-request CPU: see
`protocol.py` for why and what, `request.py` and `response.py` for how the handlers' aiohttp-shaped
objects are met, `server.py` for routing and the drain.

Nothing is imported here: `proxy.stream` imports `request`, and `protocol` imports the handlers, which
import `proxy.stream` — eager imports would make that a cycle.
"""
