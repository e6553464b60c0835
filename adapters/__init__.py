"""Adapter registry. A new wire format = one module + one line here + fixtures + a quirks test."""

from adapters.anthropic import AnthropicAdapter
from adapters.azure import AzureOpenAIAdapter
from adapters.base import Adapter
from adapters.bedrock import BedrockAdapter
from adapters.gemini import GeminiAdapter
from adapters.openai import OpenAIAdapter

REGISTRY: dict[str, type[Adapter]] = {
    "openai": OpenAIAdapter,  # OpenAI and the compatible family (Groq, Together, vLLM, Ollama, …): data only
    "anthropic": AnthropicAdapter,
    "azure": AzureOpenAIAdapter,
    "bedrock": BedrockAdapter,  # AWS Converse; needs the `bedrock` extra (botocore)
    "gemini": GeminiAdapter,
}
