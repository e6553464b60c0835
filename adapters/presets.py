"""The OpenAI-compatible family as data: base URL, key variable and quirks per provider, no code per provider.

A provider with `preset: groq` needs no `base-url`; its key is read from the preset's variable (`GROQ_API_KEY`)
when `api-key` is absent, and the provider switches itself on only when that variable is set (config.py,
`_apply_presets`). The OpenAI adapter drops a preset's `unsupported` parameters from the request (one top-level
rewrite, only when one is present), and `provider.require_parameters` skips such providers instead.

Why drop rather than relay the provider's 400: OpenRouter's semantics. A client writing to one API should not
have to know which provider serves it; a parameter a provider cannot honour is ignored unless the request asks
(`require_parameters`) for providers that honour all of its parameters. Only top-level parameters are listed:
nested quirks (Groq's `messages[].name`) are in `notes`, because dropping them would need a full decode.

Base URLs and limitations are from each provider's public docs (`docs`, mostly its OpenAI-compatibility
page); self-hosted servers default to 127.0.0.1 and their usual ports, with no key.
"""

from __future__ import annotations

import msgspec


class Preset(msgspec.Struct, frozen=True, kw_only=True):
    base_url: str  # OpenAI-compatible root; the adapter appends /chat/completions, /models …
    api_key_env: str | None = None  # the key's variable; None: no key (self-hosted)
    auth_header: str | None = None  # header carrying the bare key; None: `Authorization: Bearer <key>`
    unsupported: frozenset[str] = frozenset()  # top-level parameters dropped (rejected or ignored upstream)
    notes: str = ""  # quirks a preset cannot fix, for operators
    docs: str = ""  # where base_url and the limitations come from


# Parameters only OpenAI's own platform knows (stored completions, tiers, request metadata).
_OPENAI_ONLY = frozenset({"store", "metadata", "service_tier"})
_LOGPROBS = frozenset({"logprobs", "top_logprobs"})

PRESETS: dict[str, Preset] = {
    "openai": Preset(
        base_url="https://api.openai.com/v1",
        api_key_env="OPENAI_API_KEY",
        docs="https://platform.openai.com/docs/api-reference/chat",
    ),
    "groq": Preset(
        base_url="https://api.groq.com/openai/v1",
        api_key_env="GROQ_API_KEY",
        unsupported=_LOGPROBS | {"logit_bias"},  # "will result in a 400 error"
        notes="`messages[].name` is rejected too; `n` must be 1; temperature 0 becomes 1e-8.",
        docs="https://console.groq.com/docs/openai",
    ),
    "together": Preset(
        base_url="https://api.together.xyz/v1",
        api_key_env="TOGETHER_API_KEY",
        docs="https://docs.together.ai/docs/openai-api-compatibility",
    ),
    "mistral": Preset(
        base_url="https://api.mistral.ai/v1",
        api_key_env="MISTRAL_API_KEY",
        # Mistral answers an unknown field with 422 extra_forbidden. Streams carry usage in their last chunk
        # without `stream_options`; `seed` is spelled `random_seed` there.
        unsupported=_LOGPROBS | _OPENAI_ONLY | {"logit_bias", "stream_options", "seed"},
        notes="`max_completion_tokens` is not accepted (use `max_tokens`); `tool_choice` is a string only.",
        docs="https://docs.mistral.ai/api/",
    ),
    "deepseek": Preset(
        base_url="https://api.deepseek.com",  # the docs' base; /v1 also works and means nothing more
        api_key_env="DEEPSEEK_API_KEY",
        unsupported=frozenset({"logit_bias"}),  # not in the API reference
        notes="deepseek-reasoner rejects logprobs/top_logprobs and ignores temperature, top_p and penalties.",
        docs="https://api-docs.deepseek.com/api/create-chat-completion",
    ),
    "fireworks": Preset(
        base_url="https://api.fireworks.ai/inference/v1",
        api_key_env="FIREWORKS_API_KEY",
        docs="https://docs.fireworks.ai/tools-sdks/openai-compatibility",
    ),
    "xai": Preset(
        base_url="https://api.x.ai/v1",
        api_key_env="XAI_API_KEY",
        notes="Reasoning models reject presence_penalty, frequency_penalty and stop.",
        docs="https://docs.x.ai/docs/api-reference",
    ),
    "cerebras": Preset(
        base_url="https://api.cerebras.ai/v1",
        api_key_env="CEREBRAS_API_KEY",
        # "These fields will result in a 400 error"
        unsupported=frozenset(
            {"frequency_penalty", "presence_penalty", "logit_bias", "parallel_tool_calls", "service_tier"}
        ),
        docs="https://inference-docs.cerebras.ai/resources/openai",
    ),
    "perplexity": Preset(
        base_url="https://api.perplexity.ai",  # /chat/completions at the root, no /v1
        api_key_env="PERPLEXITY_API_KEY",
        unsupported=_LOGPROBS | {"logit_bias"},
        notes="No GET /models: use `probe: {kind: chat}` or leave probes off. Answers carry `citations`.",
        docs="https://docs.perplexity.ai/api-reference/chat-completions-post",
    ),
    "openrouter": Preset(
        base_url="https://openrouter.ai/api/v1",
        api_key_env="OPENROUTER_API_KEY",
        notes="Routes itself; the gateway keeps its own `provider` preferences and does not forward them.",
        docs="https://openrouter.ai/docs/api-reference/overview",
    ),
    # Self-hosted servers: no key (set `api-key` if the server was started with one).
    "vllm": Preset(base_url="http://127.0.0.1:8000/v1", docs="https://docs.vllm.ai/en/latest/serving/"),
    "sglang": Preset(base_url="http://127.0.0.1:30000/v1", docs="https://docs.sglang.ai/"),
    "ollama": Preset(
        base_url="http://127.0.0.1:11434/v1",
        notes="The model must be pulled first (`ollama pull <model>`).",
        docs="https://github.com/ollama/ollama/blob/main/docs/openai.md",
    ),
    "lmstudio": Preset(base_url="http://127.0.0.1:1234/v1", docs="https://lmstudio.ai/docs/app/api"),
}
