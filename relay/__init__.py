"""relay: a streaming relay for LLM chat (OpenAI-compatible upstream in, Server-Sent Events out)."""

__version__ = "0.1.0"
