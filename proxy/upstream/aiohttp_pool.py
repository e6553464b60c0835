"""UpstreamClient on aiohttp's client: correct for everything (TLS, proxies, redirects off), the default.

Timeouts are ours rather than aiohttp's `sock_read`, because aiohttp uses one read timeout for the response
head and the body alike, while a gateway needs two: first byte (a reasoning model may think for minutes) and
idle between chunks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

import aiohttp
from multidict import CIMultiDictProxy

from proxy.errors import StreamInterrupted, UpstreamConnectError, UpstreamProtocolError, UpstreamTimeout
from proxy.upstream.base import Target

# No global cap: each provider's pool is bounded by its own `max-connections` through limit_per_host.
_DEFAULT_PER_HOST = 1024


class AiohttpResponse:
    __slots__ = ("_done", "_resp", "_target", "headers", "status")

    def __init__(self, resp: aiohttp.ClientResponse, target: Target) -> None:
        self._resp = resp
        self._target = target
        self._done = False
        self.status = resp.status
        self.headers: CIMultiDictProxy[str] = resp.headers

    async def read(self, limit: int) -> bytes:
        content = self._resp.content
        idle = self._target.timeouts.idle_s
        parts: list[bytes] = []
        size = 0
        try:
            # The idle timeout bounds each wait for more bytes, as in chunks(): a body that keeps arriving slowly
            # is not silent (the attempt's total deadline bounds the whole).
            while True:
                async with asyncio.timeout(idle):
                    data = await content.readany()
                if not data:
                    break
                parts.append(data)
                size += len(data)
                if size > limit:
                    raise UpstreamProtocolError(
                        f"upstream response larger than {limit} bytes", upstream=self._target.host
                    )
            body = parts[0] if len(parts) == 1 else b"".join(parts)
        except TimeoutError:
            self.release()
            raise UpstreamTimeout("upstream went silent while sending its response") from None
        except aiohttp.ClientError as e:
            self.release()
            raise StreamInterrupted(f"upstream connection broke mid-response ({type(e).__name__})") from None
        except BaseException:
            self.release()
            raise
        self._done = True
        self.release()
        return body

    async def chunks(self) -> AsyncIterator[bytes]:
        content = self._resp.content
        idle = self._target.timeouts.idle_s
        try:
            while True:
                # The timeout wraps only the read: a generator may be resumed from another task (an attempt
                # commits in its own task, the handler relays the rest), and time spent by the consumer
                # writing to a slow client is not upstream silence.
                async with asyncio.timeout(idle):
                    data = await content.readany()
                if not data:
                    break
                yield data
        except TimeoutError:
            raise UpstreamTimeout(f"upstream sent nothing for {idle:g}s mid-stream") from None
        except aiohttp.ClientError as e:
            raise StreamInterrupted(f"upstream connection broke mid-stream ({type(e).__name__})") from None
        finally:
            self.release()
        self._done = True
        self._resp.release()

    def release(self) -> None:
        if self._done:
            self._resp.release()
        else:
            self._resp.close()  # body not consumed: drop the connection, the upstream sees it close


class AiohttpClient:
    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=0,
                limit_per_host=_DEFAULT_PER_HOST,
                ttl_dns_cache=300,  # provider hosts are few and stable
                enable_cleanup_closed=True,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, sock_read=None, sock_connect=None),
                auto_decompress=False,  # relay bytes as received, content-encoding included
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def send(
        self, target: Target, body: bytes, extra_headers: Mapping[str, str] | None = None
    ) -> AiohttpResponse:
        session = self._get_session()
        headers = target.headers if extra_headers is None else {**target.headers, **extra_headers}
        timeout = aiohttp.ClientTimeout(total=None, connect=target.timeouts.connect_s)
        try:
            async with asyncio.timeout(target.timeouts.first_byte_s):
                resp = await session.request(
                    target.method,
                    target.url,
                    data=body,
                    headers=headers,
                    timeout=timeout,
                    allow_redirects=False,
                )
        except aiohttp.ConnectionTimeoutError:
            raise UpstreamTimeout(f"connect to {target.host} timed out after {target.timeouts.connect_s:g}s") from None
        except TimeoutError:
            raise UpstreamTimeout(f"upstream sent no response head within {target.timeouts.first_byte_s:g}s") from None
        except aiohttp.ClientConnectorError as e:
            raise UpstreamConnectError(f"cannot connect to {target.host}:{target.port} ({e.os_error})") from None
        except aiohttp.ServerDisconnectedError:
            raise UpstreamProtocolError("upstream closed the connection before answering") from None
        except aiohttp.ClientError as e:
            raise UpstreamProtocolError(f"upstream request failed ({type(e).__name__})") from None
        return AiohttpResponse(resp, target)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
