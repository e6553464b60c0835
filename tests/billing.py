"""A fake OpenAI-compatible provider that bills: every answer reports a usage derived from the request, and the
fake adds up exactly what it reported — the ground truth the ledger tests compare the gateway's records with.

What a request gets is chosen by its last message's text:
  "stream"  an SSE stream, with a usage chunk at the end when the request asked for one (stream_options)
  "tools"   a tool call instead of text
  "cancel"  a stream that stops after its first content chunk until the client goes away (never reports usage)
  "slow"    waits `slow_s` before answering (a hedge overtakes it; its usage is never reported)
A usage is reported once its bytes were written: a stream cut before its usage chunk reported nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field

import orjson
from aiohttp import web


@dataclass
class Reported:
    requests: int = 0
    prompt: int = 0
    completion: int = 0
    cached: int = 0
    reasoning: int = 0
    usages: list[dict[str, int]] = field(default_factory=list)

    def add(self, u: dict[str, int]) -> None:
        self.requests += 1
        self.prompt += u["prompt"]
        self.completion += u["completion"]
        self.cached += u["cached"]
        self.reasoning += u["reasoning"]
        self.usages.append(u)


def usage_for(text: str) -> dict[str, int]:
    """Deterministic, varied token counts for a prompt text."""
    h = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    prompt = 20 + h % 900
    completion = 1 + (h >> 10) % 300
    return {
        "prompt": prompt,
        "completion": completion,
        "cached": prompt // 2 if (h >> 20) % 3 == 0 else 0,
        "reasoning": completion // 3 if (h >> 24) % 4 == 0 else 0,
    }


def openai_usage(u: dict[str, int]) -> dict[str, object]:
    return {
        "prompt_tokens": u["prompt"],
        "completion_tokens": u["completion"],
        "total_tokens": u["prompt"] + u["completion"],
        "prompt_tokens_details": {"cached_tokens": u["cached"]},
        "completion_tokens_details": {"reasoning_tokens": u["reasoning"]},
    }


def _chunk(n: int, delta: dict[str, object], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    body = {"id": f"chatcmpl-{n}", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [choice]}
    return b"data: " + orjson.dumps(body) + b"\n\n"


class BillingUpstream:
    def __init__(self, name: str, slow_s: float = 2.0, completion_is_max_tokens: bool = False) -> None:
        self.name = name
        self.slow_s = slow_s
        # the budget tests: every answer uses the whole `max_tokens`, so its cost is its worst case
        self.completion_is_max_tokens = completion_is_max_tokens
        self.reported = Reported()
        self.seen = 0
        self.last_request: dict[str, object] = {}
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self._chat)
        self.app.router.add_get("/v1/models", self._models)
        self.base_url = ""

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.seen += 1
        req = self.last_request = orjson.loads(await request.read())
        text = req["messages"][-1]["content"]
        u = usage_for(text)
        if self.completion_is_max_tokens:
            u = {"prompt": u["prompt"], "completion": req["max_tokens"], "cached": 0, "reasoning": 0}
        n = self.seen
        if "slow" in text:
            await asyncio.sleep(self.slow_s)
        if "stream" in text or "cancel" in text:
            return await self._stream(request, req, text, u, n)
        message: dict[str, object] = {"role": "assistant", "content": f"answer {n}"}
        finish = "stop"
        if "tools" in text:
            call = {"id": f"call_{n}", "type": "function", "function": {"name": "f", "arguments": '{"x":1}'}}
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
            finish = "tool_calls"
        body = {
            "id": f"chatcmpl-{n}",
            "object": "chat.completion",
            "created": 1,
            "model": req["model"],
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": openai_usage(u),
        }
        resp = web.Response(body=orjson.dumps(body), content_type="application/json")
        await resp.prepare(request)
        await resp.write_eof()
        self.reported.add(u)
        return resp

    async def _stream(
        self, request: web.Request, req: dict[str, object], text: str, u: dict[str, int], n: int
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_chunk(n, {"role": "assistant", "content": ""}))
        await resp.write(_chunk(n, {"content": "Hello"}))
        if "cancel" in text:
            await asyncio.sleep(30)  # the client leaves first; the usage is never sent
        await resp.write(_chunk(n, {"content": " world"}))
        await resp.write(_chunk(n, {}, "stop"))
        options = req.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            tail = {"id": f"chatcmpl-{n}", "object": "chat.completion.chunk", "created": 1, "model": "m"}
            tail |= {"choices": [], "usage": openai_usage(u)}
            await resp.write(b"data: " + orjson.dumps(tail) + b"\n\n")
            self.reported.add(u)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
