"""The built-in `demo` provider: a tiny OpenAI-compatible upstream served in-process on a loopback port.

It exists so that the embedded default config answers a real request with no network and no provider key,
through the same forwarding path as a real provider (HTTP, pooled client, byte passthrough). Its answers
say plainly that they come from the demo.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

import msgspec
import orjson
from aiohttp import web

_TOKEN_GAP_S = 0.01  # streamed "tokens" arrive like a fast real model's, so streaming is visible in curl


class _Message(msgspec.Struct):
    role: str = "user"
    content: Any = ""


class _Chat(msgspec.Struct):
    model: str = "demo"
    messages: list[_Message] = []
    stream: bool = False
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


class _Completion(msgspec.Struct):
    model: str = "demo"
    prompt: Any = ""
    stream: bool = False


class _Embedding(msgspec.Struct):
    model: str = "demo-embed"
    input: Any = ""


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _reply_words(prompt: str, limit: int | None) -> list[str]:
    said = " ".join(prompt.split())[:200] or "nothing"
    text = (
        f"[demo] Hello from Hedgerow's built-in demo provider. You said: “{said}”. "
        "Set OPENAI_API_KEY (or configure a provider) for real answers."
    )
    words = text.split(" ")
    tokens = [w if i == 0 else " " + w for i, w in enumerate(words)]
    return tokens[:limit] if limit else tokens


def _usage(prompt: str, n: int) -> dict[str, int]:
    p = max(1, len(prompt.split()))
    return {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}


async def _chat(request: web.Request) -> web.StreamResponse:
    try:
        req = msgspec.json.decode(await request.read(), type=_Chat)
    except msgspec.MsgspecError as e:
        return _error(400, f"demo: {e}")
    prompt = next((_text_of(m.content) for m in reversed(req.messages) if m.role == "user"), "")
    limit = req.max_completion_tokens or req.max_tokens
    words = _reply_words(prompt, limit)
    finish = "length" if limit and limit < len(_reply_words(prompt, None)) else "stop"
    cid, created = "chatcmpl-demo" + hashlib.sha1(prompt.encode()).hexdigest()[:20], int(time.time())
    if not req.stream:
        return web.json_response(
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": req.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(words)},
                        "finish_reason": finish,
                    }
                ],
                "usage": _usage(prompt, len(words)),
            },
            dumps=lambda o: orjson.dumps(o).decode(),
        )
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)

    def chunk(delta: dict[str, Any], finish_reason: str | None = None, usage: Any = None) -> bytes:
        choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model}
        body["choices"] = choices
        if usage:
            body["usage"] = usage
        return b"data: " + orjson.dumps(body) + b"\n\n"

    await resp.write(chunk({"role": "assistant", "content": ""}))
    for w in words:
        await asyncio.sleep(_TOKEN_GAP_S)
        await resp.write(chunk({"content": w}))
    await resp.write(chunk({}, finish))
    await resp.write(chunk({}, usage=_usage(prompt, len(words))))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def _completions(request: web.Request) -> web.Response:
    try:
        req = msgspec.json.decode(await request.read(), type=_Completion)
    except msgspec.MsgspecError as e:
        return _error(400, f"demo: {e}")
    if req.stream:
        return _error(400, "demo: streaming is supported on /chat/completions only")
    prompt = _text_of(req.prompt) if not isinstance(req.prompt, list) else " ".join(map(str, req.prompt))
    words = _reply_words(prompt, None)
    return web.json_response(
        {
            "id": "cmpl-demo",
            "object": "text_completion",
            "created": int(time.time()),
            "model": req.model,
            "choices": [{"text": "".join(words), "index": 0, "logprobs": None, "finish_reason": "stop"}],
            "usage": _usage(prompt, len(words)),
        }
    )


async def _embeddings(request: web.Request) -> web.Response:
    try:
        req = msgspec.json.decode(await request.read(), type=_Embedding)
    except msgspec.MsgspecError as e:
        return _error(400, f"demo: {e}")
    inputs = req.input if isinstance(req.input, list) else [req.input]
    data = []
    for i, text in enumerate(inputs):
        # Deterministic 16-dimensional vector from the text's hash: stable, clearly not semantic.
        digest = hashlib.sha256(str(text).encode()).digest()[:16]
        data.append({"object": "embedding", "index": i, "embedding": [(b - 128) / 128 for b in digest]})
    tokens = sum(max(1, len(str(t).split())) for t in inputs)
    return web.json_response(
        {
            "object": "list",
            "data": data,
            "model": req.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


async def _models(request: web.Request) -> web.Response:
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "hedgerow-demo"} for m in ("demo", "demo-embed")]
    return web.json_response({"object": "list", "data": data})


def _error(status: int, message: str) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}},
        status=status,
    )


def demo_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/embeddings", _embeddings)
    app.router.add_get("/v1/models", _models)
    return app


async def start_demo() -> tuple[web.AppRunner, str]:
    """Start the demo upstream on 127.0.0.1 with a free port; return its runner and base URL."""
    runner = web.AppRunner(demo_app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/v1"
