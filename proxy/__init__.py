"""Hedgerow: an OpenAI-compatible LLM edge gateway."""

__version__ = "0.1.0"
